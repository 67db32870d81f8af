"""Throughput of the shapes input path: TFDS build, tokenisation, Grain batches onto the mesh."""

from __future__ import annotations

import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.machine import time_fn
from benchmarks.registry import benchmark, figure


def _build(tmp: str, num_train: int, image_size: int):
    from dalle_jax.data.pipeline import open_split
    from dalle_jax.data.shapes import ShapesSpec, build_shapes

    spec = ShapesSpec(image_size=image_size, num_train=num_train, num_validation=0, num_test=0)
    start = time.perf_counter()
    path = build_shapes(tmp, spec)
    return open_split(path, "train"), time.perf_counter() - start


@benchmark("shapes_pipeline", help="shapes TFDS build, BPE tokenisation, and Grain batches -> sharded jax.Array")
def shapes_pipeline(quick: bool) -> dict[str, Any]:
    import jax

    from dalle_jax import sharding
    from dalle_jax.data.pipeline import Pipeline, device_batch, text_transform
    from dalle_jax.data.tokenizer import TextTokenizer
    from dalle_jax.sharding import DEFAULT_RULES, MeshConfig

    num_train, image_size, batch = (512, 64, 64) if quick else (4096, 64, 64)
    steps = 4 if quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        source, build_s = _build(tmp, num_train, image_size)
        captions = [source[i]["caption"].decode() for i in range(len(source))]
        tokenizer = TextTokenizer.train(captions, vocab_size=512, text_len=24, dropout=0.1)
        chunk = captions[:1024]
        rng = np.random.default_rng(0)
        eval_time = time_fn(lambda: tokenizer.encode(chunk), repeats=3)
        train_time = time_fn(lambda: tokenizer.encode(chunk, training=True, rng=rng), repeats=3)

        mesh = sharding.make_mesh(MeshConfig(ici_parallelism=(-1, 1, 1)))
        pipeline = Pipeline(source, global_batch=batch, seed=0, transform=text_transform(tokenizer, True))
        jax.block_until_ready(device_batch(next(pipeline), mesh, DEFAULT_RULES))  # warm threads and transfer
        start = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(device_batch(next(pipeline), mesh, DEFAULT_RULES))
        pipeline_s = time.perf_counter() - start
    return {
        "config": {"image_size": image_size, "num_train": num_train, "global_batch": batch, "steps": steps,
                   "text_len": 24, "bpe_dropout": 0.1, "devices": jax.device_count()},
        "figures": {
            "build_examples_per_s": figure(num_train / build_s, "examples/s"),
            "tokenize_eval_captions_per_s": figure(len(chunk) / eval_time.median_s, "captions/s"),
            "tokenize_dropout_captions_per_s": figure(len(chunk) / train_time.median_s, "captions/s"),
            "pipeline_examples_per_s": figure(steps * batch / pipeline_s, "examples/s"),
        },
        "notes": "build = render + zlib + array_record write (TFDS); pipeline = read, tokenise with dropout, "
                 "batch, device_put as a global jax.Array",
    }
