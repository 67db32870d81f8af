"""Every command, driven with bad input: exit 2, one `error:` line on stderr naming the flag, field or file, and no
traceback. Inputs are made here (a small shapes dataset, a tokenizer, broken files); no model is trained, so each
case fails where it should: before anything is loaded or compiled."""

import struct
import zlib

import numpy as np
import pytest

from dalle_jax.cli import main


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels (a decompression bomb: PIL refuses it at open)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    assert main(["data", "shapes", "--out", str(root / "data"), "--num", "40", "--num-validation", "16",
                 "--num-test", "0", "--image-size", "32"]) == 0
    assert main(["tokenizer", "train", "--data", str(root / "data"), "--out", str(root / "tokenizer.json"),
                 "--vocab-size", "300", "--text-len", "16"]) == 0
    (root / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (root / "bad_tokenizer.json").write_text("{not json")
    (root / "bomb.png").write_bytes(_png_header_only(60000, 60000))
    np.savez(root / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    (root / "a_file").write_text("not a directory")
    return root


NOWHERE = "/nonexistent/run"  # every sample case must fail before the run is read
CASES = {
    "prompts file not UTF-8": (["sample", "--run", NOWHERE, "--prompts-file", "{root}/latin1.txt", "--out-dir",
                                "{root}/o"], "--prompts-file"),
    "temperature 0": (["sample", "--run", NOWHERE, "--prompt", "x", "--temperature", "0", "--out-dir", "{root}/o"],
                      "--temperature"),
    "top-p 0": (["sample", "--run", NOWHERE, "--prompt", "x", "--top-p", "0", "--out-dir", "{root}/o"], "--top-p"),
    "top-k -5": (["sample", "--run", NOWHERE, "--prompt", "x", "--top-k", "-5", "--out-dir", "{root}/o"], "--top-k"),
    "cfg-scale nan": (["sample", "--run", NOWHERE, "--prompt", "x", "--cfg-scale", "nan", "--out-dir", "{root}/o"],
                      "--cfg-scale"),
    "concept-scale alone": (["sample", "--run", NOWHERE, "--prompt", "x", "--concept-scale", "2", "--out-dir",
                             "{root}/o"], "--concept"),
    "concept-scale nan": (["sample", "--run", NOWHERE, "--prompt", "x", "--concept", "a circle", "--concept-scale",
                           "nan", "--out-dir", "{root}/o"], "--concept-scale"),
    "huge seed": (["sample", "--run", NOWHERE, "--prompt", "x", "--seed", str(10**20), "--out-dir", "{root}/o"],
                  "--seed"),
    "image-prefix bomb": (["sample", "--run", NOWHERE, "--prompt", "x", "--image-prefix", "{root}/bomb.png",
                           "--prefix-rows", "2", "--out-dir", "{root}/o"], "bomb.png"),
    "out-dir is a file": (["sample", "--run", NOWHERE, "--prompt", "x", "--out-dir", "{root}/a_file"], "--out-dir"),
    "missing run": (["sample", "--run", NOWHERE, "--prompt", "x", "--out-dir", "{root}/o"], NOWHERE),
    "num-samples 0": (["sample", "--run", NOWHERE, "--prompt", "x", "--num-samples", "0", "--top", "0",
                       "--out-dir", "{root}/o"], "--num-samples"),
    "reconstruct a bomb": (["reconstruct", "--run", NOWHERE, "{root}/bomb.png", "--out", "{root}/r.png"], "dvae"),
    "train-prior on an image dataset": (["train-prior", "--data", "{root}/data", "--tokenizer", "{root}/tokenizer.json",
                                         "--out", "{root}/run", "--preset", "quick", "--set", "text.vocab_size=300",
                                         "--set", "text.text_len=16"], "'tokens'"),
    "malformed tokenizer": (["train-prior", "--data", "{root}/data", "--tokenizer", "{root}/bad_tokenizer.json",
                             "--out", "{root}/run", "--preset", "quick"], "bad_tokenizer.json"),
    "missing tokenizer": (["train-clip", "--data", "{root}/data", "--tokenizer", "{root}/none.json", "--out",
                           "{root}/run", "--preset", "quick"], "none.json"),
    "misspelt attention": (["config", "--set", "prior.attention=sparce"], "prior.attention"),
    "dropout 1.5": (["config", "--set", "prior.dropout=1.5"], "prior.dropout"),
    "learning rate nan": (["config", "--set", "prior_train.learning_rate=nan"], "prior_train.learning_rate"),
    "mesh 3,3,3": (["train-dvae", "--run", "{root}/run_mesh", "--preset", "quick", "--set",
                    "mesh.ici_parallelism=3,3,3"], "mesh.ici_parallelism"),
    "show --num -1": (["data", "show", "{root}/data", "--num", "-1", "--out", "{root}/s.png"], "--num"),
    "show --columns 0": (["data", "show", "{root}/data", "--columns", "0", "--out", "{root}/s.png"], "--columns"),
    "show a missing split": (["data", "show", "{root}/data", "--split", "nope", "--out", "{root}/s.png"], "'nope'"),
    "tokenizer --vocab-size 10": (["tokenizer", "train", "--data", "{root}/data", "--out", "{root}/t.json",
                                   "--vocab-size", "10", "--text-len", "8"], "--vocab-size"),
    "tokenizer --text-len 0": (["tokenizer", "train", "--data", "{root}/data", "--out", "{root}/t.json",
                                "--vocab-size", "300", "--text-len", "0"], "--text-len"),
    "tokenizer --dropout 2": (["tokenizer", "train", "--data", "{root}/data", "--out", "{root}/t.json",
                               "--vocab-size", "300", "--text-len", "8", "--dropout", "2"], "--dropout"),
    "object-array npz": (["convert", "openai-dvae", "--encoder", "{root}/objects.npz", "--decoder",
                          "{root}/objects.npz", "--out", "{root}/converted"], "objects.npz"),
    "encode without inputs": (["encode", "--dvae", "{root}/x"], "--run"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_naming_it(name, inputs, capsys):
    argv, named = CASES[name]
    code = main([arg.replace("{root}", str(inputs)) for arg in argv])
    captured = capsys.readouterr()
    errors = [line for line in (captured.err + captured.out).splitlines() if line.startswith("error:")]
    assert code == 2, (name, captured.err[-2000:])
    assert len(errors) == 1 and named in errors[0], (name, errors)
    assert "Traceback" not in captured.err + captured.out
