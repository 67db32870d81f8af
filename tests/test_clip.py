"""The CLIP reranker: InfoNCE against numpy, pair_similarity() is a cosine, pads cannot move a text embedding, a sharded
step equals a single-device one, and `dalle-jax train-clip` trains, evaluates, resumes and loads."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax import runs, sharding
from dalle_jax.config import ClipTrainConfig
from dalle_jax.models.clip import CLIP, CLIPConfig, contrastive_loss, pair_similarity, similarity_matrix
from dalle_jax.models.init import build_pooled
from dalle_jax.sharding import MeshConfig
from dalle_jax.train import clip as clip_train
from dalle_jax.train import loop, optim

TINY = CLIPConfig(image_size=8, patch_size=4, image_width=16, image_layers=2, image_heads=2, text_vocab_size=30,
                  text_len=6, text_width=16, text_layers=2, text_heads=2, embed_dim=8, init_std=0.2)
# The CLI subprocesses run data parallel over 2 simulated devices (8 cost ~10 s more on 2 busy cores for a
# model this small; the 8-device layouts are checked in-process) and compile with LLVM's cheap passes (the train
# step compiles in ~4 s instead of ~14 s; these tiny models do not care how fast the code runs).
ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
       "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0 "
                    "--xla_llvm_disable_expensive_passes=true"}


def _model(config=TINY, seed=0):
    return build_pooled(lambda: CLIP(config, rngs=nnx.Rngs(seed)), jax.random.key(seed))


def _pairs(rng, batch, config=TINY):
    """Random images in [0, 1] and captions of random length, padded with the per-position pad ids."""
    images = rng.random((batch, config.image_size, config.image_size, 3)).astype(np.float32)
    ids = rng.integers(0, config.text_vocab_size, (batch, config.text_len))
    lengths = rng.integers(1, config.text_len, batch)  # at least one pad each
    pads = config.text_vocab_size + np.arange(config.text_len)
    text = np.where(np.arange(config.text_len) < lengths[:, None], ids, pads).astype(np.int32)
    return jnp.asarray(images), jnp.asarray(text), lengths


def test_info_nce_matches_numpy_reference_with_temperature():
    rng = np.random.default_rng()
    batch, dim = 7, 16
    image = rng.normal(size=(batch, dim))
    # Correlated pairs in 16 dimensions keep the loss away from log(batch) and from 0 on every draw (over 5,000 seeds
    # it stayed in [0.15, 1.27], log(7) = 1.95). With 5 dimensions and scales from 2 to 20, 4% of draws came within
    # 0.1 of log(7) and failed the check below; a CI run hit one (0.087).
    text = image + rng.normal(size=(batch, dim))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    scale = float(rng.uniform(2.0, 5.0))
    loss, metrics = contrastive_loss(jnp.asarray(image, jnp.float32), jnp.asarray(text, jnp.float32),
                                     jnp.asarray(scale, jnp.float32))

    logits = scale * image @ text.T  # (images, texts)

    def ce(rows):
        log_z = np.log(np.exp(rows - rows.max(1, keepdims=True)).sum(1)) + rows.max(1)
        return np.mean(log_z - np.diag(rows))

    np.testing.assert_allclose(metrics["image_to_text_loss"], ce(logits), rtol=1e-5)
    np.testing.assert_allclose(metrics["text_to_image_loss"], ce(logits.T), rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * (ce(logits) + ce(logits.T)), rtol=1e-5)
    np.testing.assert_allclose(clip_train.info_nce_numpy(image, text, scale), loss, rtol=1e-5)
    assert abs(float(loss) - math.log(batch)) > 0.1

    model = _model()
    np.testing.assert_allclose(model.logit_scale(), 1 / 0.07, rtol=1e-6)  # CLIP's init
    model.log_logit_scale[...] = jnp.asarray(math.log(500.0))
    np.testing.assert_allclose(model.logit_scale(), 100.0, rtol=1e-6)  # capped like CLIP


def test_score_is_the_cosine_of_the_embeddings_and_pads_are_ignored():
    model = _model()
    rng = np.random.default_rng()
    images, text, lengths = _pairs(rng, 5)
    # Any pad id in a pad position (another position's pad, the shared pad id) must leave the embedding as it
    # was, while a real token there, or a changed caption token, must change it.
    is_pad = np.arange(TINY.text_len) >= lengths[:, None]
    repadded = jnp.where(is_pad, TINY.text_vocab_size + rng.integers(0, TINY.text_len + 1, text.shape), text)
    assert not np.array_equal(repadded, text)
    extended = text.at[np.arange(5), jnp.asarray(lengths)].set(3)
    changed = text.at[:, 0].set((text[:, 0] + 1) % TINY.text_vocab_size)

    @jax.jit  # one compile instead of op-by-op dispatch
    def run(images, texts):
        image_emb, text_emb = model(images, texts[0])
        return {"image": image_emb, "text": text_emb, "score": pair_similarity(model, images, texts[0]),
                "matrix": similarity_matrix(model, images, texts[0]),
                "variants": [model.encode_text(t) for t in texts[1:]]}

    out = jax.device_get(run(images, (text, repadded, extended, changed)))
    image_emb, text_emb = np.asarray(out["image"], np.float64), np.asarray(out["text"], np.float64)
    image_unit = image_emb / np.linalg.norm(image_emb, axis=1, keepdims=True)
    text_unit = text_emb / np.linalg.norm(text_emb, axis=1, keepdims=True)
    assert out["score"].shape == (5,) and np.all(np.abs(out["score"]) <= 1.0 + 1e-6)
    np.testing.assert_allclose(out["score"], np.sum(image_unit * text_unit, 1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["matrix"], image_unit @ text_unit.T, rtol=1e-5, atol=1e-6)
    assert np.std(out["score"]) > 1e-3  # not a constant: the inputs matter

    repadded_emb, extended_emb, changed_emb = out["variants"]
    np.testing.assert_allclose(repadded_emb, out["text"], rtol=0, atol=1e-6)
    for other in (extended_emb, changed_emb):
        assert np.all(np.abs(other - out["text"]).max(1) > 1e-4)


# ------------------------------------------------------------------------------------------------ training

# adam_eps 1e-4 (not 1e-6): a parameter whose gradient is ~0 would otherwise move by up to lr on float noise alone,
# and the test compares sharded against single-device gradients, not Adam's response to rounding.
TRAIN = ClipTrainConfig(batch_size=8, steps=10, warmup_steps=1, learning_rate=1e-2, clip_norm=1.0, ema_decay=0.9,
                        adam_eps=1e-4)


def _train(mesh_shape, batches):
    devices = jax.devices()[: math.prod(mesh_shape)]
    mesh = sharding.make_mesh(MeshConfig(ici_parallelism=mesh_shape), devices=devices)
    rules = MeshConfig().rules
    optimizer = optim.make_optimizer(TRAIN)
    state, spec = loop.init_state(lambda: CLIP(TINY, rngs=nnx.Rngs(0)), optimizer, mesh, rules, 0)
    step = clip_train.make_clip_step(TRAIN, TINY, optimizer, spec, mesh, rules)
    losses = []
    for batch in batches:
        state, metrics = step(state, sharding.shard_batch(batch, mesh, rules))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state["params"]), state["params"]


def test_sharded_step_equals_single_device():
    rng = np.random.default_rng()
    batches = []
    for _ in range(2):
        images, text, _ = _pairs(rng, TRAIN.batch_size)
        batches.append({"image": np.asarray(np.round(images * 255), np.uint8), "text": np.asarray(text)})
    loss_1, params_1, _ = _train((1, 1, 1), batches)
    loss_n, params_n, placed = _train((2, 2, 2), batches)
    assert placed["image_encoder"]["layers"]["wq"].sharding.spec[1:3] == ("fsdp", "tensor")  # really sharded
    np.testing.assert_allclose(loss_n, loss_1, rtol=1e-5)
    assert loss_1[1] != loss_1[0]
    # atol 1e-5 = 1/1000 of one lr-sized (1e-2) Adam update: the layouts reduce in different orders, and an
    # element whose gradient is near adam_eps turns that float noise into ~1e-6 (CI once saw 1.1e-6).
    for a, b in zip(jax.tree.leaves(params_n), jax.tree.leaves(params_1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    from dalle_jax.data.shapes import ShapesSpec, build_shapes
    from dalle_jax.data.tokenizer import TextTokenizer, captions_from_dataset

    root = tmp_path_factory.mktemp("clip_data")
    dataset = build_shapes(str(root / "data"), ShapesSpec(image_size=32, num_train=512, num_validation=64,
                                                          num_test=0))
    tokenizer = TextTokenizer.train(captions_from_dataset(dataset), vocab_size=320, text_len=24)
    tokenizer.save(root / "tokenizer.json")
    return root


def _command(data, out, steps):
    return [sys.executable, "-m", "dalle_jax.cli", "train-clip", "--data", str(data / "data"), "--tokenizer",
            str(data / "tokenizer.json"), "--out", str(out), "--preset", "quick", "--quiet",
            "--set", f"clip_train.steps={steps}"]


def test_train_clip_evaluates_resumes_and_loads(shapes_data, tmp_path):
    run = tmp_path / "run"
    env = {**ENV, "JAX_COMPILATION_CACHE_DIR": str(shapes_data / "jax_cache")}  # the rerun reuses compiles
    first = subprocess.run(_command(shapes_data, run, 100), env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "clip: step 100" in first.stdout
    out = run / "clip"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/retrieval_top1" in r]
    assert [r["step"] for r in evals] == [50, 100]  # the quick preset evaluates every 50 steps
    for key in ("eval/retrieval_top1_in_distribution", "eval/retrieval_top1_heldout", "eval/image_to_text_top1",
                "eval/loss", "eval/swap_top1", "eval/swap_top1_heldout"):
        assert key in evals[-1]
    assert evals[-1]["eval/retrieval_batch"] == 16 and evals[-1]["eval/retrieval_queries"] == 64
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-3:]) < 0.75 * math.log(16), losses  # chance level is log(batch) = 2.77
    assert evals[-1]["eval/retrieval_top1"] > 3 / 16, evals[-1]  # chance is 1/16 (measured: ~0.6-0.7)
    for name in ("config.json", "clip_config.json", "tokenizer.json", "loss_curve.png", "retrieval_curve.png"):
        assert (out / name).is_file(), name

    resumed = subprocess.run(_command(shapes_data, run, 110), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 100" in resumed.stderr and "clip: step 110" in resumed.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/loss" in r] == [50, 100, 110]
    final = rows[-1]

    # The loaded model reproduces the run's own last evaluation (4 batches of 16 validation pairs, in order).
    from dalle_jax.data.pipeline import caption_text, open_split

    model, tokenizer, config = runs.load_clip(run)
    assert config.clip_train.steps == 110 and model.config.text_vocab_size == tokenizer.vocab_size
    saved = json.loads((out / "clip_config.json").read_text())
    assert json.loads(json.dumps(dataclasses.asdict(model.config))) == saved
    source = open_split(next((shapes_data / "data").rglob("dataset_info.json")).parent, "validation")
    examples = [source[i] for i in range(64)]
    images = jnp.asarray(np.stack([e["image"] for e in examples]))
    text = jnp.asarray(tokenizer.encode([caption_text(e["caption"]) for e in examples]))
    image_emb, text_emb = (np.asarray(x) for x in jax.jit(lambda i, t: model(i, t))(images, text))
    hits = sum(clip_train.retrieval_counts(image_emb[b:b + 16], text_emb[b:b + 16], np.zeros(16, bool))["t2i"]
               for b in range(0, 64, 16))
    np.testing.assert_allclose(hits / 64, final["eval/retrieval_top1"], atol=1e-9)
    matched = np.sum(image_emb * text_emb, 1)  # pair_similarity() of the pairs (a cosine: see the test above)
    mismatched = np.sum(image_emb * np.roll(text_emb, 1, axis=0), 1)
    assert matched.mean() > mismatched.mean() + 0.1  # a caption scores its own image higher than another's


def test_train_clip_with_hard_negatives_ranks_them_for_every_image(shapes_data, tmp_path):
    """clip_train.hard_negatives: each image also ranks its caption's one-concept swap, so at initialisation
    (every swap embeds next to its caption) image -> text is ~log 2 harder than text -> image, which is
    unchanged; without the option neither direction has the extra candidates."""
    env = {**ENV, "JAX_COMPILATION_CACHE_DIR": str(shapes_data / "jax_cache")}
    first = {}
    for hard in (True, False):
        run = tmp_path / f"run_{hard}"
        command = [*_command(shapes_data, run, 2), "--set", f"clip_train.hard_negatives={str(hard).lower()}",
                   "--set", "clip_train.log_every=1"]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = [json.loads(line) for line in (run / "clip" / "metrics.jsonl").read_text().splitlines()]
        first[hard] = rows[0]
        assert 0.0 <= rows[-1]["eval/swap_top1"] <= 1.0
        assert ("hard_negative_acc" in rows[0]) == hard
    gap = {hard: row["image_to_text_loss"] - row["text_to_image_loss"] for hard, row in first.items()}
    assert gap[True] > gap[False] + 0.3, gap
