"""`dalle-jax train` end to end on a user's data: tar shards and parquet files with bad records of every kind, a
fine-tune from a run (--init-from), and the released OpenAI dVAE architecture as the image tokenizer (--dvae).
Each run is the quick preset cut to a few steps: what is checked is the plumbing (every stage, the build report,
the run layout `sample` reads), not sample quality."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_jax import config as config_lib
from dalle_jax.cli import main
from tests.shard_data import write_parquet_files, write_tar_shards

FAST = ["--preset", "quick", "--quiet", "--samples", "2", "--validation-fraction", "0.2",
        "--set", "dvae_train.steps=6", "--set", "dvae_train.save_every=6", "--set", "dvae_train.eval_every=6",
        "--set", "prior_train.steps=4", "--set", "prior_train.save_every=4", "--set", "prior_train.eval_every=4",
        "--set", "clip_train.steps=4", "--set", "clip_train.save_every=4", "--set", "clip_train.eval_every=4"]


def _build_report(run: Path) -> dict:
    (report,) = run.glob("data/*/*/1.0.0/build_report.json")
    return json.loads(report.read_text())


def _check_report(run: Path, kept: int) -> dict:
    report = json.loads((run / "report.json").read_text())
    assert report["data"]["num_train"] + report["data"]["num_validation"] == kept
    evaluation = report["evaluate"]
    assert evaluation["captions"] == report["data"]["num_validation"] > 1
    for key in ("clip_score_samples", "clip_score_real"):
        assert -1.0 <= evaluation[key]["low"] <= evaluation[key]["mean"] <= evaluation[key]["high"] <= 1.0
    assert evaluation["frechet_samples"] >= 0 and evaluation["frechet_reconstructions"] >= 0
    assert Image.open(run / "samples.png").size[0] > 100
    markdown = (run / "report.md").read_text()
    assert "Fréchet distance in CLIP image space" in markdown
    for name in ("prior", "clip") + (() if (run / "dvae").is_symlink() else ("dvae",)):
        assert f"]({name}/loss_curve.png)" in markdown and Image.open(run / name / "loss_curve.png").size[0] > 100
    return report


def _sample(run: Path, tmp_path: Path, prompt: str) -> None:
    out = tmp_path / f"samples_{run.name}"
    assert main(["sample", "--run", str(run), "--prompt", prompt, "--num-samples", "2", "--top", "1",
                 "--out-dir", str(out), "--quiet"]) == 0
    assert len(list(out.glob("*.png"))) >= 1


def test_train_on_tar_shards_then_fine_tune_on_parquet(tmp_path):
    rng = np.random.default_rng()
    tars = write_tar_shards(tmp_path / "tars", rng)
    first = tmp_path / "first"
    assert main(["train", "--data", str(tmp_path / "tars"), "--out", str(first), *FAST]) == 0
    build = _build_report(first)
    assert {k: sorted(v) for k, v in build["skipped"].items()} == {k: sorted(v) for k, v in tars.skipped.items()}
    assert sum(map(len, build["skipped"].values())) == 19  # 2 x 9 bad records + the damaged shard
    _check_report(first, len(tars.kept))
    _sample(first, tmp_path, next(iter(tars.kept.values())))

    parquet = write_parquet_files(tmp_path / "pq", rng)
    tuned = tmp_path / "tuned"
    assert main(["train", "--data", str(tmp_path / "pq"), "--out", str(tuned), "--init-from", str(first), *FAST]) == 0
    build = _build_report(tuned)
    assert {k: sorted(v) for k, v in build["skipped"].items()} == {k: sorted(v) for k, v in parquet.skipped.items()}
    _check_report(tuned, len(parquet.kept))
    config = config_lib.load_config(tuned / "config.json")
    assert config.prior_train.init_from == config.clip_train.init_from == str(first.resolve())
    assert (tuned / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    assert (tuned / "dvae").resolve() == (first / "dvae").resolve()  # the prior's tokens keep their meaning
    _sample(tuned, tmp_path, next(iter(parquet.kept.values())))
    # rerunning a finished run changes nothing and says where the report is
    assert main(["train", "--data", str(tmp_path / "pq"), "--out", str(tuned), "--init-from", str(first), *FAST]) == 0


def test_train_with_the_released_openai_dvae_as_tokenizer(tmp_path):
    """The released dVAE's code (`dall_e` modules with the release's 8192 codes, at the package's smallest width to
    keep CI short; random weights saved as OpenAI saved theirs) converted by `dalle-jax convert openai-dvae`, then
    used by `train --dvae`: the prior reads 8192 codes on the image grid (32 px here -> 4x4; 256 px gives the
    paper's 32x32), and the token dataset is the converted encoder's argmax. The full-size conversion is checked
    against the reference in tests/test_convert_dvae.py."""
    torch = pytest.importorskip("torch", reason="building the reference weights needs torch (CPU)")
    dall_e = pytest.importorskip("dall_e", reason="building the reference weights needs the DALL-E==0.1 package")
    from dalle_jax.data.pipeline import open_split
    from dalle_jax.runs import load_dvae

    torch.manual_seed(0)
    torch.save(dall_e.Encoder(n_hid=64, vocab_size=8192, requires_grad=False), tmp_path / "encoder.pkl")
    torch.save(dall_e.Decoder(n_init=8, n_hid=64, vocab_size=8192, requires_grad=False), tmp_path / "decoder.pkl")
    converted = tmp_path / "openai_dvae"
    assert main(["convert", "openai-dvae", "--encoder", str(tmp_path / "encoder.pkl"), "--decoder",
                 str(tmp_path / "decoder.pkl"), "--out", str(converted)]) == 0
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng()
    for i in range(48):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"picture number {i} of noise")
    run = tmp_path / "run"
    assert main(["train", "--data", str(images), "--out", str(run), "--dvae", str(converted), *FAST]) == 0
    config = config_lib.load_config(run / "config.json")
    assert config.dvae.vocab_size == 8192 and config.prior.image_vocab_size == 8192
    assert config.prior.grid_size == 4
    dvae = load_dvae(converted)
    (tokens_dir,) = run.glob("tokens/*/*/1.0.0")
    (data_dir,) = run.glob("data/*/*/1.0.0")
    tokens, data = open_split(tokens_dir, "train"), open_split(data_dir, "train")
    by_id = {int(data[i]["id"]): data[i]["image"] for i in range(len(data))}
    batch = np.stack([by_id[int(tokens[i]["id"])] for i in range(len(tokens))])
    expected = np.asarray(dvae.encode(np.asarray(batch, np.float32) / 255.0))
    np.testing.assert_array_equal(np.stack([tokens[i]["tokens"] for i in range(len(tokens))]), expected)
    _check_report(run, 48)
    _sample(run, tmp_path, "picture number 3 of noise")


def test_data_sources_train_accepts(tmp_path):
    """A built dataset is used as it is (its version dir, or the TFDS data dir above exactly one); a folder of
    images is built into RUN/data; a missing SRC is named."""
    from dalle_jax.demo.own_data import BuildOptions, build_dataset_from

    assert main(["data", "emoji", "--out", str(tmp_path / "emoji"), "--num", "4", "--num-validation", "2",
                 "--num-test", "0"]) == 0
    (version_dir,) = (tmp_path / "emoji").glob("captioned_emoji/*/1.0.0")
    for given in (tmp_path / "emoji", version_dir):
        built = build_dataset_from(str(given), 32, tmp_path / "out", BuildOptions(), verbose=False)
        assert built["dataset_dir"] == str(version_dir.resolve())
    images = tmp_path / "images"
    images.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"grey {i}")
    built = build_dataset_from(str(images), 32, tmp_path / "out", BuildOptions(validation_fraction=0.3),
                               verbose=False)
    assert "/captioned_folder/" in built["dataset_dir"] and built["build"].startswith("folder dataset: 3 images")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset_from(str(tmp_path / "nowhere"), 32, tmp_path / "out", BuildOptions(), verbose=False)


def test_unusable_data_is_one_line(tmp_path, capsys):
    """A folder without one usable image and a parquet file without the named column stop `train` with one line,
    exit 2, before any training."""
    empty = tmp_path / "nothing_usable"
    empty.mkdir()
    (empty / "notes.txt").write_text("a caption without an image")
    (empty / "broken.png").write_bytes(b"not a png")
    assert main(["train", "--data", str(empty), "--out", str(tmp_path / "a"), "--preset", "quick", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable images" in err[0] and "1 corrupt" in err[0]
    write_parquet_files(tmp_path / "pq", np.random.default_rng())
    assert main(["train", "--data", str(tmp_path / "pq"), "--out", str(tmp_path / "b"), "--preset", "quick",
                 "--caption-column", "alt_text", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no caption column 'alt_text'" in err[0]
    assert not (tmp_path / "b" / "dvae").exists()
