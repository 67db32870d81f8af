"""`dalle-jax aot`: compile the prior's real train step (or its sampling steps) for a TPU slice, on a CPU host.

Nothing is allocated and no TPU is needed: libtpu (`pip install -e ".[tpu]"`) describes the slice
(`jax.experimental.topologies`), the config's mesh is laid over those compile-only devices, the train state and
the batch are sharded `ShapeDtypeStruct`s (`loop.state_spec`, the layout `loop.init_state` would build), and the
jitted step from `prior.make_prior_step` is lowered and compiled for the slice. XLA then reports, per chip:

* memory (`compiled.memory_analysis()`): arguments (state + batch), outputs, the donated part of the outputs that
  reuses the arguments' buffers (alias), temporaries (activations, gathered weights, gradients in flight) and the
  program itself. Per-chip total = arguments + outputs - alias + temporaries + code, compared with the chip's HBM.
  A program that cannot fit fails to compile (RESOURCE_EXHAUSTED); that is reported as "does not fit".
* cost (`compiled.cost_analysis()`): FLOPs and HBM bytes accessed. XLA counts the body of a while loop once,
  and the layers run under `lax.scan` (forward, and again in the backward pass), so the 64-layer step's raw count
  is about that of a 1-layer model. We therefore also compile the same step with 1 and 2 layers and every scan
  unrolled (cheap: two small programs), take the per-layer cost as the difference and extrapolate linearly,
  cost(L) = cost(1) + (L - 1) * (cost(2) - cost(1)); `tests/test_aot.py` checks that against a fully unrolled
  compile of a 4-layer model.

The estimated step time is a roofline lower bound, max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth) per
chip, with no time for inter-chip communication (ICI/DCN collectives), so the MFU implied by it is an upper bound.
Model FLOPs are 6 * N * tokens over the weights each token multiplies (the blocks plus its one head; embeddings
are lookups) plus dense attention 12 * layers * heads * head_dim * seq_len per token, whatever the attention.

Pallas kernels (`prior.attention_impl=splash`) are custom calls, which XLA's cost analysis does not look into:
the report lists the kernels found in the compiled program by name, and adds to the counted FLOPs an estimate
of the splash kernels' own (the tiles their masks show, see `splash_train_flops`).

    JAX_PLATFORMS=cpu dalle-jax aot --preset paper_12b --topology v4-256 --mesh 1,-1,1
    JAX_PLATFORMS=cpu dalle-jax aot --preset paper_12b --topology v5e-8 --mode sample --batch 8
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import re
import time
from collections.abc import Iterator
from typing import Any
from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx

from dalle_jax import sharding
from dalle_jax.config import Config
from dalle_jax.errors import DalleJaxError
from dalle_jax.models import splash
from dalle_jax.models.prior import Prior, PriorConfig
from dalle_jax.sampling import sampler
from dalle_jax.sharding import MESH_AXES

GIB = 1024**3
_RAW_NOTE = "layers not counted (--no-count): FLOPs and bytes are XLA's raw counts, one layer's worth"


class AOTError(DalleJaxError, RuntimeError):
    """AOT compilation cannot start (no libtpu, unknown topology); the message says what to do."""


# --------------------------------------------------------------------------------------------------
# Chips and topologies

@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU generation. Figures per chip from the Cloud TPU system-architecture pages (TPU v4, v5e, v5p, v6e):
    HBM capacity as published (v4 32 GiB; v5e 16, v5p 95, v6e 32 "GB", taken as GiB here), peak dense bf16
    FLOP/s and HBM bandwidth. The verdict against this table is a second check: the TPU compiler itself refuses
    a program that exceeds the HBM it knows for the chip (RESOURCE_EXHAUSTED), which is reported as not fitting."""

    family: str  # the name users type: v4, v5e, v5p, v6e
    prefix: str  # libtpu's topology prefix: "v5:4x4x8" is a v5p slice
    hbm_gib: float
    peak_tflops: float  # bf16
    hbm_tb_per_s: float
    cores_per_chip: int  # v4 and v5p slice names count TensorCores (2 per chip); v5e and v6e count chips
    dims: int  # 3D torus (v4, v5p) or 2D (v5e, v6e)
    megacore: bool


CHIPS = {
    "v4": Chip("v4", "v4", 32, 275, 1.2, 2, 3, True),
    "v5e": Chip("v5e", "v5e", 16, 197, 0.82, 1, 2, False),
    "v5p": Chip("v5p", "v5", 95, 459, 2.76, 2, 3, True),
    "v6e": Chip("v6e", "v6e", 32, 918, 1.64, 1, 2, False),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p", "v6": "v6e"}

# The standard slice shapes by chip count (Cloud TPU docs' topology tables); others can be given as v4:AxBxC.
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
              192: (4, 4, 12), 256: (4, 8, 8), 384: (4, 8, 12), 512: (8, 8, 8), 768: (8, 8, 12),
              1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16), 6144: (16, 16, 24)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice as libtpu names it, e.g. v4-256 -> "v4:4x4x8" (128 chips, 32 hosts of 2x2x1)."""

    name: str  # as given
    chip: Chip
    shape: tuple[int, ...]  # chips along each torus axis
    num_slices: int = 1

    @property
    def chips(self) -> int:
        return math.prod(self.shape) * self.num_slices

    @property
    def topology_name(self) -> str:
        return f"{self.chip.prefix}:{'x'.join(map(str, self.shape))}"

    def options(self) -> dict[str, Any]:
        """libtpu's topology options: chip config, chips per host, wrap-around links (full cubes and tori)."""
        if self.chip.dims == 3:
            per_host = (2, 2, 1) if math.prod(self.shape) >= 4 else tuple(self.shape)
            wrap = (math.prod(self.shape) >= 64,) * 3  # a 4x4x4 cube and larger are tori
            options = {"chip_config_name": "megacore" if self.chip.megacore else "default"}
        else:
            chips, (rows, cols) = math.prod(self.shape), self.shape
            # 8 chips (2x4) per v5e/v6e host; smaller slices are one host
            per_host = ((2, 4, 1) if rows % 2 == 0 and cols % 4 == 0 else (2, 2, 1) if rows % 2 == cols % 2 == 0
                        else (rows, cols, 1)) if chips >= 8 else (rows, cols, 1)
            wrap = {128: (False, True, False), 256: (True, True, False)}.get(chips, (False, False, False))
            options = {}
        options.update(chips_per_host_bounds=per_host, wrap=wrap)
        if self.num_slices > 1:
            options["num_slices"] = self.num_slices
        return options


def parse_topology(name: str, num_slices: int = 1) -> Topology:
    """Parses "v4-256" (TensorCores), "v5p-256", "v5e-256" / "v5litepod-256" / "v6e-256" (chips), or "v4:4x4x8"."""
    text = name.strip().lower()
    families = ", ".join(sorted(CHIPS))
    if ":" in text:
        family, dims = text.split(":", 1)
        family = _ALIASES.get(family, family)
        try:
            shape = tuple(int(d) for d in dims.split("x"))
        except ValueError:
            shape = ()
        if family not in CHIPS or len(shape) != CHIPS[family].dims or min(shape, default=0) < 1:
            raise AOTError(f"topology '{name}': expected e.g. v4:4x4x8, v5p:4x4x8, v5e:16x16 or v6e:16x16")
        return Topology(name, CHIPS[family], shape, num_slices)
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
    if not match:
        raise AOTError(f"topology '{name}': expected <family>-<size> with family one of {families} "
                       f"(e.g. v4-256, v5p-256, v5e-256) or an explicit shape such as v4:4x4x8")
    family, size = _ALIASES.get(match[1], match[1]), int(match[2])
    if family not in CHIPS:
        raise AOTError(f"topology '{name}': unknown TPU family '{match[1]}'; known: {families} (v5litepod = v5e)")
    chip = CHIPS[family]
    if size % chip.cores_per_chip:
        raise AOTError(f"topology '{name}': {family} slice names count TensorCores, {chip.cores_per_chip} per chip")
    chips = size // chip.cores_per_chip
    shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
    if chips not in shapes:
        raise AOTError(f"topology '{name}' ({chips} chips): no standard {family} shape known for it; give one "
                       f"explicitly, e.g. {chip.prefix}:{'x'.join(map(str, shapes[max(shapes)]))}")
    return Topology(name, chip, shapes[chips], num_slices)


def libtpu_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        try:
            return metadata.version("libtpu-nightly")
        except metadata.PackageNotFoundError:
            return None


def topology_devices(topology: Topology) -> list[Any]:
    """The slice's compile-only devices (they can compile for, never run on, the slice)."""
    from jax.experimental import topologies

    if libtpu_version() is None:
        raise AOTError("AOT compilation for TPU needs libtpu: pip install -e '.[tpu]' (in its own environment on "
                       "a CPU machine, and run with JAX_PLATFORMS=cpu)")
    # libtpu takes a machine-wide lock when it loads (/tmp/libtpu_lockfile), meant for processes that drive the
    # chips; compile-only devices drive nothing, so several AOT runs (or one beside a training job) may load it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        description = topologies.get_topology_desc(topology_name=topology.topology_name, platform="tpu",
                                                   **topology.options())
    except Exception as error:  # libtpu raises XlaRuntimeError / RuntimeError with its own message
        raise AOTError(f"libtpu could not describe topology {topology.topology_name} "
                       f"{topology.options()}: {error}") from error
    return list(description.devices)


def topology_mesh(config: Config, topology: Topology) -> jax.sharding.Mesh:
    """The config's (data, fsdp, tensor) mesh (ICI within a slice, DCN across slices, one -1 filled)."""
    return sharding.make_mesh(config.mesh, topology_devices(topology))


# --------------------------------------------------------------------------------------------------
# Reports

@dataclasses.dataclass
class Compiled:
    """What XLA said about one compiled program, per chip."""

    name: str
    compile_s: float
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    peak_bytes: int = 0  # XLA's peak_memory_in_bytes where reported (0 otherwise); not the verdict's total
    argument_unpadded_bytes: int = 0  # the arguments' shards at their logical shapes (see _argument_sizes)
    argument_tiled_bytes: int = 0  # the same padded to their TPU tiles
    xla_flops: float = 0.0  # raw cost analysis: loop bodies counted once
    xla_bytes: float = 0.0
    flops: float = 0.0  # with the layers counted L times (see the module doc)
    bytes_accessed: float = 0.0
    error: str = ""  # the compiler's message when it did not compile (e.g. out of HBM)
    kernels: dict[str, int] = dataclasses.field(default_factory=dict)  # Pallas TPU kernels (custom calls) by name
    kernel_flops: float = 0.0  # estimated FLOPs inside those kernels (XLA counts none); included in `flops`

    @property
    def total_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


@dataclasses.dataclass
class Report:
    mode: str  # train | sample
    preset: str
    topology: str
    topology_name: str
    chip: Chip
    chips: int
    mesh: dict[str, int]
    batch: int
    batch_shards: int  # the data-parallel size the batch is split over
    tokens: int  # per sequence (train) or cache length (sample)
    compute_dtype: str
    remat: str
    params: int
    programs: list[Compiled]
    model_flops: list[float]  # per program, whole slice
    libtpu: str | None
    jax: str
    date: str
    notes: list[str] = dataclasses.field(default_factory=list)
    layers_counted: bool = True  # False (--no-count): FLOPs/bytes are one layer's, so no step time is estimated

    @property
    def hbm_bytes(self) -> float:
        return self.chip.hbm_gib * GIB

    @property
    def fits(self) -> bool:
        return all(not p.error and p.total_bytes <= self.hbm_bytes for p in self.programs)

    def step_time(self, program: Compiled) -> tuple[float, float]:
        """(compute-bound, memory-bound) seconds per chip; the estimate is their max."""
        compute = program.flops / (self.chip.peak_tflops * 1e12)
        return compute, program.bytes_accessed / (self.chip.hbm_tb_per_s * 1e12)

    def mfu(self, index: int) -> float:
        estimate = max(self.step_time(self.programs[index]))
        peak = self.chips * self.chip.peak_tflops * 1e12
        return self.model_flops[index] / (peak * estimate) if estimate else 0.0

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["fits"] = self.fits
        for program, data in zip(self.programs, out["programs"], strict=True):
            data["total_bytes"] = program.total_bytes
            if not program.error:
                compute, memory = self.step_time(program)
                data.update(compute_s=compute, memory_s=memory, step_s=max(compute, memory))
        out["mfu"] = [self.mfu(i) if not p.error else None for i, p in enumerate(self.programs)]
        return out

    def format(self) -> str:
        c = self.chip
        size = f"{self.params / 1e9:.2f} B" if self.params >= 1e8 else f"{self.params / 1e6:.2f} M"
        mesh = " x ".join(f"{axis} {size}" for axis, size in self.mesh.items())
        what = (f"global batch {self.batch} x {self.tokens} tokens ({self.batch // self.batch_shards} sequences per "
                 f"data-parallel shard)"
                if self.mode == "train" else f"batch {self.batch}, KV cache of {self.tokens} positions")
        lines = [
            f"{self.preset} {self.mode} on {self.topology} ({self.topology_name}, {self.chips} chips of TPU "
            f"{c.family}: {c.hbm_gib:g} GiB HBM, {c.peak_tflops:g} TFLOP/s bf16, {c.hbm_tb_per_s:g} TB/s)",
            f"  prior {size} parameters, {self.compute_dtype} compute, remat {self.remat}; "
            f"mesh {mesh}; {what}",
            f"  libtpu {self.libtpu}, jax {self.jax}, {self.date}",
        ]
        for index, p in enumerate(self.programs):
            lines.append("")
            if p.error:
                lines += [f"  {p.name}: DOES NOT FIT / did not compile (after {p.compile_s:.1f} s):",
                          *(f"    {line}" for line in p.error.splitlines()[:6])]
                continue
            compute, memory = self.step_time(p)
            share = p.total_bytes / self.hbm_bytes
            verdict = "fits" if p.total_bytes <= self.hbm_bytes else "DOES NOT FIT"
            lines += [
                f"  {p.name}: compiled in {p.compile_s:.1f} s on this host",
                "    memory per chip              GiB",
                f"      arguments              {p.argument_bytes / GIB:9.3f}"
                + (f"   ({p.argument_unpadded_bytes / GIB:.3f} before TPU tile padding)"
                   if p.argument_unpadded_bytes else ""),
                f"      outputs                {p.output_bytes / GIB:9.3f}",
                f"      aliased (donated)      {-p.alias_bytes / GIB:9.3f}",
                f"      temporaries            {p.temp_bytes / GIB:9.3f}",
                f"      generated code         {p.code_bytes / GIB:9.3f}",
                f"      total                  {p.total_bytes / GIB:9.3f}   of {c.hbm_gib:g} GiB: {verdict} "
                f"({share:.0%})",
            ]
            if p.peak_bytes:
                lines.append(f"      (peak_memory_in_bytes  {p.peak_bytes / GIB:9.3f}: XLA's figure, not used here)")
            lines += [
                "    per chip                       layers counted   XLA raw (loop bodies once)",
                f"      FLOPs                      {p.flops:14.4g}   {p.xla_flops:14.4g}",
                f"      HBM bytes accessed         {p.bytes_accessed:14.4g}   {p.xla_bytes:14.4g}",
            ]
            if p.kernel_flops:
                lines.append(f"      of the FLOPs, in kernels   {p.kernel_flops:14.4g}   (estimated: XLA does not "
                             f"count inside custom calls)")
            if p.kernels:
                lines.append("    Pallas kernels               " + ", ".join(f"{name} x{n}"
                                                                           for name, n in p.kernels.items()))
            lines.append(f"    model FLOPs (whole slice)    {self.model_flops[index]:14.4g}   "
                         f"({self.model_flops[index] / self.chips:.4g} per chip)")
            if not self.layers_counted:  # one layer's FLOPs: a step time from them would be meaningless
                lines.append("    estimated time               not estimated (--no-count: one layer's FLOPs)")
            else:
                lines += [f"    estimated time               {max(compute, memory) * 1e3:11.2f} ms   = max(compute "
                          f"{compute * 1e3:.2f} ms, HBM {memory * 1e3:.2f} ms); no ICI/DCN time",
                          f"    MFU at that time             {self.mfu(index):11.1%}"]
        lines += [""] + [f"  note: {n}" for n in self.notes]
        lines.append(f"  => {'fits' if self.fits else 'DOES NOT FIT'} in {c.hbm_gib:g} GiB per chip")
        return "\n".join(lines)


def _memory(compiled: Any, program: Compiled) -> None:
    stats = compiled.memory_analysis()
    if stats is None:
        return
    program.argument_bytes = int(stats.argument_size_in_bytes)
    program.output_bytes = int(stats.output_size_in_bytes)
    program.alias_bytes = int(stats.alias_size_in_bytes)
    program.temp_bytes = int(stats.temp_size_in_bytes)
    program.code_bytes = int(stats.generated_code_size_in_bytes)
    program.peak_bytes = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)


def _argument_sizes(lowered: Any, compiled: Any) -> tuple[int, int]:
    """Per-chip bytes of the arguments' shards as logical shapes, and padded to the TPU tiles XLA laid them out in.

    A TPU array's two most minor dimensions are stored in tiles (8 x 128 for 32-bit values), so a shard whose
    minor dimension is 31 wide (3968 / 128 under FSDP) occupies 128 columns. Returns (0, 0) if the compiled
    program does not expose its layouts.
    """
    try:
        infos = jax.tree.leaves(lowered.args_info)
        formats = jax.tree.leaves(compiled.input_formats, is_leaf=lambda x: hasattr(x, "layout"))
        shardings = jax.tree.leaves(compiled.input_shardings)
        if not len(infos) == len(formats) == len(shardings):
            return 0, 0
        unpadded = tiled = 0
        for info, fmt, where in zip(infos, formats, shardings, strict=True):
            shard = list(where.shard_shape(info.shape))
            itemsize = jnp.dtype(info.dtype).itemsize
            unpadded += math.prod(shard) * itemsize
            layout = fmt.layout
            if layout is not None and layout.tiling and shard:
                order, tile = list(layout.major_to_minor), layout.tiling[0]
                count = min(len(tile), len(order))
                for dim, size in zip(order[len(order) - count:], tile[len(tile) - count:], strict=True):
                    shard[dim] = -(-shard[dim] // size) * size
            tiled += math.prod(shard) * itemsize
        return unpadded, tiled
    except (AttributeError, TypeError, ValueError):
        return 0, 0


def _cost(compiled: Any) -> tuple[float, float]:
    analysis = compiled.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    analysis = analysis or {}
    return float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))


def _is_out_of_memory(error: Exception) -> bool:
    message = str(error).lower()
    return "resource_exhausted" in message or "hbm" in message or "out of memory" in message


def _compile(name: str, lower: Any) -> Compiled:
    """Lowers and compiles; an out-of-memory compile becomes a Compiled with its error, others raise."""
    start = time.perf_counter()
    try:
        lowered = lower()
        compiled = lowered.compile()
    except Exception as error:  # XlaRuntimeError
        if not _is_out_of_memory(error):
            raise
        return Compiled(name, time.perf_counter() - start, error=str(error).strip())
    program = Compiled(name, time.perf_counter() - start)
    _memory(compiled, program)
    program.argument_unpadded_bytes, program.argument_tiled_bytes = _argument_sizes(lowered, compiled)
    program.xla_flops, program.xla_bytes = _cost(compiled)
    program.kernels = _pallas_kernels(compiled)
    return program


def _pallas_kernels(compiled: Any) -> dict[str, int]:
    """Pallas (Mosaic) TPU kernels in the compiled program: custom calls to tpu_custom_call, counted by name
    (the kernel's name, e.g. splash_mha_fwd_residuals; a kernel inside the layer loop is counted once)."""
    try:
        text = compiled.as_text()
    except Exception:  # some backends or versions cannot print the program
        return {}
    counts: dict[str, int] = {}
    for match in re.finditer(r'%([\w.\-]+) = [^\n]*custom-call\([^\n]*custom_call_target="tpu_custom_call"', text):
        name = re.sub(r"\.\d+$", "", match[1])
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


@contextlib.contextmanager
def _unrolled_scans() -> Iterator[None]:
    """Traces every `jax.lax.scan` fully unrolled (the layer loops, microbatches), so cost analysis sees it all."""
    with mock.patch("jax.lax.scan", functools.partial(jax.lax.scan, unroll=True)):
        yield


def _count_layers(config: Config, program: Compiled, cost_of: Any) -> None:
    """Fills program.flops / bytes_accessed by extrapolating 1- and 2-layer unrolled compiles to n_layers."""
    costs = []
    for layers in (1, 2):
        small = dataclasses.replace(config, prior=dataclasses.replace(config.prior, n_layers=layers))
        with _unrolled_scans():
            costs.append(cost_of(small))
    (flops_1, bytes_1), (flops_2, bytes_2) = costs
    extra = config.prior.n_layers - 1
    program.flops = flops_1 + extra * (flops_2 - flops_1)
    program.bytes_accessed = bytes_1 + extra * (bytes_2 - bytes_1)


# --------------------------------------------------------------------------------------------------
# Model FLOPs

def forward_flops(p: PriorConfig, queries: int, keys: int, text_queries: int, image_queries: int) -> float:
    """Matmul FLOPs of one forward pass of one sequence: `queries` positions attending over `keys` positions,
    of which `text_queries` / `image_queries` go through the text / image head."""
    inner = p.n_heads * p.head_dim
    block = 4 * p.d_model * inner + 2 * p.mlp_ratio * p.d_model**2  # wq wk wv wo + w1 w2
    dense = p.n_layers * block * queries + p.d_model * (p.text_vocab_size * text_queries
                                                         + p.image_vocab_size * image_queries)
    attention = 2 * p.n_layers * queries * keys * inner  # QK^T and PV, dense over the keys
    return 2.0 * (dense + attention)


def splash_train_flops(p: PriorConfig, batch: int) -> float:
    """FLOPs inside the splash kernels of one train step (whole slice), which XLA's cost analysis does not see.

    Per head, layer and tile the kernels compute (`splash.block_stats`: the tiles each layer's mask shows),
    2 x block^2 x head_dim per matmul: QK^T and PV forward, three in the dq kernel (QK^T again, dO V^T, dS K),
    four in the dkv kernel (QK^T, P^T dO, dO V^T, dS^T Q), and the forward again when remat recomputes it.
    """
    tiles = splash.block_stats(p)["schedule"]["blocks"]
    matmuls = 2 + 3 + 4 + (2 if p.remat != "none" else 0)
    return 2.0 * batch * p.n_heads * tiles * p.splash_block**2 * p.head_dim * matmuls


def train_model_flops(p: PriorConfig, batch: int) -> float:
    """6 N tokens + 12 L H D S per token: forward once, backward twice (remat recomputation not counted)."""
    return 3.0 * batch * forward_flops(p, p.seq_len, p.seq_len, p.text_len, p.image_len)


# --------------------------------------------------------------------------------------------------
# Train step

def _with_batch(config: Config, batch: int | None) -> Config:
    if batch is None:
        return config
    return dataclasses.replace(config, prior_train=dataclasses.replace(config.prior_train, batch_size=batch))


def _train_program(config: Config, mesh: jax.sharding.Mesh) -> Any:
    """A function that lowers `make_prior_step`'s jitted step for abstract, sharded state and batch."""
    from dalle_jax.train import loop, optim, prior

    cfg, model_cfg, rules = config.prior_train, config.prior, config.mesh.rules
    sharding.check_batch(cfg.batch_size // cfg.microbatches, mesh, rules)
    optimizer = optim.make_optimizer(cfg)
    spec = loop.state_spec(lambda: Prior(model_cfg, rngs=nnx.Rngs(cfg.seed)), optimizer, mesh, rules, cfg.seed)
    step = prior.make_prior_step(cfg, model_cfg, optimizer, spec, mesh, rules, model_cfg.text_vocab_size)
    shapes = {"text": (cfg.batch_size, model_cfg.text_len), "image_tokens": (cfg.batch_size, model_cfg.image_len)}
    batch = {name: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.named_sharding(
        mesh, sharding.batch_axes(len(shape)), rules, shape, "batch")) for name, shape in shapes.items()}
    return lambda: step.lower(spec.abstract, batch)


def compile_train_step(config: Config, topology: str | Topology, batch: int | None = None, *,
                       count_layers: bool = True) -> Report:
    """AOT-compiles the prior's train step of `config` for `topology`; memory and cost per chip.

    `batch` overrides the preset's global batch (prior_train.batch_size). `count_layers` adds the two small
    compiles that count every layer's FLOPs and bytes (see the module doc); without it those are the raw counts.
    """
    topology = parse_topology(topology) if isinstance(topology, str) else topology
    config = _with_batch(config, batch)
    mesh = topology_mesh(config, topology)
    program = _compile("train step", _train_program(config, mesh))
    notes = ["XLA's cost analysis counts a while loop's body once; 'layers counted' extrapolates compiles of the "
             "same step with 1 and 2 layers, all scans unrolled, to the model's layers"]
    if not program.error:
        if count_layers:
            def cost_of(small: Config) -> tuple[float, float]:
                return _cost(_train_program(small, mesh)().compile())

            _count_layers(config, program, cost_of)
        else:
            program.flops, program.bytes_accessed = program.xla_flops, program.xla_bytes
            notes[0] = _RAW_NOTE
        if program.kernels and config.prior.attention_impl == "splash" and count_layers:
            program.kernel_flops = splash_train_flops(config.prior, config.prior_train.batch_size) / _split_over(
                mesh, config.mesh.rules)
            program.flops += program.kernel_flops
            notes.append("attention: splash kernels; their FLOPs are estimated from the tiles the masks show "
                         "(XLA's cost analysis does not count inside custom calls, and its HBM bytes do not follow "
                         "the kernels' own tile reads)")
    cfg = config.prior_train
    if cfg.microbatches > 1:
        notes.append(f"{cfg.microbatches} microbatches of {cfg.batch_size // cfg.microbatches}")
    return _report("train", config, topology, mesh, [program], [train_model_flops(config.prior, cfg.batch_size)],
                   cfg.batch_size, config.prior.seq_len, notes, count_layers)


def _split_over(mesh: jax.sharding.Mesh, rules: Any) -> int:
    """Chips the splash kernels' batch x heads work is split over (the shard_map's mesh axes)."""
    spec = sharding.logical_to_spec(splash.SHARDED_AXES, rules)
    names = [n for entry in spec if entry is not None for n in ((entry,) if isinstance(entry, str) else entry)]
    return math.prod(mesh.shape[n] for n in names)


def _report(mode: str, config: Config, topology: Topology, mesh: jax.sharding.Mesh, programs: list[Compiled],
            model_flops: list[float], batch: int, tokens: int, notes: list[str], layers_counted: bool) -> Report:
    from dalle_jax.models.prior import count_params

    slices = f"{topology.num_slices} x " if topology.num_slices > 1 else ""
    return Report(mode=mode, preset=config.name, topology=topology.name, topology_name=slices + topology.topology_name,
                  chip=topology.chip, chips=topology.chips, mesh={a: int(mesh.shape[a]) for a in MESH_AXES},
                  batch=batch, batch_shards=sharding.data_parallel_size(mesh, config.mesh.rules), tokens=tokens,
                  compute_dtype=config.prior.compute_dtype, remat=config.prior.remat,
                  params=count_params(config.prior), programs=programs, model_flops=model_flops,
                  libtpu=libtpu_version(), jax=jax.__version__, date=time.strftime("%Y-%m-%d"), notes=notes,
                  layers_counted=layers_counted)


# --------------------------------------------------------------------------------------------------
# Sampling steps

def _sample_programs(config: Config, mesh: jax.sharding.Mesh, batch: int) -> tuple[Any, Any]:
    """Lowering functions for one prefill ([start | caption] into an empty cache) and one cached decode step."""
    model_cfg, rules = config.prior, config.mesh.rules
    sharding.check_batch(batch, mesh, rules)
    with nnx.use_eager_sharding(False):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Prior(model_cfg, rngs=nnx.Rngs(0))), nnx.Param)
    param_shardings = sharding.state_shardings(abstract, mesh, rules).to_pure_dict()
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract.to_pure_dict(),
                          param_shardings)
    shape = sampler.cache_shape(model_cfg, batch)
    cache_sharding = sharding.named_sharding(mesh, sampler.CACHE_AXES, rules, shape, "KV cache")
    dtype = jnp.dtype(model_cfg.compute_dtype)
    cache = [{name: jax.ShapeDtypeStruct(shape, dtype, sharding=cache_sharding) for name in ("k", "v")}
             for _ in range(model_cfg.n_layers)]

    def batched(shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.named_sharding(
            mesh, sharding.batch_axes(len(shape)), rules, shape, "sampler input"))

    logits_sharding = sharding.named_sharding(mesh, ("batch", "vocab"), rules)
    replicated = sharding.named_sharding(mesh, None, rules)

    # The sampler's own prefill and decode-step functions, each followed by the image head as the sampler applies it.
    def prefill(params, cache, text):  # text (B, T) -> image-token-0 logits (B, V), cache
        model = nnx.merge(graphdef, nnx.State(params))
        h, cache = sampler.prefill(model, cache, text, jnp.zeros((text.shape[0], 1), text.dtype))
        return model.image_logits(h[:, -1:])[:, 0].astype(jnp.float32), cache

    def decode(params, cache, token, position):  # token (B,) at `position` -> next logits (B, V), cache
        model = nnx.merge(graphdef, nnx.State(params))
        h, cache = sampler.decode_step(model, cache, token, position)
        return model.image_logits(h)[:, 0].astype(jnp.float32), cache

    # Inputs keep the shardings their ShapeDtypeStructs carry; the cache is donated, as in the sampler.
    out = (logits_sharding, [{"k": cache_sharding, "v": cache_sharding}] * model_cfg.n_layers)
    jit_prefill = jax.jit(prefill, out_shardings=out, donate_argnums=1)
    jit_decode = jax.jit(decode, out_shardings=out, donate_argnums=1)

    def lowering(jitted, *args):
        def lower():
            with jax.set_mesh(mesh), sharding.axis_rules(rules):
                return jitted.lower(*args)
        return lower

    text = batched((batch, model_cfg.text_len))
    position = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return (lowering(jit_prefill, params, cache, text),
            lowering(jit_decode, params, cache, batched((batch,)), position))


def compile_sample_step(config: Config, topology: str | Topology, batch: int | None = None, *,
                        count_layers: bool = True) -> Report:
    """AOT-compiles one prefill and one cached decode step of the sampler for `topology`.

    `batch` is the number of sequences decoded together (default: the data-parallel size, one per shard); with
    classifier-free guidance the sampler runs 2x the samples. The cache is seq_len long, in the compute dtype,
    sharded by the logical rules (batch -> data/fsdp, heads -> tensor); params are the trained fp32 ones.
    """
    topology = parse_topology(topology) if isinstance(topology, str) else topology
    mesh = topology_mesh(config, topology)
    batch = batch or sharding.data_parallel_size(mesh, config.mesh.rules)
    lower_prefill, lower_decode = _sample_programs(config, mesh, batch)
    programs = [_compile("prefill", lower_prefill), _compile("decode step", lower_decode)]
    p = config.prior
    for index, program in enumerate(programs):
        if program.error:
            continue
        if count_layers:
            def cost_of(small: Config, index: int = index) -> tuple[float, float]:
                return _cost(_sample_programs(small, mesh, batch)[index]().compile())

            _count_layers(config, program, cost_of)
        else:
            program.flops, program.bytes_accessed = program.xla_flops, program.xla_bytes
    model_flops = [batch * forward_flops(p, p.text_len + 1, p.seq_len, 0, 1),
                   batch * forward_flops(p, 1, p.seq_len, 0, 1)]
    counted = ("XLA's cost analysis counts a while loop's body once; 'layers counted' extrapolates 1- and 2-layer "
               "unrolled compiles")
    notes = [counted if count_layers else _RAW_NOTE,
             "a full sample is one prefill + image_len - 1 decode steps (the sampler runs them in one program); "
             "attention is dense over the whole cache"]
    return _report("sample", config, topology, mesh, programs, model_flops, batch, p.seq_len, notes, count_layers)
