"""What machine a benchmark ran on, and what that machine can do at best.

Figures mean little without the machine beside them, so every run records the hardware and software it ran
on (never the hostname) and measures two ceilings: dense matmul FLOP/s (fp32, bf16) and memory bandwidth.
An entry's throughput can then be read as a fraction of what this machine reaches on the simplest kernels.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MIB = 1 << 20

# Sizes per backend: CPU matmuls at 4096 already take about a second on two cores; accelerators need
# bigger problems before launch overhead stops dominating.
_CPU_MATMUL_SIZES = {"quick": (512, 1024), "full": (1024, 2048, 4096)}
_ACCEL_MATMUL_SIZES = {"quick": (1024, 4096), "full": (2048, 4096, 8192)}
_CPU_BANDWIDTH_MIB = {"quick": 32, "full": 256}
_ACCEL_BANDWIDTH_MIB = {"quick": 256, "full": 1024}
_REPEATS = {"quick": 3, "full": 10}


# ----------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of each timed call (warm-up calls excluded)."""

    times_s: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def best_s(self) -> float:
        return min(self.times_s)

    def as_dict(self) -> dict[str, Any]:
        return {"median_s": self.median_s, "best_s": self.best_s, "repeats": len(self.times_s)}


def time_fn(
    fn: Callable[[], Any],
    *,
    repeats: int,
    warmup: int = 1,
    clock: Callable[[], float] = time.perf_counter,
) -> Timing:
    """Times ``fn()`` ``repeats`` times after ``warmup`` untimed calls (compilation, page faults).

    JAX dispatches asynchronously, so each call's result is blocked on (``jax.block_until_ready`` walks any
    pytree and leaves non-JAX values alone); otherwise we would time the dispatch, not the work.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = clock()
        jax.block_until_ready(fn())
        times.append(clock() - start)
    return Timing(tuple(times))


# ---------------------------------------------------------------------------------------------- machine


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _device_memory_bytes(device: jax.Device) -> int | None:
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory stats raise various errors
        return None
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def machine_info() -> dict[str, Any]:
    """Hardware and software this process runs on; deliberately hostname-free."""
    device = jax.local_devices()[0]
    usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cpu_logical_cores": os.cpu_count(),
        "cpu_usable_cores": usable_cores,
        "memory_bytes": _memory_bytes(),
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": _package_version("jaxlib"),
        "flax": _package_version("flax"),
        "numpy": np.__version__,
        "jax_backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
        "process_count": jax.process_count(),
        "device_memory_bytes": _device_memory_bytes(device),
        # These change what "a device" means (e.g. simulated CPU devices), so they belong with the figures.
        "env": {key: os.environ.get(key, "") for key in ("JAX_PLATFORMS", "XLA_FLAGS", "GLIBC_TUNABLES")},
    }


# ------------------------------------------------------------------------------------------------ peaks


def matmul_flops(m: int, k: int, n: int) -> int:
    """FLOPs of an (m, k) @ (k, n) matmul: one multiply and one add per (row, column, inner) triple."""
    return 2 * m * k * n


def add_one_bytes(nbytes: int) -> int:
    """Memory traffic of ``y = x + 1`` over an ``nbytes`` array: ``x`` read once, ``y`` written once."""
    return 2 * nbytes


def copy_bytes(nbytes: int) -> int:
    """Memory traffic of copying ``nbytes``: read the source, write the destination."""
    return 2 * nbytes


def measure_matmul(size: int, dtype: Any, *, repeats: int, seed: int = 0) -> dict[str, Any]:
    """Times a jitted ``jnp.dot`` of two random ``size`` x ``size`` matrices of ``dtype``."""
    key_a, key_b = jax.random.split(jax.random.key(seed))
    a = jax.random.normal(key_a, (size, size), dtype=dtype)
    b = jax.random.normal(key_b, (size, size), dtype=dtype)
    dot = jax.jit(jnp.dot)
    timing = time_fn(lambda: dot(a, b), repeats=repeats)
    flops = matmul_flops(size, size, size)
    return {
        "size": size,
        "dtype": jnp.dtype(dtype).name,
        "flops": flops,
        **timing.as_dict(),
        "median_flops_per_s": flops / timing.median_s,
        "best_flops_per_s": flops / timing.best_s,
    }


def measure_matmul_peak(
    sizes: Sequence[int], dtype: Any, *, repeats: int, max_call_s: float = 2.0
) -> dict[str, Any]:
    """Best matmul throughput over ``sizes`` (ascending); the peak is the size with the best time.

    Larger sizes are skipped once one call takes longer than ``max_call_s``: by then the kernel is long
    past launch overhead, and bigger problems would only make the run slow (bf16 on some CPUs is emulated).
    """
    runs = []
    for size in sorted(sizes):
        run = measure_matmul(size, dtype, repeats=repeats)
        runs.append(run)
        if run["median_s"] > max_call_s:
            break
    peak = max(runs, key=lambda r: r["best_flops_per_s"])
    return {
        "dtype": jnp.dtype(dtype).name,
        "size": peak["size"],
        "median_flops_per_s": peak["median_flops_per_s"],
        "best_flops_per_s": peak["best_flops_per_s"],
        "runs": runs,
    }


def measure_jax_bandwidth(nbytes: int, *, repeats: int) -> dict[str, Any]:
    """Device memory bandwidth from a jitted, in-place ``x = x + 1`` over an fp32 array of about ``nbytes``.

    ``x + 1`` rather than a plain copy, which XLA may elide; an elementwise op this cheap is bound by memory.
    The input is donated so the output reuses its buffer: without that every call allocates a fresh array,
    and on CPU the page faults of that allocation cost several times more than the traffic itself.
    """
    add_one = jax.jit(lambda v: v + 1.0, donate_argnums=0)
    state = [jnp.ones((max(nbytes // 4, 1),), dtype=jnp.float32)]
    array_bytes = state[0].nbytes

    def step() -> jax.Array:
        state[0] = add_one(state[0])
        return state[0]

    timing = time_fn(step, repeats=repeats)
    return _bandwidth_record("jax_add_one", array_bytes, add_one_bytes(array_bytes), timing)


def measure_numpy_copy(nbytes: int, *, repeats: int) -> dict[str, Any]:
    """Host memory bandwidth from ``np.copyto`` between two preallocated ``nbytes`` buffers."""
    src = np.ones(max(nbytes, 1), dtype=np.uint8)
    dst = np.empty_like(src)
    timing = time_fn(lambda: np.copyto(dst, src), repeats=repeats)  # warm-up faults in dst's pages
    return _bandwidth_record("numpy_copy", src.nbytes, copy_bytes(src.nbytes), timing)


def _bandwidth_record(kind: str, array_bytes: int, moved: int, timing: Timing) -> dict[str, Any]:
    return {
        "kind": kind,
        "array_bytes": array_bytes,
        "bytes_moved": moved,
        **timing.as_dict(),
        "median_bytes_per_s": moved / timing.median_s,
        "best_bytes_per_s": moved / timing.best_s,
    }


def default_peak_sizes(quick: bool, backend: str | None = None) -> tuple[tuple[int, ...], int, int]:
    """(matmul sizes, bandwidth array bytes, repeats) suited to ``backend`` (default: JAX's)."""
    mode = "quick" if quick else "full"
    on_cpu = (backend or jax.default_backend()) == "cpu"
    sizes = (_CPU_MATMUL_SIZES if on_cpu else _ACCEL_MATMUL_SIZES)[mode]
    mib = (_CPU_BANDWIDTH_MIB if on_cpu else _ACCEL_BANDWIDTH_MIB)[mode]
    return sizes, mib * MIB, _REPEATS[mode]


def measure_peaks(
    *,
    quick: bool,
    matmul_sizes: Sequence[int] | None = None,
    bandwidth_bytes: int | None = None,
    repeats: int | None = None,
) -> dict[str, Any]:
    """Matmul FLOP/s (fp32, bf16) and memory bandwidth (JAX device, numpy host) of this machine.

    Sizes default per backend and mode; tests pass tiny ones.
    """
    default_sizes, default_bytes, default_repeats = default_peak_sizes(quick)
    sizes = tuple(matmul_sizes or default_sizes)
    nbytes = bandwidth_bytes or default_bytes
    reps = repeats or default_repeats
    return {
        "matmul": {
            name: measure_matmul_peak(sizes, dtype, repeats=reps)
            for name, dtype in (("float32", jnp.float32), ("bfloat16", jnp.bfloat16))
        },
        "bandwidth": {
            "jax_add_one": measure_jax_bandwidth(nbytes, repeats=reps),
            "numpy_copy": measure_numpy_copy(nbytes, repeats=reps),
        },
    }


def peak_figures(peaks: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Flattens :func:`measure_peaks` output into the same ``{name: {value, unit}}`` shape entries use."""
    figures: dict[str, dict[str, Any]] = {}
    for dtype, run in peaks["matmul"].items():
        for stat in ("median", "best"):
            figures[f"matmul_{dtype}_{stat}"] = {
                "value": run[f"{stat}_flops_per_s"] / 1e9,
                "unit": f"GFLOP/s (n={run['size']})",
            }
    for kind, run in peaks["bandwidth"].items():
        for stat in ("median", "best"):
            figures[f"bandwidth_{kind}_{stat}"] = {
                "value": run[f"{stat}_bytes_per_s"] / 1e9,
                "unit": f"GB/s ({run['array_bytes'] / MIB:g} MiB)",
            }
    return figures


def format_bytes(nbytes: int | None) -> str:
    if nbytes is None:
        return "unknown"
    return f"{nbytes / (1 << 30):.1f} GiB"
