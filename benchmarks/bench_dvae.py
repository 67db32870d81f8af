"""The released dVAE architecture: our jitted JAX encoder/decoder against OpenAI's `dall_e` PyTorch modules.

Both run the same weights (random, converted by `dalle_jax.convert.openai_dvae`) on this machine's CPU in fp32,
side by side in one process. Needs torch (CPU) and `DALL-E==0.1`; without them the entry fails with a message.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from benchmarks.machine import Timing, time_fn
from benchmarks.registry import benchmark, figure


def _reference_modules():
    try:
        import dall_e
        import torch
    except ImportError as error:
        raise RuntimeError("dvae_vs_torch needs torch (CPU wheel) and the reference package: "
                           "pip install torch && pip install --no-deps DALL-E==0.1") from error
    torch.manual_seed(0)
    encoder, decoder = dall_e.Encoder(requires_grad=False), dall_e.Decoder(requires_grad=False)
    with torch.no_grad():  # the init leaves biases at zero; make them matter
        for module in (encoder, decoder):
            for name, parameter in module.named_parameters():
                if name.endswith(".b"):
                    parameter.normal_(std=0.1)
    return torch, encoder.eval(), decoder.eval()


def _interleaved(runs: dict[str, Any], repeats: int) -> dict[str, Timing]:
    """Times each run once per round, round-robin, after one warm-up each: load from other processes that
    comes and goes then hits every run alike instead of whichever happened to be running."""
    for fn in runs.values():
        time_fn(fn, repeats=1, warmup=0)  # compilation, first-touch allocation
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name] += time_fn(fn, repeats=1, warmup=0).times_s
    return {name: Timing(tuple(values)) for name, values in times.items()}


def _flops(jitted, *args) -> float:
    analysis = jitted.lower(*args).cost_analysis()  # of the lowered program: no second compilation
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"])


@benchmark("dvae_vs_torch", help="images/s of the released dVAE: jitted JAX (ours) vs dall_e PyTorch, CPU fp32")
def dvae_vs_torch(quick: bool) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from dalle_jax.convert import openai_dvae
    from dalle_jax.models.dvae import map_pixels

    torch, torch_encoder, torch_decoder = _reference_modules()
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    tensors = {part: openai_dvae.strip_prefix({k: v.numpy() for k, v in module.state_dict().items()})
               for part, module in (("encoder", torch_encoder), ("decoder", torch_decoder))}
    config = openai_dvae.infer_config(tensors["encoder"], tensors["decoder"])
    dvae = openai_dvae.build_dvae(config, openai_dvae.to_params(config, tensors["encoder"], tensors["decoder"]))
    graphdef, state = nnx.split(dvae)

    # Quick mode keeps the architecture and code path but shrinks the image (the model is fully convolutional).
    image_size, batch, repeats = (64, 1, 2) if quick else (256, 4, 3)
    grid = config.grid_size(image_size)
    rng = np.random.default_rng(0)
    images = rng.random((batch, image_size, image_size, 3), dtype=np.float32)  # NHWC in [0, 1]
    tokens = rng.integers(0, config.vocab_size, (batch, grid, grid))
    one_hot = np.eye(config.vocab_size, dtype=np.float32)[tokens]  # (B, h, w, vocab)
    torch_images = torch.from_numpy(np.ascontiguousarray(map_pixels(images).transpose(0, 3, 1, 2)))
    torch_one_hot = torch.from_numpy(np.ascontiguousarray(one_hot.transpose(0, 3, 1, 2)))

    encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encoder(map_pixels(x)))
    decode = jax.jit(lambda s, z: nnx.merge(graphdef, s).decoder(z))
    decode_tokens = jax.jit(lambda s, t: nnx.merge(graphdef, s).decoder.decode_tokens(t))
    images_j, one_hot_j, tokens_j = jnp.asarray(images), jnp.asarray(one_hot), jnp.asarray(tokens)

    def torch_call(module, x):
        with torch.no_grad():
            return module(x)

    runs = {
        "torch_encoder": lambda: torch_call(torch_encoder, torch_images),
        "jax_encoder": lambda: encode(state, images_j),
        "torch_decoder": lambda: torch_call(torch_decoder, torch_one_hot),
        "jax_decoder": lambda: decode(state, one_hot_j),
        "jax_decode_tokens": lambda: decode_tokens(state, tokens_j),
    }
    timings = _interleaved(runs, repeats)
    # FLOPs per call from XLA's cost analysis of our programs; used for both frameworks' GFLOP/s.
    flops = {"encoder": _flops(encode, state, images_j), "decoder": _flops(decode, state, one_hot_j),
             "decode_tokens": _flops(decode_tokens, state, tokens_j)}

    figures = {}
    for name, timing in timings.items():
        figures[f"{name}_images_per_s"] = figure(batch / timing.median_s, "images/s")
        figures[f"{name}_gflops_per_s"] = figure(flops[name.split("_", 1)[1]] / timing.median_s / 1e9, "GFLOP/s")
    for part in ("encoder", "decoder"):
        figures[f"{part}_ratio_jax_over_torch"] = figure(
            timings[f"torch_{part}"].median_s / timings[f"jax_{part}"].median_s, "x (>1: ours faster)")
    figures["encoder_gflop_per_image"] = figure(flops["encoder"] / batch / 1e9, "GFLOP")
    figures["decoder_gflop_per_image"] = figure(flops["decoder"] / batch / 1e9, "GFLOP")
    if not quick:  # per-image throughput depends on the batch; batch 1 is what interactive use sees
        one_image, one_torch_image = images_j[:1], torch_images[:1]
        small = _interleaved({"torch_encoder": lambda: torch_call(torch_encoder, one_torch_image),
                              "jax_encoder": lambda: encode(state, one_image)}, repeats)
        for name, timing in small.items():
            figures[f"{name}_batch1_images_per_s"] = figure(1 / timing.median_s, "images/s")
    # The figures compare like with like only if the outputs agree.
    ours = np.asarray(encode(state, images_j)).transpose(0, 3, 1, 2)
    reference = runs["torch_encoder"]().numpy()
    figures["encoder_relative_error"] = figure(np.linalg.norm(ours - reference) / np.linalg.norm(reference), "")
    return {
        "config": {"dvae": "released architecture (n_hid 256, 4x2 blocks, vocab 8192)", "image_size": image_size,
                   "batch": batch, "repeats": repeats, "dtype": "float32", "torch_threads": threads,
                   "torch": torch.__version__, "jax_layout": "NHWC / HWIO", "torch_layout": "NCHW / OIHW"},
        "figures": figures,
        "notes": "median wall time per call after one warm-up (compilation excluded), runs interleaved "
                 "round-robin; decoder input is the one-hot code grid for both; jax_decode_tokens is our "
                 "row-lookup input path; FLOPs from XLA's cost analysis of our programs. Quick mode (64 px) is "
                 "a smoke test: at that size both frameworks are far from their 256 px throughput.",
    }
