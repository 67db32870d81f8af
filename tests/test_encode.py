"""The encode job (images -> token dataset) and reconstruct command, on a briefly trained dVAE."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from dalle_jax import config as config_lib
from dalle_jax.cli import main
from dalle_jax.data.pipeline import open_split
from dalle_jax.encode import encode_dataset, reconstruct_files
from dalle_jax.runs import dataset_dir_for, load_dvae
from dalle_jax.train.dvae import train_dvae

OVERRIDES = ["dvae.group_count=2", "data.image_size=16", "data.grid=1", "data.num_train=48", "data.num_validation=20",
             "data.num_test=0", "dvae_train.steps=2", "dvae_train.eval_every=100", "dvae_train.save_every=2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    config = config_lib.resolve("quick", OVERRIDES)
    train_dvae(config, run_dir, progress=False)
    return run_dir, config


def test_token_dataset_equals_encoding_each_image(run):
    run_dir, config = run
    data = dataset_dir_for(config.data, run_dir)
    out = encode_dataset(run_dir, data, run_dir / "tokens", batch_size=16, progress=False)
    dvae = load_dvae(run_dir)
    for split in ("train", "validation"):
        tokens, images = open_split(out, split), open_split(data, split)
        assert len(tokens) == len(images)
        by_id = {int(images[i]["id"]): images[i] for i in range(len(images))}
        rows = [tokens[i] for i in range(len(tokens))]
        assert sorted(int(r["id"]) for r in rows) == sorted(by_id)
        batch = np.stack([by_id[int(r["id"])]["image"] for r in rows])
        expected = np.asarray(dvae.encode(jnp.asarray(batch, jnp.float32) / 255.0))
        got = np.stack([r["tokens"] for r in rows])
        assert got.dtype == np.uint16 and got.shape == expected.shape == (len(rows), 8, 8)
        np.testing.assert_array_equal(got, expected)
        assert all(r["caption"] == by_id[int(r["id"])]["caption"] for r in rows)
    info = out / "dataset_info.json"
    before = info.stat().st_mtime_ns
    assert encode_dataset(run_dir, data, run_dir / "tokens", batch_size=16, progress=False) == out
    assert info.stat().st_mtime_ns == before  # reused, not rebuilt


def test_reconstruct_reports_bad_files(run, tmp_path, capsys):
    run_dir, _ = run
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng().integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(good)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    grid, problems = reconstruct_files(run_dir, [str(good), str(bad), str(tmp_path / "missing.jpg")],
                                       tmp_path / "grid.png")
    assert Image.open(grid).size[0] > 32
    assert len(problems) == 2 and "bad.png" in problems[0] and "missing.jpg" in problems[1]
    assert main(["reconstruct", "--run", str(run_dir), str(good), str(bad), "--out", str(tmp_path / "x.png")]) == 1
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no readable images"):
        reconstruct_files(run_dir, [str(bad)], tmp_path / "none.png")


def test_posterior_topk_holds_the_encoders_most_likely_codes(run, tmp_path):
    from dalle_jax.models.dvae import map_pixels

    run_dir, config = run
    data = dataset_dir_for(config.data, run_dir)
    k = 5
    out = encode_dataset(run_dir, data, tmp_path / "tokens", batch_size=16, posterior_topk=k, progress=False)
    plain = encode_dataset(run_dir, data, run_dir / "tokens", batch_size=16, progress=False)
    assert out.parent.name != plain.parent.name  # a separate dataset; the argmax one is untouched
    dvae = load_dvae(run_dir)
    rows, images = open_split(out, "validation"), open_split(data, "validation")
    by_id = {int(images[i]["id"]): images[i]["image"] for i in range(len(images))}
    got = [rows[i] for i in range(len(rows))]
    batch = jnp.asarray(np.stack([by_id[int(r["id"])] for r in got]), jnp.float32) / 255.0
    logits = np.asarray(dvae.encoder(map_pixels(batch)), np.float64)
    codes = np.stack([r["posterior_codes"] for r in got]).astype(np.int64)
    stored = np.stack([r["posterior_logits"] for r in got])
    assert codes.shape == (len(got), 8, 8, k) and stored.dtype == np.float32
    np.testing.assert_array_equal(codes[..., 0], np.stack([r["tokens"] for r in got]))  # the first is the argmax
    np.testing.assert_allclose(stored, np.take_along_axis(logits, codes, -1), rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(stored, axis=-1) <= 0)
    kth = -np.sort(-logits, axis=-1)[..., k - 1:k]  # no code left out beats the k-th kept
    np.testing.assert_allclose(stored[..., -1:], kth, rtol=1e-5, atol=1e-4)


def test_two_hosts_encode_their_shares_into_the_one_host_dataset(run, tmp_path):
    """Two processes joined by jax.distributed (one CPU device each): each encodes half of every batch, process 0
    writes the dataset, and it equals the one-process encode token for token (a ragged last batch included)."""
    import os
    import subprocess
    import sys

    import portpicker

    run_dir, config = run
    data = dataset_dir_for(config.data, run_dir)
    single = encode_dataset(run_dir, data, tmp_path / "one", batch_size=16, progress=False)
    coordinator = f"localhost:{portpicker.pick_unused_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1", "TF_CPP_MIN_LOG_LEVEL": "2",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    procs = [subprocess.Popen([sys.executable, "-m", "dalle_jax.cli", "encode", "--dvae", str(run_dir), "--data",
                               str(data), "--out", str(tmp_path / "two"), "--batch-size", "16", "--coordinator",
                               coordinator, "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [proc.communicate(timeout=240) for proc in procs]
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err[-3000:]
    two = outputs[0][0].strip().splitlines()[-1].removeprefix("tokens: ")
    assert outputs[1][0].strip().splitlines()[-1] == outputs[0][0].strip().splitlines()[-1]
    for split in ("train", "validation"):
        a, b = open_split(single, split), open_split(two, split)
        assert len(a) == len(b) == len(open_split(data, split))
        for i in range(len(a)):
            assert int(a[i]["id"]) == int(b[i]["id"]) and a[i]["caption"] == b[i]["caption"]
            np.testing.assert_array_equal(a[i]["tokens"], b[i]["tokens"])
