"""`dalle-jax data shards`: web-dataset tars and parquet files (with a bad record of every kind) -> a TFDS dataset.

The references are the generated records themselves: every good record comes back with its caption and the folder
builder's preprocessing of its pixels, every bad one is named under its reason, and the dataset does not depend on
how many workers or hosts converted it.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import portpicker
import pytest

from dalle_jax.cli import main
from dalle_jax.data import shards
from dalle_jax.data.folder import preprocess_image
from dalle_jax.data.pipeline import caption_text, open_split
from tests.shard_data import write_hf_parquet, write_parquet_files, write_tar_shards

SIZE = 16


def _read(version_dir: str) -> dict[str, list[dict]]:
    """{split: examples in dataset order}."""
    out = {}
    for split in ("train", "validation"):
        source = open_split(version_dir, split)
        out[split] = [dict(source[i]) for i in range(len(source))]
    return out


def _check_against(version_dir: str, report, expected) -> None:
    assert {k: sorted(v) for k, v in report.skipped.items()} == {k: sorted(v) for k, v in expected.skipped.items()}
    assert {k: sorted(v) for k, v in report.converted.items()} == {k: sorted(v) for k, v in expected.converted.items()}
    assert all(report.details.get(entry) for entries in report.skipped.values() for entry in entries
               if not entry.endswith("002"))  # every skip but "no caption at all" says why
    examples = [e for split in _read(version_dir).values() for e in split]
    by_source = {caption_text(e["source"]): e for e in examples}
    assert len(by_source) == len(examples) == report.kept == len(expected.kept)
    assert len({int(e["id"]) for e in examples}) == len(examples)
    for source, caption in expected.kept.items():
        example = by_source[source]
        assert caption_text(example["caption"]) == caption
        np.testing.assert_array_equal(example["image"], preprocess_image(expected.images[source], SIZE)[0])
    saved = json.loads((Path(version_dir) / "build_report.json").read_text())
    assert saved["skipped"] == report.skipped and saved["kept"] == report.kept


def test_tar_shards_every_bad_record_named(tmp_path):
    expected = write_tar_shards(tmp_path / "tars", np.random.default_rng())
    version_dir, report = shards.build_shards(str(tmp_path / "out"), shards.ShardsSpec((str(tmp_path / "tars"),),
                                                                                       SIZE, validation_fraction=0.2))
    _check_against(version_dir, report, expected)
    assert "1 unreadable shard" in report.summary() and "records before the damage were kept" in (
        report.details["00002.tar"])
    splits = _read(version_dir)
    assert 0 < len(splits["validation"]) < len(splits["train"])


def test_parquet_img2dataset_and_hf_exports(tmp_path):
    rng = np.random.default_rng()
    expected = write_parquet_files(tmp_path / "pq", rng)
    version_dir, report = shards.build_shards(str(tmp_path / "out"), shards.ShardsSpec((str(tmp_path / "pq"),), SIZE))
    _check_against(version_dir, report, expected)
    hf = write_hf_parquet(tmp_path / "hf", rng)
    version_dir, report = shards.build_shards(str(tmp_path / "out"),
                                              shards.ShardsSpec((str(tmp_path / "hf" / "train.parquet"),), SIZE))
    _check_against(version_dir, report, hf)
    assert report.splits["validation"] == 1  # 12 rows at 5%: the first by hash is moved, as for a folder


def test_workers_and_resume_give_the_same_dataset(tmp_path):
    write_tar_shards(tmp_path / "tars", np.random.default_rng(), good_per_shard=6)
    spec = shards.ShardsSpec((str(tmp_path / "tars"),), SIZE, validation_fraction=0.3)
    one, _ = shards.build_shards(str(tmp_path / "one"), spec)
    two, _ = shards.build_shards(str(tmp_path / "two"), spec, workers=2)
    # An interrupted build: shard 1's part finished before the stop; the rerun converts only the others.
    shard_files = shards.list_shards(spec.sources)
    version_dir = tmp_path / "resumed" / shards.DATASET_NAME / shards.shards_config_name(spec, shard_files) / "1.0.0"
    (version_dir / ".parts").mkdir(parents=True)
    shards.convert_shard(str(version_dir), 1, str(shard_files[1]), "00001.tar", spec)
    part = version_dir / ".parts" / "00001.json"
    before = part.stat().st_mtime_ns
    resumed, _ = shards.build_shards(str(tmp_path / "resumed"), spec)
    assert part.stat().st_mtime_ns == before
    reference = _read(one)
    for other in (two, resumed):
        got = _read(other)
        for split in reference:
            assert [caption_text(e["source"]) for e in got[split]] == [caption_text(e["source"])
                                                                       for e in reference[split]]
            for a, b in zip(got[split], reference[split], strict=True):
                np.testing.assert_array_equal(a["image"], b["image"])
                assert int(a["id"]) == int(b["id"])


def test_rebuild_after_a_shard_changed(tmp_path, capsys):
    write_tar_shards(tmp_path / "tars", np.random.default_rng(), good_per_shard=4)
    args = ["data", "shards", str(tmp_path / "tars"), "--out", str(tmp_path / "out"), "--image-size", str(SIZE)]
    assert main(args) == 0
    assert "reusing" in (capsys.readouterr().out if main(args) == 0 else "")
    tar = tmp_path / "tars" / "00000.tar"
    tar.write_bytes(tar.read_bytes())  # same bytes, new mtime: treated as changed
    os.utime(tar, ns=(tar.stat().st_atime_ns, tar.stat().st_mtime_ns + 10**9))
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0]
    assert main(args + ["--overwrite"]) == 0


def test_missing_parquet_column_is_one_line(tmp_path, capsys):
    write_hf_parquet(tmp_path / "hf", np.random.default_rng(), count=3)
    code = main(["data", "shards", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--caption-column", "alt"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "train.parquet has no caption column 'alt' (columns: image, text)" in err[0] and "--caption-column" in err[0]


def test_two_hosts_convert_their_shares_into_one_dataset(tmp_path):
    """Two processes joined by jax.distributed, as on a pod: host h converts shards h, h + 2, ...; host 0 writes the
    dataset. It equals the one-process build."""
    write_tar_shards(tmp_path / "tars", np.random.default_rng(), good_per_shard=6)
    base = ["data", "shards", str(tmp_path / "tars"), "--image-size", str(SIZE), "--validation-fraction", "0.3"]
    assert main(base + ["--out", str(tmp_path / "one")]) == 0
    coordinator = f"localhost:{portpicker.pick_unused_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
           "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}
    procs = [subprocess.Popen([sys.executable, "-m", "dalle_jax.cli", *base, "--out", str(tmp_path / "two"),
                               "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
    one = next((tmp_path / "one").glob("captioned_shards/*/1.0.0"))
    two = next((tmp_path / "two").glob("captioned_shards/*/1.0.0"))
    parts = [json.loads(p.read_text()) for p in (two / ".parts").glob("*.json")]
    hosts = {part["name"]: part["host"] for part in parts}
    assert hosts == {"00000.tar": 0, "00001.tar": 1, "00002.tar": 0}
    a, b = _read(str(one)), _read(str(two))
    for split in a:
        assert [caption_text(e["source"]) for e in a[split]] == [caption_text(e["source"]) for e in b[split]]
        for x, y in zip(a[split], b[split], strict=True):
            np.testing.assert_array_equal(x["image"], y["image"])


@pytest.mark.parametrize("bad", ["missing", "text"])
def test_bad_sources_are_named(tmp_path, capsys, bad):
    path = tmp_path / ("nothing.tar" if bad == "missing" else "notes.txt")
    if bad == "text":
        path.write_text("hello")
    assert main(["data", "shards", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(path) in err[0]
