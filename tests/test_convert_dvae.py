"""The OpenAI dVAE importer: safe unpickling, state-dict formats, name/shape checks, and equality with `dall_e`.

The reference tests build the `dall_e` package's torch modules (random weights, random biases so the bias
mapping is exercised), save them the way OpenAI saved `encoder.pkl` / `decoder.pkl` (`torch.save(module)`),
convert them and compare outputs on fresh random inputs. They skip when torch or dall_e is not installed.
"""

import argparse
import dataclasses
import json
import os
import struct
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dalle_jax import runs
from dalle_jax.commands.convert import register_openai_dvae
from dalle_jax.convert import openai_dvae as od
from dalle_jax.convert.safe_pickle import UnsafePickleError, UnsupportedCheckpointError, read_torch_file
from dalle_jax.models.dvae import DVAE, DVAEConfig, map_pixels

# The smallest dVAE the dall_e package can build (n_hid >= 64, vocab >= 512, n_init >= 8, 4 groups).
SMALL = DVAEConfig(vocab_size=512, n_hid=64, n_init=8, group_count=4, blocks_per_group=1)


def random_params(config: DVAEConfig, seed: int) -> dict:
    """Our pure param dict filled with numpy noise (weights ~ N(0, 1/fan_in), biases too, unlike the init).

    Only shapes come from the model (abstractly: building a DVAE eagerly compiles every initialiser).
    """
    with nnx.use_eager_sharding(False):
        abstract = nnx.state(nnx.eval_shape(lambda: DVAE(config, rngs=nnx.Rngs(0))), nnx.Param).to_pure_dict()
    rng = np.random.default_rng(seed)

    def fill(leaf):
        std = 0.1 if len(leaf.shape) == 1 else 1 / np.sqrt(np.prod(leaf.shape[:3]))
        return rng.normal(0, std, leaf.shape).astype(np.float32)

    return jax.tree.map(fill, abstract)


def assert_same_params(a: dict, b: dict) -> None:
    flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    register_openai_dvae(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


# ------------------------------------------------------------------------------------- hostile pickles

# Hand-written protocol-0 opcodes, so the pickle names exactly the module.global we intend.
def _call(module: str, name: str, *args: str) -> bytes:
    return f"c{module}\n{name}\n(".encode() + b"".join(f"V{a}\n".encode() for a in args) + b"tR"


def _payloads(marker: str) -> dict[str, bytes]:
    inside_dict = b"ccollections\nOrderedDict\n)RVblocks.input.w\n" + _call("os", "system", f"touch {marker}") + b"s."
    return {
        "os.system": _call("os", "system", f"touch {marker}") + b".",
        "builtins.eval": _call("builtins", "eval", f"open({marker!r}, 'w').close()") + b".",
        "subprocess.Popen": b"csubprocess\nPopen\n((Vtouch\nV" + marker.encode() + b"\nltR.",
        "os.system inside a state dict": inside_dict,
    }


def _torch_zip(path, data_pkl: bytes, storages: dict[str, bytes] | None = None):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/version", "3\n")
        for key, raw in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", raw)
    return path


def _legacy_header() -> bytes:
    """What torch's legacy format puts before the object pickle: magic number, protocol, sys info."""
    import pickle

    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    return b"".join(pickle.dumps(x, protocol=2) for x in (0x1950A86A20F9469CFC6C, 1001, sys_info))


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("payload", list(_payloads("m")))
def test_forbidden_global_is_refused_and_nothing_runs(tmp_path, payload, container):
    marker = tmp_path / "marker"
    data = _payloads(str(marker))[payload]
    target = tmp_path / "encoder.pkl"
    if container == "zip":
        _torch_zip(target, data)
    else:
        target.write_bytes(_legacy_header() + data)
    with pytest.raises(UnsafePickleError) as raised:
        od.load_released(target, target)
    global_name = payload.split()[0]
    assert f"'{global_name}'" in str(raised.value) and str(target) in str(raised.value)
    assert not marker.exists()


def test_hostile_payload_is_live_under_plain_pickle(tmp_path):
    """Control for the test above: the same bytes do run code when unpickled the unsafe way."""
    import pickle

    marker = tmp_path / "marker"
    pickle.loads(_payloads(str(marker))["builtins.eval"])  # noqa: S301 -- deliberately unsafe, our own payload
    assert marker.exists()


def _tensor_pickle(size: int) -> bytes:
    """{'w': _rebuild_tensor_v2(<FloatStorage '0' of 4 elements>, 0, (size,), (1,), False, None)}, protocol 1."""
    storage = b"(Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nI4\ntQ"
    tensor = (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"I0\n(I" + str(size).encode() + b"\nt(I1\nt"
              b"I00\nNtR")
    return b"}Vw\n" + tensor + b"s."


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    values = np.array([1.5, -2.0, 3.25, 7.0], np.float32)
    good = _torch_zip(tmp_path / "good.pt", _tensor_pickle(4), {"0": values.tobytes()})
    np.testing.assert_array_equal(read_torch_file(good).tensors["w"], values)
    bad = _torch_zip(tmp_path / "bad.pt", _tensor_pickle(100), {"0": values.tobytes()})
    with pytest.raises(UnsafePickleError, match="reaches past"):
        read_torch_file(bad)


# ------------------------------------------------------------------------------------- formats, names


def test_safetensors_reader_against_a_hand_built_file(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.normal(size=(2, 3)).astype("<f4"), "b": rng.normal(size=(5,)).astype("<f2"),
              "c": rng.integers(-9, 9, (3, 1)).astype("<i8"), "d": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16)}
    codes = {"a": "F32", "b": "F16", "c": "I64", "d": "BF16"}
    header, body = {"__metadata__": {"format": "pt"}}, b""
    for name, array in arrays.items():
        header[name] = {"dtype": codes[name], "shape": list(array.shape),
                        "data_offsets": [len(body), len(body) + array.nbytes]}
        body += array.tobytes()
    encoded = json.dumps(header).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)
    read = od.read_safetensors(tmp_path / "x.safetensors")
    assert set(read) == set(arrays)
    for name, array in arrays.items():
        assert read[name].dtype == array.dtype
        np.testing.assert_array_equal(read[name], array)
    od.save_safetensors(tmp_path / "y.safetensors", read)
    again = od.read_safetensors(tmp_path / "y.safetensors")
    for name, array in arrays.items():
        np.testing.assert_array_equal(again[name], array)


@pytest.mark.parametrize("config", [SMALL, DVAEConfig(vocab_size=96, n_hid=16, n_init=12, group_count=3,
                                                      blocks_per_group=2)], ids=["small", "3-groups"])
@pytest.mark.parametrize("fmt", ["npz", "safetensors"])
@pytest.mark.parametrize("prefix", ["blocks.", ""])
def test_state_dict_round_trip_is_identical(tmp_path, config, fmt, prefix):
    params = random_params(config, seed=1)
    released = od.to_released(params, prefix=prefix)
    # Released layout, independently: OIHW, 1-based names.
    w = params["encoder"]["groups"][1]["blocks"][0]["res_path"][2]["w"]
    np.testing.assert_array_equal(released["encoder"][f"{prefix}group_2.block_1.res_path.conv_3.w"],
                                  np.transpose(w, (3, 2, 0, 1)))
    paths = {}
    for part, tensors in released.items():
        paths[part] = tmp_path / f"{part}.{fmt}"
        if fmt == "npz":
            np.savez(paths[part], **tensors)
        else:
            od.save_safetensors(paths[part], tensors)
    config_read, params_read = od.read_released(paths["encoder"], paths["decoder"])
    assert config_read == config
    assert_same_params(params_read, params)


def _small_released(seed: int = 2) -> dict[str, dict[str, np.ndarray]]:
    return od.to_released(random_params(SMALL, seed))


@pytest.mark.parametrize("damage, expected", [
    ("missing", ["missing 'blocks.group_2.block_1.res_path.conv_3.w'", "(32, 32, 3, 3)"]),
    ("extra", ["unexpected tensor 'blocks.group_1.block_1.res_path.conv_5.w'"]),
    ("misshaped", ["'blocks.group_3.block_1.id_path.w' has shape (128, 256, 1, 1)", "expected (256, 128, 1, 1)"]),
    ("vocab", ["disagree on vocab_size: 512 vs 1024"]),
    ("swapped", ["swap"]),
])
def test_bad_state_dicts_are_named(tmp_path, damage, expected):
    tensors = _small_released()
    encoder, decoder = tensors["encoder"], tensors["decoder"]
    if damage == "missing":
        del encoder["blocks.group_2.block_1.res_path.conv_3.w"]
    elif damage == "extra":
        encoder["blocks.group_1.block_1.res_path.conv_5.w"] = np.zeros((64, 16, 1, 1), np.float32)
    elif damage == "misshaped":
        name = "blocks.group_3.block_1.id_path.w"  # group 3: 2 * n_hid -> 4 * n_hid channels
        encoder[name] = encoder[name].transpose(1, 0, 2, 3)
    elif damage == "vocab":
        decoder["blocks.input.w"] = np.zeros((8, 1024, 1, 1), np.float32)
    else:
        encoder, decoder = decoder, encoder
    np.savez(tmp_path / "encoder.npz", **encoder)
    np.savez(tmp_path / "decoder.npz", **decoder)
    with pytest.raises(od.ConversionError) as raised:
        od.read_released(tmp_path / "encoder.npz", tmp_path / "decoder.npz")
    for text in expected:
        assert text in str(raised.value)


def test_cli_convert_then_load_dvae(tmp_path, capsys):
    params = random_params(SMALL, seed=3)
    for part, tensors in od.to_released(params).items():
        np.savez(tmp_path / f"{part}.npz", **tensors)
    argv = ["openai-dvae", "--encoder", str(tmp_path / "encoder.npz"), "--decoder", str(tmp_path / "decoder.npz"),
            "--out", str(tmp_path / "out")]
    assert run_cli(argv) == 0
    assert "checkpoints/0" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "dvae_config.json").read_text()) == dataclasses.asdict(SMALL)
    loaded = runs.load_dvae(tmp_path / "out")
    assert loaded.config == SMALL
    assert_same_params(nnx.state(loaded, nnx.Param).to_pure_dict(), params)
    assert run_cli(argv) == 2  # refuses to overwrite without --force
    assert "--force" in capsys.readouterr().out


def test_load_dvae_reads_a_trainer_run(tmp_path):
    """The dVAE trainer's layout: RUN/dvae/{dvae_config.json, checkpoints} with optimizer state beside the params."""
    import optax

    from dalle_jax.train.checkpoint import Checkpointer

    params, ema = random_params(SMALL, seed=4), random_params(SMALL, seed=5)
    run = tmp_path / "run"
    (run / "dvae").mkdir(parents=True)
    (run / "dvae" / "dvae_config.json").write_text(json.dumps(dataclasses.asdict(SMALL)))
    state = {"params": params, "ema_params": ema, "opt_state": optax.adam(1e-3).init(params),
             "step": jnp.asarray(7, jnp.int32), "key": jax.random.key_data(jax.random.key(0))}
    with Checkpointer(run / "dvae" / "checkpoints", save_every=1) as checkpointer:
        checkpointer.save(7, jax.tree.map(jnp.asarray, state), force=True)
    assert_same_params(nnx.state(runs.load_dvae(run), nnx.Param).to_pure_dict(), ema)
    assert_same_params(nnx.state(runs.load_dvae(run / "dvae", use_ema=False), nnx.Param).to_pure_dict(), params)


# ------------------------------------------------------------------------------------- against dall_e


@pytest.fixture(scope="module")
def reference():
    torch = pytest.importorskip("torch", reason="the reference comparison needs torch (CPU)")
    dall_e = pytest.importorskip("dall_e", reason="the reference comparison needs the DALL-E==0.1 package")
    torch.set_num_threads(max(1, len(__import__("os").sched_getaffinity(0))))
    return torch, dall_e


def _randomise_biases(torch, module, seed: int):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if name.endswith(".b"):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return module


def _small_modules(reference):
    torch, dall_e = reference
    torch.manual_seed(0)
    encoder = dall_e.Encoder(n_hid=SMALL.n_hid, n_blk_per_group=SMALL.blocks_per_group, vocab_size=SMALL.vocab_size,
                             requires_grad=False)
    decoder = dall_e.Decoder(n_init=SMALL.n_init, n_hid=SMALL.n_hid, n_blk_per_group=SMALL.blocks_per_group,
                             vocab_size=SMALL.vocab_size, requires_grad=False)
    return _randomise_biases(torch, encoder, 1), _randomise_biases(torch, decoder, 2)


@pytest.mark.parametrize("how", ["module zip", "module legacy", "state dict .pt"])
def test_reader_matches_torch(tmp_path, reference, how):
    torch, _ = reference
    encoder, _ = _small_modules(reference)
    path = tmp_path / ("encoder.pt" if how == "state dict .pt" else "encoder.pkl")
    obj = encoder.state_dict() if how == "state dict .pt" else encoder
    torch.save(obj, path, _use_new_zipfile_serialization=how != "module legacy")
    read = read_torch_file(path)
    expected = encoder.state_dict()
    assert set(read.tensors) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(read.tensors[name], value.numpy(), err_msg=name)
    assert read.root_class == (None if how == "state dict .pt" else "dall_e.encoder.Encoder")
    if how == "state dict .pt":  # torch's weights-only loader, our fallback for .pt files, agrees
        with_torch = od._read_with_torch(path)
        assert all(np.array_equal(with_torch[n], v.numpy()) for n, v in expected.items())


def test_pt_files_fall_back_to_torch_weights_only_loader(tmp_path, reference):
    """A tensor encoding our reader does not know (uint16 uses _rebuild_tensor_v3) is read by torch's safe loader
    for .pt files; other suffixes (and files naming non-torch globals) are never handed on."""
    torch, _ = reference
    values = np.array([1, 2, 65535], np.uint16)
    torch.save({"a": torch.from_numpy(values.astype(np.int32)).to(torch.uint16)}, tmp_path / "state.pt")
    with pytest.raises(UnsafePickleError, match="_rebuild_tensor_v3"):
        read_torch_file(tmp_path / "state.pt")
    tensors, root_class = od.read_state_dict(tmp_path / "state.pt")
    assert root_class is None and tensors["a"].dtype == np.uint16
    np.testing.assert_array_equal(tensors["a"], values)
    (tmp_path / "state.pt").rename(tmp_path / "state.pkl")
    with pytest.raises(UnsafePickleError):
        od.read_state_dict(tmp_path / "state.pkl")


def test_reader_needs_neither_torch_nor_dall_e(tmp_path, reference):
    torch, _ = reference
    encoder, _ = _small_modules(reference)
    torch.save(encoder, tmp_path / "encoder.pkl")
    script = ("import sys; sys.modules['torch'] = sys.modules['dall_e'] = None\n"  # any import of them fails
              "from dalle_jax.convert.safe_pickle import read_torch_file\n"
              f"print(len(read_torch_file({str(tmp_path / 'encoder.pkl')!r}).tensors))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == len(encoder.state_dict())


def test_small_release_matches_reference(tmp_path, reference):
    """Whole-module pickles in both torch formats -> our DVAE (convert's reading path; the checkpoint round trip
    is covered above) -> the same outputs as the torch modules."""
    torch, _ = reference
    encoder, decoder = _small_modules(reference)
    torch.save(encoder, tmp_path / "encoder.pkl")
    torch.save(decoder, tmp_path / "decoder.pkl", _use_new_zipfile_serialization=False)
    dvae = od.load_released(tmp_path / "encoder.pkl", tmp_path / "decoder.pkl")
    assert dvae.config == SMALL
    rng = np.random.default_rng(10)
    images = rng.random((2, 64, 64, 3), dtype=np.float32)
    with torch.no_grad():
        logits = encoder(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2) * 0.8 + 0.1))).numpy()
    ours = np.asarray(dvae.encoder(map_pixels(jnp.asarray(images)))).transpose(0, 3, 1, 2)
    assert relative_error(ours, logits) <= 1e-5
    tokens = rng.integers(0, SMALL.vocab_size, (2, 8, 8))
    with torch.no_grad():
        expected = decoder(torch.from_numpy(np.eye(SMALL.vocab_size, dtype=np.float32)[tokens]
                                            .transpose(0, 3, 1, 2).copy())).numpy()
    ours = np.asarray(dvae.decoder.decode_tokens(jnp.asarray(tokens))).transpose(0, 3, 1, 2)
    assert relative_error(ours, expected) <= 1e-5


@pytest.fixture(scope="module")
def released(reference, tmp_path_factory):
    """The released architecture at full size (54M + 44M parameters), saved as OpenAI did, and our conversion."""
    torch, dall_e = reference
    torch.manual_seed(0)
    encoder = _randomise_biases(torch, dall_e.Encoder(requires_grad=False), 3)
    decoder = _randomise_biases(torch, dall_e.Decoder(requires_grad=False), 4)
    directory = tmp_path_factory.mktemp("released")
    torch.save(encoder, directory / "encoder.pkl")
    torch.save(decoder, directory / "decoder.pkl")
    dvae = od.load_released(directory / "encoder.pkl", directory / "decoder.pkl")
    return encoder, decoder, dvae


def test_full_size_encoder_matches_reference(reference, released):
    torch, _ = reference
    encoder, _, dvae = released
    assert dvae.config == DVAEConfig()  # the released architecture, inferred from the tensors
    images = np.random.default_rng(20).random((1, 256, 256, 3), dtype=np.float32)
    with torch.no_grad():
        logits = encoder(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2) * 0.8 + 0.1))).numpy()
    ours = np.asarray(nnx.jit(lambda m, x: m.encoder(map_pixels(x)))(dvae, jnp.asarray(images)))
    ours = ours.transpose(0, 3, 1, 2)  # (1, 8192, 32, 32) like torch
    assert relative_error(ours, logits) <= 1e-5
    assert np.mean(ours.argmax(1) == logits.argmax(1)) >= 0.999


def test_full_size_decoder_matches_reference(reference, released):
    torch, _ = reference
    _, decoder, dvae = released
    tokens = np.random.default_rng(21).integers(0, 8192, (1, 32, 32))
    one_hot = np.eye(8192, dtype=np.float32)[tokens]  # (1, 32, 32, 8192)
    with torch.no_grad():
        expected = decoder(torch.from_numpy(one_hot.transpose(0, 3, 1, 2).copy())).numpy()
    both = nnx.jit(lambda m, z, t: (m.decoder(z), m.decoder.decode_tokens(t)))
    from_one_hot, from_tokens = map(np.asarray, both(dvae, jnp.asarray(one_hot), jnp.asarray(tokens)))
    assert relative_error(from_one_hot.transpose(0, 3, 1, 2), expected) <= 1e-5
    assert relative_error(from_tokens.transpose(0, 3, 1, 2), expected) <= 1e-5


BOMB_PEAK = """
import resource, sys
from dalle_jax.cli import main
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
code = main(sys.argv[1:])
print("grew_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, flush=True)
sys.exit(code)
"""


def test_a_zip_bomb_checkpoint_is_refused_before_inflating(tmp_path):
    """~0.25 MB of deflated zeros declaring a 256 MB float storage: refused from the zip directory, one line, and
    the process grows by less than 64 MB (inflating it would take 256 MB)."""
    numel = 64 << 20
    storage = b"(Vstorage\nctorch\nFloatStorage\nV0\nVcpu\nI" + str(numel).encode() + b"\ntQ"
    data_pkl = (b"}Vw\nctorch._utils\n_rebuild_tensor_v2\n(" + storage + b"I0\n(I" + str(numel).encode()
                + b"\nt(I1\ntI00\nNtRs.")
    bomb = tmp_path / "bomb.pt"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/version", "3\n")
        with archive.open("archive/data/0", "w", force_zip64=True) as member:
            zeros = bytes(1 << 20)
            for _ in range(numel * 4 >> 20):
                member.write(zeros)
    assert bomb.stat().st_size < 2 << 20
    with pytest.raises(UnsupportedCheckpointError, match="zip bomb"):
        read_torch_file(bomb)
    result = subprocess.run([sys.executable, "-c", BOMB_PEAK, "convert", "openai-dvae", "--encoder", str(bomb),
                             "--decoder", str(bomb), "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "zip bomb" in errors[0], result.stderr[-2000:]
    assert float(result.stdout.split("grew_mb")[-1]) < 64
