"""The input pipeline on the real shapes TFDS dataset and the real tokenizer (no mocks)."""

import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dalle_jax import sharding
from dalle_jax.data.pipeline import DatasetError, Pipeline, device_batch, open_split, text_transform
from dalle_jax.data.shapes import ShapesSpec, build_shapes
from dalle_jax.data.tokenizer import TextTokenizer
from dalle_jax.sharding import DEFAULT_RULES, MeshConfig

NUM_TRAIN = 72  # not a multiple of the batch sizes below, so epoch boundaries fall inside batches


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    spec = ShapesSpec(image_size=16, num_train=NUM_TRAIN, num_validation=20, num_test=0, seed=3)
    path = build_shapes(str(tmp_path_factory.mktemp("shapes")), spec)
    source = open_split(path, "train")
    captions = [source[i]["caption"].decode() for i in range(len(source))]
    tokenizer = TextTokenizer.train(captions, vocab_size=300, text_len=48, dropout=0.3)
    return path, source, tokenizer


def _by_id(source):
    return {int(source[i]["id"]): source[i] for i in range(len(source))}


def test_global_batch_is_sharded_and_holds_the_right_examples(dataset):
    path, source, tokenizer = dataset
    mesh = sharding.make_mesh(MeshConfig(ici_parallelism=(4, 2, 1)))
    pipeline = Pipeline(source, global_batch=16, seed=7, transform=text_transform(tokenizer, training=False))
    host = next(pipeline)
    batch = device_batch(host, mesh, DEFAULT_RULES)
    assert set(batch) == {"image", "text", "id"}
    assert batch["image"].shape == (16, 16, 16, 3) and batch["image"].dtype == np.uint8
    assert batch["text"].shape == (16, 48) and batch["text"].dtype == np.int32
    for value in batch.values():
        assert value.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), value.ndim)
        assert value.addressable_shards[0].data.shape[0] == 2
    examples = _by_id(source)
    ids = np.asarray(batch["id"])
    assert len(set(ids.tolist())) == 16
    for row, example_id in enumerate(ids):
        example = examples[int(example_id)]
        np.testing.assert_array_equal(np.asarray(batch["image"])[row], example["image"])
        expected = tokenizer.encode([example["caption"].decode()], training=False)[0]
        np.testing.assert_array_equal(np.asarray(batch["text"])[row], expected)


def test_each_epoch_is_a_fresh_permutation(dataset):
    _, source, _ = dataset
    pipeline = Pipeline(source, global_batch=8, seed=11)
    stream = np.concatenate([next(pipeline)["id"] for _ in range(2 * NUM_TRAIN // 8)])
    first, second = stream[:NUM_TRAIN], stream[NUM_TRAIN:]
    assert sorted(first.tolist()) == sorted(second.tolist()) == sorted(int(source[i]["id"]) for i in range(NUM_TRAIN))
    assert not np.array_equal(first, second)
    other_seed = np.concatenate([next(Pipeline(source, global_batch=8, seed=12))["id"]])
    assert not np.array_equal(other_seed, stream[:8])


def test_two_hosts_read_disjoint_halves_of_the_single_host_batches(dataset):
    _, source, tokenizer = dataset
    transform = text_transform(tokenizer, training=True)
    single = Pipeline(source, global_batch=8, seed=5, transform=transform)
    hosts = [Pipeline(source, global_batch=8, seed=5, transform=transform, process_index=i, process_count=2)
             for i in range(2)]
    for _ in range(12):  # crosses an epoch boundary
        whole = next(single)
        parts = [next(h) for h in hosts]
        assert not set(parts[0]["id"].tolist()) & set(parts[1]["id"].tolist())
        for key in ("id", "text", "image"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_eval_pass_covers_every_example_once_across_hosts(dataset):
    path, _, _ = dataset
    source = open_split(path, "validation")
    seen, valid_rows = [], 0
    for host in range(2):
        for batch in Pipeline(source, global_batch=8, train=False, process_index=host, process_count=2):
            seen += batch["id"][batch["valid"]].tolist()
            valid_rows += int(batch["valid"].sum())
            assert batch["id"].shape == (4,)
    assert valid_rows == len(source) == 20
    assert sorted(seen) == sorted(int(source[i]["id"]) for i in range(len(source)))


def test_restored_iterator_continues_exactly(dataset):
    _, source, tokenizer = dataset
    transform = text_transform(tokenizer, training=True)  # BPE-dropout randomness must be restored too
    pipeline = Pipeline(source, global_batch=8, seed=9, transform=transform)
    k = int(np.random.default_rng().integers(3, 12))
    for _ in range(k):
        next(pipeline)
    state = pipeline.get_state()
    expected = [next(pipeline) for _ in range(3)]
    resumed = Pipeline(source, global_batch=8, seed=9, transform=transform)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_bpe_dropout_only_in_training(dataset):
    _, source, tokenizer = dataset
    evals = [next(Pipeline(source, global_batch=16, seed=s, transform=text_transform(tokenizer, False)))
             for s in (1, 1)]
    np.testing.assert_array_equal(evals[0]["text"], evals[1]["text"])
    plain = Pipeline(source, global_batch=64, seed=2, transform=text_transform(tokenizer, False))
    dropped = Pipeline(source, global_batch=64, seed=2, transform=text_transform(tokenizer, True))
    a, b = next(plain), next(dropped)
    np.testing.assert_array_equal(a["id"], b["id"])
    assert (a["text"] != b["text"]).any(axis=1).mean() > 0.2  # dropout 0.3 changes many segmentations


def test_errors_name_the_directory_and_split(dataset, tmp_path):
    path, source, _ = dataset
    with pytest.raises(DatasetError, match=str(tmp_path)):
        open_split(tmp_path, "train")
    with pytest.raises(DatasetError, match=r"no split 'test'.*\['train', 'validation'\]"):
        open_split(path, "test")
    with pytest.raises(sharding.ShardingError, match="not divisible by the 3 hosts"):
        Pipeline(source, global_batch=8, process_index=0, process_count=3)
