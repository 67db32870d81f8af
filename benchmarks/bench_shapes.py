"""How fast the built-in captioned-shapes dataset renders examples (the cost of building it)."""

from __future__ import annotations

import itertools
from typing import Any

from benchmarks.machine import time_fn
from benchmarks.registry import benchmark, figure


@benchmark("shapes_render", help="examples/s of dalle_jax.data.shapes.render_example, 64x64, one thread")
def shapes_render(quick: bool) -> dict[str, Any]:
    # Imported here so a missing or broken shapes module fails this entry only, not the whole run.
    from dalle_jax.data.shapes import ShapesSpec, render_example

    image_size, split = 64, "train"
    spec = ShapesSpec(image_size=image_size)
    examples_per_repeat = 64 if quick else 2000
    repeats = 3 if quick else 5
    # Each call renders fresh indices, so a cache inside render_example cannot flatter later repeats.
    batch_starts = itertools.count(0, examples_per_repeat)

    def render_batch() -> None:
        start = next(batch_starts)
        for index in range(start, start + examples_per_repeat):
            render_example(spec, split, index)

    timing = time_fn(render_batch, repeats=repeats, warmup=1)
    return {
        "config": {
            "image_size": image_size,
            "split": split,
            "examples_per_repeat": examples_per_repeat,
            "repeats": repeats,
        },
        "figures": {
            "examples_per_s_median": figure(examples_per_repeat / timing.median_s, "examples/s"),
            "examples_per_s_best": figure(examples_per_repeat / timing.best_s, "examples/s"),
            "ms_per_example_median": figure(1e3 * timing.median_s / examples_per_repeat, "ms"),
        },
        "notes": "one Python thread, rendering only (no encoding or writing to disk)",
    }
