"""Sampling speed of our cached sampler against DALLE-pytorch and against this machine's memory roofline.

Ours: `sample_tokens` (prefill + KV-cached decode, one jitted program) on the `bench` preset's prior with random
weights (d 512, 8 layers of 8 x 64 heads, 64 text + 16x16 image tokens, vocab 16384 / 8192), batch 1, 4 and 64,
fp32 and bf16 (`serving_prior`: block weights, compute and KV cache in bf16). Time per call / 256 image tokens =
ms per decode step (the prefill is included and small); image tokens/s = batch x 256 / call time. Compilation is
excluded (first call) and reported apart.

Reference: DALLE-pytorch 1.6.6 `generate_images` at the same dimensions (as `prior_train` builds it), batch 4,
`torch.set_num_threads(2)`, measured in the same run: its default (`use_cache=False`: a full forward over the
sequence for every token) and `use_cache=True`. Its VAE decode (a 3-layer DiscreteVAE at 128 px) is inside its
time; ours stops at tokens. Without torch / dalle-pytorch the entry says so and reports no ratio.

Roofline: a decode step must read every block weight and the image head once (fp32 4 bytes, bf16 blocks 2) and
the KV cache of every layer over the whole buffer (the cached decode attends over all 320 positions, masked):
2 x layers x batch x 320 x heads x head_dim x bytes. Divided by the machine's measured streaming bandwidth (jitted
in-place x + 1, `machine.measure_jax_bandwidth`) that is the fastest a memory-bound step can be; our fraction is
that time over the measured step. Model FLOPs per step: 2 x block params x batch + 2 x d x image_vocab x batch +
4 x layers x 320 x heads x head_dim x batch (QK and AV over the buffer); at batch 64 the step should be compute
bound, so its FLOP/s is compared with the best measured fp32 matmul peak.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from benchmarks import machine
from benchmarks.bench_prior import TORCH_THREADS, bench_configs, load_dalle_pytorch
from benchmarks.registry import benchmark, figure

BATCHES = {"full": (1, 4, 64), "quick": (1, 4)}
TORCH_BATCH = 4


def _random_prior(config: Any, dtype: str) -> Any:
    from flax import nnx

    from dalle_jax.models.prior import Prior
    from dalle_jax.sampling.sampler import serving_prior

    with nnx.use_eager_sharding(False):
        model = Prior(config, rngs=nnx.Rngs(0))
    return serving_prior(model, dtype)


def step_bytes(config: Any, batch: int, dtype: str) -> dict[str, int]:
    """Bytes one decode step must read: block weights, the image head, the KV cache (whole buffer)."""
    c = config
    d, inner = c.d_model, c.n_heads * c.head_dim
    width = 2 if dtype == "bfloat16" else 4
    matrices = 4 * d * inner + 2 * c.mlp_ratio * d * d  # wq wk wv wo, w1 w2 (the serving dtype)
    biases = 3 * inner + d + c.mlp_ratio * d + d  # bq bk bv, bo, b1, b2 (the serving dtype)
    norms = 4 * d  # two LayerNorms' scale and bias (fp32 always)
    per_layer = (matrices + biases) * width + norms * 4
    return {"weights": c.n_layers * per_layer + d * c.image_vocab_size * 4,
            "kv_cache": 2 * c.n_layers * batch * c.seq_len * inner * width}


def step_flops(config: Any, batch: int) -> int:
    c = config
    d, inner = c.d_model, c.n_heads * c.head_dim
    blocks = c.n_layers * (4 * d * inner + 2 * c.mlp_ratio * d * d)
    return batch * (2 * blocks + 2 * d * c.image_vocab_size + 4 * c.n_layers * c.seq_len * inner)


def _time_ours(config: Any, dtype: str, batch: int, repeats: int) -> dict[str, float]:
    from dalle_jax.sampling.sampler import SampleConfig, sample_tokens

    model = _random_prior(config, dtype)
    text = np.random.default_rng(0).integers(0, config.text_vocab_size, (batch, config.text_len)).astype(np.int32)
    draw = lambda: sample_tokens(model, text, 0, SampleConfig())  # noqa: E731
    first = machine.time_fn(draw, repeats=1, warmup=0)  # compiles
    timing = machine.time_fn(draw, repeats=repeats, warmup=0)
    return {"first_s": first.best_s, "median_s": timing.median_s, "best_s": timing.best_s}


def _time_torch(config: Any, use_cache: bool) -> float:
    from benchmarks.bench_prior import build_torch_run

    run = build_torch_run(config, TORCH_BATCH)
    run.model.eval()
    return machine.time_fn(lambda: run.model.generate_images(run.text, use_cache=use_cache), repeats=1,
                           warmup=0).best_s


@benchmark("sampler", help="image tokens/s and ms per decode step of the cached sampler (fp32, bf16) vs DALLE-pytorch "
                           "and the memory roofline")
def sampler(quick: bool) -> dict[str, Any]:
    import jax

    prior, _ = bench_configs(quick)
    batches = BATCHES["quick" if quick else "full"]
    sizes, bandwidth_bytes, peak_repeats = machine.default_peak_sizes(quick)
    bandwidth = machine.measure_jax_bandwidth(bandwidth_bytes, repeats=peak_repeats)["best_bytes_per_s"]
    peak = machine.measure_matmul_peak(sizes, "float32", repeats=peak_repeats)["best_flops_per_s"]
    figures: dict[str, dict[str, Any]] = {
        "bandwidth_gbs": figure(bandwidth / 1e9, "GB/s (best jitted x + 1)"),
        "peak_matmul_float32_gflops": figure(peak / 1e9, "GFLOP/s (best measured)")}
    for dtype in ("float32", "bfloat16"):
        for batch in batches:
            t = _time_ours(prior, dtype, batch, repeats=1 if batch >= 64 or quick else 3)
            step_s = t["median_s"] / prior.image_len
            name = f"jax_{dtype}_b{batch}"
            figures[f"{name}_ms_per_step"] = figure(1e3 * step_s, "ms (median call / image tokens)")
            figures[f"{name}_image_tokens_per_s"] = figure(batch * prior.image_len / t["median_s"], "tokens/s")
            figures[f"{name}_first_call_s"] = figure(t["first_s"], "s (incl. compilation)")
            moved = step_bytes(prior, batch, dtype)
            roofline_s = sum(moved.values()) / bandwidth
            figures[f"{name}_roofline_fraction"] = figure(100 * roofline_s / step_s,
                                                          f"% of the memory roofline ({sum(moved.values()) / 1e6:.0f} "
                                                          "MB a step)")
            figures[f"{name}_mfu"] = figure(100 * step_flops(prior, batch) / step_s / peak, "% of fp32 matmul peak")
    notes = ""
    try:
        load_dalle_pytorch()
    except ImportError as error:
        notes = f"DALLE-pytorch not measured ({error}); no ratio is reported. "
    else:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(TORCH_THREADS)
        try:
            for use_cache in (False, True):  # one call each: ~105 s without the cache at the bench size
                seconds = _time_torch(prior, use_cache)
                tag = "torch_cached" if use_cache else "torch_default"
                figures[f"{tag}_b{TORCH_BATCH}_image_tokens_per_s"] = figure(
                    TORCH_BATCH * prior.image_len / seconds, f"tokens/s (generate_images use_cache={use_cache}, "
                                                             "one call incl. its VAE decode)")
                ours = figures.get(f"jax_float32_b{TORCH_BATCH}_image_tokens_per_s")
                if ours is not None:
                    figures[f"ratio_jax_float32_over_{tag}_b{TORCH_BATCH}"] = figure(
                        ours["value"] / figures[f"{tag}_b{TORCH_BATCH}_image_tokens_per_s"]["value"],
                        "x (>1: ours faster)")
        finally:
            torch.set_num_threads(previous)
    return {
        "config": {"preset": "bench (tiny stand-in)" if quick else "bench", "d_model": prior.d_model,
                   "n_layers": prior.n_layers, "heads": f"{prior.n_heads}x{prior.head_dim}",
                   "seq_len": prior.seq_len, "image_tokens": prior.image_len,
                   "vocab": f"{prior.text_vocab_size}/{prior.image_vocab_size}", "batches": list(batches),
                   "torch_batch": TORCH_BATCH, "torch_threads": TORCH_THREADS,
                   "jax_device": str(jax.devices()[0].device_kind), "weights": "random (Prior init)"},
        "figures": figures,
        "notes": notes + "ms per step = median sample_tokens call / image tokens (prefill included). Roofline "
                         "fraction = (bytes a step must read / measured bandwidth) / measured step; bytes = block "
                         "weights + image head + the KV cache over the whole buffer. MFU = model FLOPs per step "
                         "(2 x block params + head + attention over the buffer, x batch) / step / fp32 matmul peak.",
    }

