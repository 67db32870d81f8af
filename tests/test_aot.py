"""AOT compilation for TPU slices on this CPU host (dalle_jax.aot).

Topology names are parsed everywhere; the compiles need libtpu (`pip install -e ".[tpu]"`) and are skipped
without it: CI's environment does not install it.
"""

import argparse
import dataclasses
import importlib.util

import pytest

from dalle_jax import aot, info, sharding
from dalle_jax import config as config_lib
from dalle_jax.commands import aot as aot_command

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed: AOT compilation for a TPU topology needs it (pip install -e '.[tpu]' in "
           "its own environment); the test extra does not bring it")


@pytest.mark.parametrize("name, topology_name, chips", [
    ("v4-8", "v4:2x2x1", 4), ("v4-256", "v4:4x4x8", 128), ("v5p-256", "v5:4x4x8", 128),
    ("v5e-256", "v5e:16x16", 256), ("v5litepod-8", "v5e:2x4", 8), ("v6e-64", "v6e:8x8", 64),
    ("v4:4x4x12", "v4:4x4x12", 192), ("V5E:4x8", "v5e:4x8", 32)])
def test_topology_names(name, topology_name, chips):
    topology = aot.parse_topology(name)
    assert (topology.topology_name, topology.chips) == (topology_name, chips)


def test_topology_options_and_slices():
    assert aot.parse_topology("v4-8").options() == {"chip_config_name": "megacore", "chips_per_host_bounds": (2, 2, 1),
                                                    "wrap": (False, False, False)}
    assert aot.parse_topology("v4-256").options()["wrap"] == (True, True, True)
    assert aot.parse_topology("v5e-256").options()["wrap"] == (True, True, False)
    two = aot.parse_topology("v5e-256", num_slices=2)
    assert two.chips == 512 and two.options()["num_slices"] == 2


@pytest.mark.parametrize("name, words", [("v4-7", "TensorCores"), ("v3-8", "unknown TPU family"),
                                         ("v4-96", "no standard"), ("tpu", "expected"), ("v4:4x4", "expected")])
def test_bad_topology_names(name, words):
    with pytest.raises(aot.AOTError, match=words):
        aot.parse_topology(name)


def _quick(**prior):
    config = config_lib.get_preset("quick")
    return dataclasses.replace(config, mesh=sharding.MeshConfig(ici_parallelism=(1, -1, 1)),
                               prior=dataclasses.replace(config.prior, **prior))


@needs_libtpu
def test_train_step_memory_and_cost():
    config = _quick(n_layers=4)
    topology = aot.parse_topology("v5e-8")
    report = aot.compile_train_step(config, topology)
    (program,) = report.programs
    assert report.mesh == {"data": 1, "fsdp": 8, "tensor": 1} and report.chips == 8
    assert not program.error and report.fits and program.compile_s > 0
    for field in ("argument_bytes", "output_bytes", "alias_bytes", "code_bytes", "xla_flops", "xla_bytes", "flops",
                  "bytes_accessed"):
        assert getattr(program, field) > 0, field
    # The arguments are the FSDP-sharded state (params, EMA, Adam moments: what `info` computes per device for
    # this mesh) plus this chip's rows of the batch, as XLA stores them: padded to TPU tiles (a shard 64 / 8 = 8
    # wide takes 128 lanes). The donated state comes back in the same buffers.
    state = info.prior_memory(config, 8)["state_bytes_per_device"]
    p, batch = config.prior, config.prior_train.batch_size
    batch_bytes = 4 * batch * (p.text_len + p.image_len) // 8
    assert state <= program.argument_unpadded_bytes <= 1.01 * state + batch_bytes + 64
    assert program.argument_unpadded_bytes < program.argument_tiled_bytes <= program.argument_bytes
    assert program.argument_bytes <= 1.01 * program.argument_tiled_bytes
    assert 0.99 * (program.argument_bytes - batch_bytes) <= program.alias_bytes <= program.output_bytes
    assert program.total_bytes == (program.argument_bytes + program.output_bytes - program.alias_bytes
                                   + program.temp_bytes + program.code_bytes)
    # XLA counts one of the four scanned layers; the count extrapolated from 1- and 2-layer compiles equals XLA's
    # count of the whole step with every scan unrolled, and is close to the model's 6N + attention.
    with aot._unrolled_scans():
        unrolled_flops, unrolled_bytes = aot._cost(aot._train_program(config, aot.topology_mesh(config, topology))()
                                                   .compile())
    assert program.flops == pytest.approx(unrolled_flops, rel=0.02)
    assert program.bytes_accessed == pytest.approx(unrolled_bytes, rel=0.05)
    assert program.xla_flops < 0.6 * unrolled_flops
    per_chip = report.model_flops[0] / report.chips
    assert 0.9 * per_chip <= program.flops <= 1.5 * per_chip
    compute, memory = report.step_time(program)
    assert compute > 0 and memory > 0 and 0 < report.mfu(0) < 1
    text = report.format()
    assert "fits" in text and "v5e:2x4" in text and "temporaries" in text and "before TPU tile padding" in text


@needs_libtpu
def test_sample_steps_hold_the_sharded_cache():
    config = _quick()
    report = aot.compile_sample_step(config, "v4-8", batch=8, count_layers=False)
    p = config.prior
    fp32_bytes, chips = 4, 4
    cache_per_chip = 2 * p.n_layers * 8 * p.seq_len * p.n_heads * p.head_dim * fp32_bytes // chips  # k and v
    params_per_chip = info.prior_memory(config, 4)["param_bytes_per_device"]
    assert [program.name for program in report.programs] == ["prefill", "decode step"]
    for program in report.programs:
        assert not program.error
        assert program.argument_bytes >= cache_per_chip + params_per_chip
        assert program.alias_bytes >= cache_per_chip  # the cache is donated and updated in place
        assert program.flops > 0 and program.bytes_accessed > 0
    prefill, decode = report.programs
    assert prefill.flops > 10 * decode.flops  # 25 positions against 1 (raw counts: one layer each)
    assert report.fits


@needs_libtpu
def test_cli_exits_1_when_it_does_not_fit(capsys):
    parser = argparse.ArgumentParser()
    aot_command.register(parser.add_subparsers())
    # 2^20 sequences: the fp32 attention scores alone are ~8 GiB per layer per chip on a v5e-8.
    args = parser.parse_args(["aot", "--preset", "quick", "--topology", "v5e-8", "--batch", str(2**20),
                              "--no-count"])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "does not fit 16 GiB per chip" in out


@needs_libtpu
def test_cli_names_an_indivisible_mesh(capsys):
    parser = argparse.ArgumentParser()
    aot_command.register(parser.add_subparsers())
    args = parser.parse_args(["aot", "--preset", "quick", "--topology", "v5e-8", "--mesh", "1,1,8", "--no-count"])
    assert args.func(args) == 2
    assert "not divisible" in capsys.readouterr().out


@needs_libtpu
def test_splash_attention_compiles_into_the_train_step_as_pallas_kernels():
    config = _quick(attention_impl="splash")  # 2 layers: row, conv
    report = aot.compile_train_step(config, "v5e-8", count_layers=False)
    (program,) = report.programs
    assert not program.error and report.fits
    masks = len(config.prior.masks()[2])
    # Per distinct mask one forward kernel (saving the softmax statistics) and the dq and dkv backward kernels.
    for phase in ("fwd_residuals", "dq_no_residuals", "dkv_no_residuals"):
        assert program.kernels.get(f"splash_mha_{phase}", 0) >= masks, program.kernels
    assert "Pallas kernels" in report.format() and "splash_mha_fwd_residuals" in report.format()
    dense = aot.compile_train_step(_quick(attention_impl="dense"), "v5e-8", count_layers=False)
    assert dense.programs[0].kernels == {}


@needs_libtpu
def test_no_count_prints_no_step_time_from_one_layers_flops(capsys):
    parser = argparse.ArgumentParser()
    aot_command.register(parser.add_subparsers())
    args = parser.parse_args(["aot", "--preset", "quick", "--topology", "v5e-8", "--no-count"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "not estimated (--no-count" in out and "MFU at that time" not in out
