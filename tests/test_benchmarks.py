"""The benchmark harness: machine record, peaks, entry results, failure handling, output files.

Speed is never asserted here (timing belongs in benchmarks/); these tests check that the harness records,
computes and reports correctly, at tiny sizes.
"""

from __future__ import annotations

import json
import math
import os
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import machine, run  # the repo root is on sys.path via setup.cfg's pytest pythonpath
from benchmarks.registry import REGISTRY, benchmark, figure, unregister  # noqa: E402

MACHINE_FIELDS = {
    "cpu_model", "cpu_logical_cores", "memory_bytes", "python", "jax", "jaxlib", "flax",
    "jax_backend", "device_kind", "device_count",
}  # fmt: skip


@pytest.fixture
def test_entries():
    """Registers a working entry (figures from fresh random values), a raising one and a malformed one."""
    values = np.random.default_rng().uniform(1.0, 1000.0, size=2)
    names = ["test_fails_first", "test_ok", "test_nan_figure"]

    @benchmark(names[0], help="raises on purpose")
    def fails(quick: bool) -> dict:
        raise RuntimeError("deliberate failure for the harness test")

    @benchmark(names[1], help="returns known figures")
    def ok(quick: bool) -> dict:
        return {
            "config": {"quick": quick, "width": 7},
            "figures": {"alpha_rate": figure(values[0], "items/s"), "beta_time": figure(values[1], "ms")},
            "notes": "a test entry",
        }

    @benchmark(names[2], help="returns a non-finite figure")
    def nan_figure(quick: bool) -> dict:
        return {"figures": {"gamma": figure(float("nan"), "x")}}

    yield names, values
    for name in names:
        unregister(name)


def test_run_records_machine_peaks_entries_and_failures(tmp_path, capsys, test_entries):
    names, values = test_entries
    exit_code = run.main(
        ["--quick", "--only", *names, "--out", str(tmp_path), "--matmul-sizes", "32", "48",
         "--bandwidth-mib", "0.25", "--peak-repeats", "2"]
    )  # fmt: skip
    assert exit_code == 1  # two entries failed

    record = json.loads((tmp_path / "results.json").read_text())
    info = record["machine"]
    assert MACHINE_FIELDS <= set(info)
    assert info["cpu_logical_cores"] == os.cpu_count()
    assert info["jax"] == jax.__version__
    assert info["jax_backend"] == jax.default_backend()
    assert info["device_count"] == jax.device_count()
    assert info["memory_bytes"] > 0
    hostname = socket.gethostname()
    if len(hostname) >= 6:  # short names could collide with ordinary text
        assert hostname not in (tmp_path / "results.json").read_text()
    assert "--only" in record["command"] and record["quick"] is True

    for dtype, peak in record["peaks"]["matmul"].items():
        assert [r["size"] for r in peak["runs"]] == [32, 48]
        for r in peak["runs"]:
            assert r["dtype"] == dtype and r["flops"] == 2 * r["size"] ** 3
            assert r["best_flops_per_s"] == pytest.approx(r["flops"] / r["best_s"])
            assert r["median_flops_per_s"] <= r["best_flops_per_s"]
        assert peak["best_flops_per_s"] == max(r["best_flops_per_s"] for r in peak["runs"])
    for bw in record["peaks"]["bandwidth"].values():
        assert bw["bytes_moved"] == 2 * bw["array_bytes"] and bw["array_bytes"] >= 0.25 * machine.MIB - 4
    for fig in machine.peak_figures(record["peaks"]).values():
        assert math.isfinite(fig["value"]) and fig["value"] > 0

    by_name = {e["name"]: e for e in record["entries"]}
    assert [e["name"] for e in record["entries"]] == names  # the ones after the failure still ran
    assert by_name["test_fails_first"]["status"] == "failed"
    assert "deliberate failure" in by_name["test_fails_first"]["error"]
    assert "RuntimeError" in by_name["test_fails_first"]["traceback"]
    assert by_name["test_nan_figure"]["status"] == "failed"
    assert "not finite" in by_name["test_nan_figure"]["error"]
    ok = by_name["test_ok"]
    assert ok["status"] == "ok" and ok["config"] == {"quick": True, "width": 7}
    assert ok["figures"]["alpha_rate"] == {"value": pytest.approx(values[0]), "unit": "items/s"}
    assert ok["figures"]["beta_time"] == {"value": pytest.approx(values[1]), "unit": "ms"}

    markdown = (tmp_path / "results.md").read_text()
    rows = [line for line in markdown.splitlines() if line.startswith("| test_")]
    assert any("alpha_rate" in r and run.format_value(values[0]) in r and "width=7" in r for r in rows)
    assert any("beta_time" in r and "| ms |" in r for r in rows)
    assert any(r.startswith("| test_fails_first | FAILED") for r in rows)
    assert any(r.startswith("| test_nan_figure | FAILED") for r in rows)
    assert "matmul_float32_best" in markdown and "bandwidth_jax_add_one_median" in markdown

    out = capsys.readouterr().out
    # machine first, then the peaks, then the entries, then the table
    order = [out.index(s) for s in ("cpu_model:", "== peaks", "== test_ok", "== results")]
    assert order == sorted(order)


def test_unknown_entry_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as exc:
        run.main(["--only", "no_such_entry_xyz", "--out", str(tmp_path), "--skip-peaks"])
    assert exc.value.code == 2
    assert not (tmp_path / "results.json").exists()


def test_matmul_flops_matches_2n3_and_xla_cost_analysis():
    rng = np.random.default_rng()
    for n in rng.integers(1, 300, size=3):
        n = int(n)
        assert machine.matmul_flops(n, n, n) == 2 * n**3
    m, k, n = (int(v) for v in rng.integers(8, 64, size=3))
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    xla_flops = jax.jit(jnp.dot).lower(a, b).compile().cost_analysis()["flops"]
    assert machine.matmul_flops(m, k, n) == xla_flops


def test_add_one_bytes_matches_xla_cost_analysis():
    size = int(np.random.default_rng().integers(1000, 5000))
    x = jnp.ones((size,), jnp.float32)
    cost = jax.jit(lambda v: v + 1.0).lower(x).compile().cost_analysis()
    assert machine.add_one_bytes(x.nbytes) == cost["bytes accessed"]


def test_time_fn_statistics_with_a_scripted_clock():
    durations = np.random.default_rng().uniform(0.1, 5.0, size=5)
    ticks = iter(np.cumsum(np.stack([np.zeros(5), durations], axis=1).ravel()))  # start, stop pairs
    calls = []
    timing = machine.time_fn(lambda: calls.append(1), repeats=5, warmup=2, clock=lambda: float(next(ticks)))
    assert len(calls) == 7  # warm-up calls run but are not timed
    assert timing.times_s == pytest.approx(tuple(durations))
    assert timing.median_s == pytest.approx(np.median(durations))
    assert timing.best_s == pytest.approx(durations.min())


def test_format_value_keeps_four_significant_digits():
    for value in np.random.default_rng().uniform(-6, 9, size=20):
        value = float(10.0**value)
        parsed = float(run.format_value(value).replace(",", ""))
        assert parsed == pytest.approx(value, rel=1e-3)


def test_registering_a_name_twice_is_an_error():
    @benchmark("test_duplicate", help="first")
    def first(quick: bool) -> dict:
        return {}

    try:

        def second(quick: bool) -> dict:
            return {}

        with pytest.raises(ValueError, match="already registered"):
            benchmark("test_duplicate", help="second")(second)
        assert REGISTRY["test_duplicate"].fn is first
    finally:
        unregister("test_duplicate")


def test_shapes_render_entry_reports_consistent_figures():
    pytest.importorskip("dalle_jax.data.shapes")
    from benchmarks.bench_shapes import shapes_render

    record = run.run_entry(REGISTRY["shapes_render"], quick=True)
    assert REGISTRY["shapes_render"].fn is shapes_render
    assert record["status"] == "ok", record.get("traceback")
    figures = record["figures"]
    assert figures["examples_per_s_median"]["value"] > 0
    assert figures["examples_per_s_median"]["value"] <= figures["examples_per_s_best"]["value"]
    assert figures["ms_per_example_median"]["value"] == pytest.approx(
        1e3 / figures["examples_per_s_median"]["value"]
    )
    assert record["config"]["image_size"] == 64


def test_sampler_roofline_counts_the_bytes_a_decode_step_reads():
    """The roofline's weight bytes are exactly the prior's block parameters (in the serving dtype) plus the fp32
    image head, and its cache bytes the per-layer (batch, heads, seq_len, head_dim) k and v buffers the sampler
    allocates."""
    from benchmarks.bench_prior import bench_configs
    from benchmarks.bench_sampler import _random_prior, step_bytes
    from dalle_jax.sampling.sampler import cache_shape

    config, _ = bench_configs(quick=True)
    for dtype, width in (("float32", 4), ("bfloat16", 2)):
        model = _random_prior(config, dtype)
        layers = sum(leaf.nbytes for leaf in jax.tree.leaves({k: v[...] for k, v in model.layers.items()}))
        counted = step_bytes(config, batch=3, dtype=dtype)
        assert counted["weights"] == layers + model.image_head[...].nbytes
        assert counted["kv_cache"] == 2 * config.n_layers * math.prod(cache_shape(config, 3)) * width
