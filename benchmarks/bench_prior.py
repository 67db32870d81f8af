"""Training throughput and MFU of our transformer prior, against DALLE-pytorch at the same dimensions.

Ours: the `bench` preset's prior (d 512, 8 layers of 8 x 64 heads, 64 text + 16x16 image tokens, vocab 16384 /
8192, the paper's sparse mask schedule) trained with the real step: `optim.make_optimizer` + `make_prior_step` on a
one-device mesh, state from `loop.init_state`, batches from `sharding.shard_batch`. Measured in fp32 and bf16
compute.

Reference: DALLE-pytorch 1.6.6 (`DALLE(dim=512, depth=8, heads=8, dim_head=64, text_seq_len=64,
num_text_tokens=16384)` over a `DiscreteVAE` with 8192 codes and a 16x16 grid, default full attention), fed image
token ids so its VAE never runs, with an AdamW step and `torch.set_num_threads(2)`. Optional: without torch or
`dalle-pytorch` the torch side is skipped, the output says so and no ratio is reported (install line:
benchmarks/README.md "Anchors").

Model FLOPs per step (tokens = batch * seq_len, seq_len = text_len + grid^2 = 320):

    6 * N_nonembedding * tokens                                  every layer parameter, fwd + bwd
  + 6 * batch * d * (text_len * text_vocab + image_len * image_vocab)   each head only on its own positions
  + 12 * n_layers * (heads * head_dim) * seq_len * tokens        QK^T and AV over the full seq_len^2

The attention term is the dense one (PaLM's MFU convention): the default "blocked" attention skips the key blocks
no layer's mask reaches (60% of the scores computed at 320 tokens), the rest of the masked entries are computed.
The cross-check is XLA's `cost_analysis()["flops"]` of the same step, lowered with the layer scan unrolled
(XLA counts a while-loop body once, so the rolled program reports about one layer); it also counts the
elementwise work (softmax, GELU, LayerNorm, AdamW, EMA) that the formula leaves out. MFU divides the model
FLOP/s at the median step time by the best matmul FLOP/s this machine reaches in `machine.measure_matmul_peak`,
measured in the same entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import math
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import numpy as np

from benchmarks import machine
from benchmarks.machine import Timing, time_fn
from benchmarks.registry import benchmark, figure

TORCH_THREADS = 2  # the task statement's reference setting for DALLE-pytorch on the 2-core machine
EMBEDDINGS = frozenset({"start_embed", "text_embed", "text_pos", "image_embed", "row_embed", "col_embed"})
HEADS = frozenset({"text_head", "image_head"})


# ------------------------------------------------------------------------------------------------ FLOPs


def nonembedding_params(params: dict[str, Any]) -> int:
    """Parameters outside the embedding tables and the output heads (the heads are counted per position)."""
    return sum(math.prod(leaf.shape) for name, value in params.items() if name not in EMBEDDINGS | HEADS
               for leaf in _leaves(value))


def _leaves(tree: Any) -> list[Any]:
    import jax

    return jax.tree.leaves(tree)


def model_flops_per_step(prior_config: Any, batch: int, n_nonembedding: int) -> dict[str, int]:
    """The formula in the module docstring, term by term; ``total`` is their sum."""
    c = prior_config
    tokens = batch * c.seq_len
    terms = {
        "layers": 6 * n_nonembedding * tokens,
        "heads": 6 * batch * c.d_model * (c.text_len * c.text_vocab_size + c.image_len * c.image_vocab_size),
        "attention": 12 * c.n_layers * c.n_heads * c.head_dim * c.seq_len * tokens,
    }
    return {**terms, "total": sum(terms.values())}


@contextlib.contextmanager
def _unrolled_scans() -> Iterator[None]:
    """Traces `lax.scan` fully unrolled, so XLA's cost analysis sees every layer instead of one loop body."""
    import jax

    with mock.patch("jax.lax.scan", functools.partial(jax.lax.scan, unroll=True)):
        yield


def xla_flops(step: Callable, state: Any, batch: Any) -> float | None:
    """XLA's FLOP count of a train step from `make_prior_step`, layers unrolled; None if it cannot be read.

    Uses the step's `lower` (loop.make_train_step), traced with every scan unrolled: only lowered, not compiled
    or run. Pass a fresh step, so the timed step's trace cache never sees the unrolling.
    """
    lower = getattr(step, "lower", None)
    if lower is None:
        return None
    with _unrolled_scans():
        analysis = lower(state, batch).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"]) if analysis and "flops" in analysis else None


# ------------------------------------------------------------------------------------------------ ours


@dataclasses.dataclass
class JaxRun:
    """The trainer's compiled step, its (donated, replaced each call) state and one sharded batch."""

    prior_config: Any
    train_config: Any
    step: Callable
    spec: Any
    state: Any
    batch: Any
    mesh: Any
    rules: Any
    metrics: Any = None

    def __call__(self) -> tuple[Any, Any]:
        self.state, self.metrics = self.step(self.state, self.batch)
        return self.state, self.metrics  # both, so the timer blocks on the whole update

    @property
    def n_params(self) -> int:
        return sum(math.prod(leaf.shape) for leaf in _leaves(self.state["params"]))

    @property
    def n_nonembedding(self) -> int:
        return nonembedding_params(self.state["params"])

    def xla_flops(self) -> float | None:
        """XLA's count for this step (a fresh one, so the timed step's trace cache never sees the unrolling)."""
        from dalle_jax.train.optim import make_optimizer
        from dalle_jax.train.prior import make_prior_step

        step = make_prior_step(self.train_config, self.prior_config, make_optimizer(self.train_config), self.spec,
                               self.mesh, self.rules, self.prior_config.text_vocab_size)
        return xla_flops(step, self.state, self.batch)


def build_jax_run(prior_config: Any, train_config: Any, seed: int = 0) -> JaxRun:
    """The trainer's step (as `train_prior` builds it) on a one-device mesh with a random token batch."""
    import jax
    from flax import nnx

    from dalle_jax import sharding
    from dalle_jax.models.prior import Prior
    from dalle_jax.sharding import MeshConfig
    from dalle_jax.train import loop
    from dalle_jax.train.optim import make_optimizer
    from dalle_jax.train.prior import make_prior_step

    mesh_config = MeshConfig(ici_parallelism=(1, 1, 1))
    mesh = sharding.make_mesh(mesh_config, devices=jax.devices()[:1])
    rules = mesh_config.rules
    optimizer = make_optimizer(train_config)
    state, spec = loop.init_state(lambda: Prior(prior_config, rngs=nnx.Rngs(train_config.seed)), optimizer, mesh,
                                  rules, train_config.seed)
    step = make_prior_step(train_config, prior_config, optimizer, spec, mesh, rules, prior_config.text_vocab_size)
    rng = np.random.default_rng(seed)
    b, c = train_config.batch_size, prior_config
    host_batch = {"text": rng.integers(0, c.text_vocab_size, (b, c.text_len), dtype=np.int32),
                  "image_tokens": rng.integers(0, c.image_vocab_size, (b, c.image_len), dtype=np.int32)}
    return JaxRun(prior_config=prior_config, train_config=train_config, step=step, spec=spec, state=state,
                  batch=sharding.shard_batch(host_batch, mesh, rules), mesh=mesh, rules=rules)


# ------------------------------------------------------------------------------------------------ DALLE-pytorch


def load_dalle_pytorch() -> tuple[Any, types.ModuleType]:
    """(torch, the `dalle_pytorch.dalle_pytorch` module); raises ImportError saying what is missing.

    The package's `__init__` imports `pkg_resources` and its `vae` module imports taming-transformers (which
    needs pytorch-lightning) and omegaconf, only for the pretrained VAE wrappers (OpenAI / VQGAN) we never use.
    So the model module is loaded on its own with a stand-in `dalle_pytorch.vae` holding just the two class
    names it checks against; the stand-ins are removed from `sys.modules` afterwards.
    """
    import torch

    spec = importlib.util.find_spec("dalle_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("dalle-pytorch is not installed: pip install --no-deps dalle-pytorch==1.6.6 "
                          "rotary-embedding-torch==0.2.3 axial-positional-embedding==0.2.1 einops==0.8.2 (and "
                          "torch==2.13.0 from the test extra)")
    package = types.ModuleType("dalle_pytorch")
    package.__path__ = list(spec.submodule_search_locations)
    vae = types.ModuleType("dalle_pytorch.vae")
    vae.OpenAIDiscreteVAE = type("OpenAIDiscreteVAE", (), {})  # unused pretrained wrappers
    vae.VQGanVAE = type("VQGanVAE", (), {})
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "dalle_pytorch"}
    sys.modules.update({"dalle_pytorch": package, "dalle_pytorch.vae": vae})
    try:
        module = importlib.import_module("dalle_pytorch.dalle_pytorch")
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == "dalle_pytorch"]:
            del sys.modules[name]
        sys.modules.update(saved)
    return torch, module


@dataclasses.dataclass
class TorchRun:
    """DALLE-pytorch forward (loss) + backward + clip + AdamW on one fixed batch of token ids."""

    torch: Any
    model: Any
    optimizer: Any
    text: Any
    image: Any
    linear_params: int  # weights of every nn.Linear the sequence passes through (transformer + logits)

    def __call__(self) -> float:
        loss = self.model(self.text, self.image, return_loss=True)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.trainable, 4.0)
        self.optimizer.step()
        return float(loss.detach())

    @property
    def trainable(self) -> list[Any]:
        return [p for p in self.model.parameters() if p.requires_grad]


def build_torch_run(prior_config: Any, batch: int, seed: int = 0) -> TorchRun:
    """DALLE-pytorch at the prior's dimensions; image tokens come from a DiscreteVAE of the same grid and vocab."""
    torch, module = load_dalle_pytorch()
    c = prior_config
    downsamplings = 3
    torch.manual_seed(seed)
    vae = module.DiscreteVAE(image_size=c.grid_size * 2**downsamplings, num_layers=downsamplings,
                             num_tokens=c.image_vocab_size, codebook_dim=c.d_model, hidden_dim=16)
    model = module.DALLE(dim=c.d_model, vae=vae, num_text_tokens=c.text_vocab_size, text_seq_len=c.text_len,
                         depth=c.n_layers, heads=c.n_heads, dim_head=c.head_dim)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=4.5e-4,
                                  betas=(0.9, 0.96), eps=1e-8, weight_decay=4.5e-2)
    rng = np.random.default_rng(seed)
    # Id 0 is DALLE-pytorch's text padding; real ids start at 1.
    text = torch.from_numpy(rng.integers(1, c.text_vocab_size, (batch, c.text_len)))
    image = torch.from_numpy(rng.integers(0, c.image_vocab_size, (batch, c.image_len)))
    linears = [m for part in (model.transformer, model.to_logits) for m in part.modules()
               if isinstance(m, torch.nn.Linear)]
    return TorchRun(torch=torch, model=model.train(), optimizer=optimizer, text=text, image=image,
                    linear_params=sum(m.weight.numel() for m in linears))


def torch_flops_per_step(run: TorchRun, prior_config: Any, batch: int) -> int:
    """Same convention as ours: every Linear on every position (its logits cover all 320), dense attention."""
    c = prior_config
    tokens = batch * c.seq_len
    return 6 * run.linear_params * tokens + 12 * c.n_layers * c.n_heads * c.head_dim * c.seq_len * tokens


# ------------------------------------------------------------------------------------------------ timing


def _interleaved(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> tuple[dict[str, Timing],
                                                                                          dict[str, float]]:
    """First call timed alone (compilation), then `warmup` untimed calls, then one timed call per run per
    round, round-robin: load from other processes that comes and goes hits every run alike."""
    first_s = {name: time_fn(fn, repeats=1, warmup=0).best_s for name, fn in runs.items()}
    for fn in runs.values():
        for _ in range(warmup):
            time_fn(fn, repeats=1, warmup=0)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name] += time_fn(fn, repeats=1, warmup=0).times_s
    return {name: Timing(tuple(values)) for name, values in times.items()}, first_s


def _load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


# ------------------------------------------------------------------------------------------------ entry


def bench_configs(quick: bool) -> tuple[Any, Any]:
    """(PriorConfig, PriorTrainConfig): the `bench` preset, or a tiny prior with the same structure."""
    from dalle_jax.config import get_preset

    config = get_preset("bench")
    prior, train = config.prior, config.prior_train
    if quick:
        prior = dataclasses.replace(prior, d_model=64, n_layers=4, n_heads=2, head_dim=32, text_len=8, grid_size=4,
                                    text_vocab_size=256, image_vocab_size=128, conv_kernel=3)
        train = dataclasses.replace(train, batch_size=2)
    return prior, train


def _torch_note(run: TorchRun, prior: Any, batch: int, our_flops: int) -> str:
    logits_width = prior.text_vocab_size + prior.text_len + prior.image_vocab_size
    ratio = torch_flops_per_step(run, prior, batch) / our_flops
    return (f"DALLE-pytorch ran: default full attention, rotary embeddings, token shift, GEGLU feed-forward (1.5x "
            f"our MLP matmuls) and one {logits_width}-way logits layer on every position, so it does {ratio:.2f}x "
            "our model FLOPs per token; its step is loss + backward + clip 4 + AdamW (no EMA).")


@benchmark("prior_train", help="train-step tokens/s and MFU of the bench prior (fp32, bf16) vs DALLE-pytorch, CPU")
def prior_train(quick: bool) -> dict[str, Any]:
    import jax

    prior, train = bench_configs(quick)
    batch, tokens = train.batch_size, train.batch_size * prior.seq_len
    repeats, warmup = (2, 0) if quick else (5, 1)
    load_before = _load_average()

    sizes, _, peak_repeats = machine.default_peak_sizes(quick)
    peaks = {dtype: machine.measure_matmul_peak(sizes, dtype, repeats=peak_repeats)
             for dtype in ("float32", "bfloat16")}

    jax_runs = {dtype: build_jax_run(dataclasses.replace(prior, compute_dtype=dtype), train)
                for dtype in ("float32", "bfloat16")}
    reference = jax_runs["float32"]
    counted = model_flops_per_step(prior, batch, reference.n_nonembedding)
    xla = reference.xla_flops()  # before any step runs: lowering reads the state's shapes, not its buffers

    runs: dict[str, Callable[[], Any]] = {f"jax_{dtype}": run for dtype, run in jax_runs.items()}
    torch_run, torch_skipped = None, ""
    try:
        torch_run = build_torch_run(prior, batch)
    except ImportError as error:
        torch_skipped = f"{type(error).__name__}: {error}"
    previous_threads = None
    if torch_run is not None:
        previous_threads = torch_run.torch.get_num_threads()
        torch_run.torch.set_num_threads(TORCH_THREADS)
        runs["torch_float32"] = torch_run
    try:
        timings, first_s = _interleaved(runs, repeats, warmup)
        torch_loss = torch_run() if torch_run is not None else None
    finally:
        if previous_threads is not None:
            torch_run.torch.set_num_threads(previous_threads)
    load_after = _load_average()

    figures: dict[str, dict[str, Any]] = {}
    for name, timing in timings.items():
        dtype = name.split("_", 1)[1]
        flops = counted["total"] if name.startswith("jax") else torch_flops_per_step(torch_run, prior, batch)
        peak = peaks[dtype]["best_flops_per_s"]
        figures[f"{name}_tokens_per_s"] = figure(tokens / timing.median_s, "tokens/s (median step)")
        figures[f"{name}_tokens_per_s_best"] = figure(tokens / timing.best_s, "tokens/s (best step)")
        figures[f"{name}_step_ms"] = figure(1e3 * timing.median_s, "ms (median)")
        figures[f"{name}_first_step_s"] = figure(first_s[name], "s (incl. compilation)" if name.startswith("jax")
                                                 else "s")
        figures[f"{name}_model_gflops_per_s"] = figure(flops / timing.median_s / 1e9, "GFLOP/s")
        figures[f"{name}_mfu"] = figure(100 * flops / timing.median_s / peak, f"% of {dtype} matmul peak")
    for dtype in ("float32", "bfloat16"):
        loss = float(jax.device_get(jax_runs[dtype].metrics["loss"]))
        figures[f"jax_{dtype}_loss"] = figure(loss, "nats (weighted text/image CE, after the timed steps)")
    jax_tokens_per_s = figures["jax_float32_tokens_per_s"]["value"]
    if torch_run is not None:
        figures["torch_float32_loss"] = figure(torch_loss, "nats (weighted text/image CE, after the timed steps)")
        figures["ratio_jax_float32_over_torch"] = figure(
            jax_tokens_per_s / figures["torch_float32_tokens_per_s"]["value"], "x tokens/s (>1: ours faster)")
        figures["ratio_jax_bfloat16_over_torch"] = figure(
            figures["jax_bfloat16_tokens_per_s"]["value"] / figures["torch_float32_tokens_per_s"]["value"],
            "x tokens/s (>1: ours faster)")
        figures["torch_model_gflop_per_step"] = figure(torch_flops_per_step(torch_run, prior, batch) / 1e9, "GFLOP")
    figures["model_gflop_per_step"] = figure(counted["total"] / 1e9, "GFLOP (formula)")
    for term in ("layers", "heads", "attention"):
        figures[f"model_gflop_per_step_{term}"] = figure(counted[term] / 1e9, "GFLOP")
    if xla is not None:
        figures["xla_gflop_per_step"] = figure(xla / 1e9, "GFLOP (cost_analysis, layers unrolled)")
        figures["xla_over_formula"] = figure(xla / counted["total"], "x")
    for dtype, peak in peaks.items():
        figures[f"peak_matmul_{dtype}_gflops"] = figure(peak["best_flops_per_s"] / 1e9,
                                                        f"GFLOP/s (best, n={peak['size']})")

    torch_note = _torch_note(torch_run, prior, batch, counted["total"]) if torch_run else \
        f"DALLE-pytorch NOT MEASURED ({torch_skipped}): no ratio (benchmarks/README.md 'Anchors' installs it)."
    return {
        "config": {
            "preset": "bench (tiny stand-in)" if quick else "bench", "d_model": prior.d_model,
            "n_layers": prior.n_layers, "heads": f"{prior.n_heads}x{prior.head_dim}", "seq_len": prior.seq_len,
            "text_len": prior.text_len, "grid": f"{prior.grid_size}x{prior.grid_size}",
            "vocab": f"{prior.text_vocab_size}/{prior.image_vocab_size}", "attention": prior.attention,
            "attention_impl": prior.attention_impl, "remat": prior.remat,
            "batch": batch, "tokens_per_step": tokens, "timed_steps": repeats, "warmup_steps": 1 + warmup,
            "params": reference.n_params, "params_nonembedding": reference.n_nonembedding,
            "torch_params_trainable": sum(p.numel() for p in torch_run.trainable) if torch_run else "not run",
            "torch_threads": TORCH_THREADS if torch_run else "not run",
            "mesh": "1 device", "jax_device": str(jax.devices()[0].device_kind),
            "load_average_before": load_before, "load_average_after": load_after,
        },
        "figures": figures,
        "notes": "Median wall time per step after the first (compiling) step and warm-up, runs interleaved "
                 "round-robin. Model FLOPs = 6 * N_nonembedding * tokens + 6 * batch * d * (text_len * "
                 "text_vocab + image_len * image_vocab) + 12 * n_layers * heads * head_dim * seq_len * tokens "
                 "(dense attention, PaLM's convention; at the bench size the blocked attention computes 60% of them). "
                 "xla_gflop_per_step is "
                 "XLA's cost_analysis of the same step with the layer scan unrolled; it adds elementwise work. "
                 "MFU = model FLOP/s at the median step / best measured matmul FLOP/s of the dtype; torch MFU "
                 "uses the JAX-measured fp32 matmul peak. " + torch_note,
    }
