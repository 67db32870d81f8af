"""Input pipeline: TFDS array_record sources read through Grain into sharded global batches.

The stream is built on *example indices*, so every property we need is arithmetic on indices:

    train:  range(N).shuffle(seed).repeat()     each epoch a fresh deterministic permutation
    eval:   range(ceil(N / B) * B)              one pass, the tail padded and marked valid=False
    then:   .random_map(read + transform)       per-example RNG derived from (seed, stream position)
            .batch(B / hosts)[host::hosts]      host h takes mini-batches h, h + H, h + 2H, ...

With the last step, global batch k is mini-batches kH .. kH + H - 1, i.e. exactly the rows a single host
would have read for batch k, in order: a multi-host run sees the same global batches as a single-host run.
Hosts read disjoint examples, and the Grain iterator's state (saved in the trainers' Orbax checkpoints)
restores the stream exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np

from dalle_jax import sharding
from dalle_jax.errors import DatasetError

ExampleTransform = Callable[[dict, np.random.Generator], dict]


def open_split(dataset_dir: str | Path, split: str) -> Any:
    """Random-access TFDS source (`len`, `[i]`) for one split of a prepared dataset directory.

    `dataset_dir` is the version directory a builder printed (it holds `dataset_info.json`).
    """
    import tensorflow_datasets as tfds

    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "dataset_info.json").is_file():
        raise DatasetError(f"{dataset_dir} is not a prepared dataset (no dataset_info.json); build one with "
                           f"`dalle-jax data shapes --out DIR` or `dalle-jax data folder SRC --out DIR` and pass the "
                           f"directory it prints")
    builder = tfds.builder_from_directory(str(dataset_dir))
    splits = sorted(builder.info.splits.keys())
    if split not in splits:
        raise DatasetError(f"{dataset_dir} has no split '{split}'; it has {splits}")
    return builder.as_data_source(split)


def caption_text(caption: bytes | str) -> str:
    """A caption as TFDS hands it back (`Text` features come back as bytes) -> str."""
    return caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)


def text_transform(tokenizer: Any, training: bool) -> ExampleTransform:
    """Image + caption example -> {"image": uint8 (S, S, 3), "text": int32 (L,), "id"}.

    BPE-dropout is applied only when `training`; its randomness comes from the per-example generator, so
    a resumed run tokenises exactly as the uninterrupted one.
    """
    def transform(example: dict, rng: np.random.Generator) -> dict:
        text = tokenizer.encode([caption_text(example["caption"])], training=training, rng=rng)[0]
        return {"image": np.asarray(example["image"], np.uint8), "text": text.astype(np.int32),
                "id": np.int64(example["id"])}

    return transform


class Pipeline:
    """Deterministic, shardable, resumable batches of one split.

    Args:
      source: random-access source (`open_split`, or any sequence of example dicts).
      global_batch: rows per step over all hosts.
      seed: shuffle + transform seed (< 2**32).
      transform: example -> example, given a per-example `np.random.Generator`; None keeps examples.
      train: True: shuffle, repeat forever. False: one pass in order; the last batch is padded and a
        boolean "valid" field marks real rows.
      process_index / process_count: this host's place (default: from `jax`); explicit for tests.
    """

    def __init__(self, source: Any, *, global_batch: int, seed: int = 0, transform: ExampleTransform | None = None,
                 train: bool = True, process_index: int | None = None, process_count: int | None = None,
                 read_threads: int = 2, prefetch: int = 2):
        self.process_index = jax.process_index() if process_index is None else process_index
        self.process_count = jax.process_count() if process_count is None else process_count
        if global_batch % self.process_count:
            raise sharding.ShardingError(f"global batch {global_batch} is not divisible by the "
                                         f"{self.process_count} hosts")
        if len(source) == 0:
            raise DatasetError("the dataset split is empty")
        self.source, self.global_batch, self.train = source, global_batch, train
        self.local_batch = global_batch // self.process_count
        num_examples = len(source)
        if train:
            indices = grain.MapDataset.range(num_examples).shuffle(seed=seed % 2**32).repeat()
            self.num_batches = None
        else:
            self.num_batches = math.ceil(num_examples / global_batch)
            indices = grain.MapDataset.range(self.num_batches * global_batch)

        def read(index: int, rng: np.random.Generator) -> dict:
            valid = index < num_examples
            example = dict(source[int(index) if valid else 0])
            if transform is not None:
                example = transform(example, rng)
            if not train:
                example["valid"] = np.bool_(valid)
            return example

        dataset = indices.random_map(read, seed=seed % 2**32).batch(self.local_batch, drop_remainder=True)
        dataset = dataset[self.process_index::self.process_count]
        options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        self._iterator = dataset.to_iter_dataset(options).__iter__()

    def __iter__(self) -> Iterator[dict]:
        return self

    def __next__(self) -> dict:
        """This host's rows of the next global batch, as numpy."""
        return next(self._iterator)

    def get_state(self) -> dict:
        return self._iterator.get_state()

    def set_state(self, state: dict) -> None:
        self._iterator.set_state(state)


def device_batch(host_batch: dict, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> dict:
    """Numeric fields -> global `jax.Array`s sharded on the batch axis; text fields stay on the host."""
    numeric = {k: v for k, v in host_batch.items() if np.asarray(v).dtype.kind in "biuf"}
    return sharding.shard_batch(numeric, mesh, rules)


def shapes_spec(data_config: Any) -> Any:
    """The built-in shapes dataset that `data_config` (a `DataConfig`) describes."""
    from dalle_jax.data import shapes

    return shapes.ShapesSpec(image_size=data_config.image_size, num_train=data_config.num_train,
                             num_validation=data_config.num_validation, num_test=data_config.num_test,
                             holdout=shapes.parse_holdout(data_config.holdout), seed=data_config.seed,
                             grid=data_config.grid, train_coverage=data_config.train_coverage,
                             one_concept_captions=data_config.one_concept_captions)
