"""The main job end to end: `dalle-jax demo --quick` builds every artefact, a rerun skips every stage, and
`dalle-jax sample` works on its run directory (layout, JSONL, bad input). No quality thresholds here: the quick
preset trains for seconds; the demo preset's numbers are measured and reported in the README."""

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dalle_jax.config import ConfigError
from dalle_jax.data.scorer import SHAPE_MAX_DISTANCE
from dalle_jax.demo.runner import demo_config

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "dalle_jax.cli", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(quick_demo):
    return quick_demo  # conftest: one quick demo run per session, shared with tests/test_serve.py


def test_quick_demo_writes_every_artefact(quick_run):
    run, result = quick_run
    assert "demo: done" in result.stdout
    report = json.loads((run / "report.json").read_text())
    assert set(report["wall_s"]) >= {"data", "tokenizer", "dvae", "encode", "prior", "clip", "evaluate", "total"}
    assert set(report["caption_match"]) == {"in_distribution", "heldout", "position", "relations"}
    for table in report["caption_match"].values():
        assert all(0.0 <= v <= 1.0 for v in table["best_of_n"].values())
        assert "1" in table["best_of_n"]
        # the hits' shape distance lies within the scorer's tolerance
        assert table["right_samples"] == 0 or 0 <= table["right_shape_distance_median"] <= SHAPE_MAX_DISTANCE
    assert 0 < report["prior"]["eval/image_loss"] < 2 * report["prior"]["eval/uniform_image_loss"]
    assert "eval/codebook_perplexity" in report["dvae"] and "eval/retrieval_top1" in report["clip"]
    text = (run / "report.md").read_text()
    assert "Caption match" in text and "Accuracy vs N" in text and "right samples: shape distance" in text
    holdout = "red triangle,blue circle,yellow cross,green square"  # the default the quick run was built with
    assert report["holdout"] == holdout and f"held out: {holdout})" in text.splitlines()[0]
    for name in ("samples_in_distribution", "samples_heldout", "samples_position", "samples_relations",
                 "image_to_image"):
        with Image.open(run / f"{name}.png") as img:
            img.load()
            assert img.size[0] > 64 and img.size[1] > 32
            assert np.asarray(img).std() > 0  # not a blank canvas
    assert (run / "tokenizer.json").is_file()
    for stage in ("dvae", "prior", "clip"):
        assert any((run / stage / "checkpoints").iterdir()), stage


def test_demo_preset_compose_is_the_demo_with_4x_the_prior_updates():
    seed = int(np.random.default_rng().integers(100))
    demo = demo_config(False, "red circle", seed, ["clip_train.steps=10"])
    compose = demo_config(False, "red circle", seed, ["clip_train.steps=10"], preset="compose")
    assert compose.prior_train.steps == 4 * demo.prior_train.steps
    assert compose.prior_train.warmup_steps == 4 * demo.prior_train.warmup_steps
    assert dataclasses.replace(compose, name="demo", prior_train=demo.prior_train) == demo  # nothing else differs
    with pytest.raises(ConfigError, match="choose one of demo, compose, ablation"):
        demo_config(False, None, 0, [], preset="bench")


def test_demo_preset_is_the_ablation_preset_with_colour_shape_codes():
    """The demo adopted colour/shape codes (issue 17); the experiments' base keeps one code table, and nothing
    else differs (the prior's image vocabulary and factors follow the dVAE)."""
    seed = int(np.random.default_rng().integers(100))
    demo = demo_config(False, "red circle", seed, [])
    ablation = demo_config(False, "red circle", seed, [], preset="ablation")
    assert (demo.dvae.factor_codes, demo.dvae.factor_inputs, demo.prior.image_factor_codes) == (32, "colour_shape", 32)
    assert (ablation.dvae.factor_codes, ablation.prior.image_factor_codes, ablation.dvae.vocab_size) == (0, 0, 512)
    assert dataclasses.replace(demo, name="ablation", dvae=ablation.dvae) == ablation
    from dalle_jax.experiments import spec  # every experiment starts from the one-table preset (or composes it)

    assert {spec.load(name).base for name in spec.available()} == {"ablation", "compose"}


def test_rerun_skips_finished_stages(quick_run):
    run, _ = quick_run
    before = json.loads((run / "report.json").read_text())
    again = _cli("demo", "--quick", "--out", str(run), "--quiet", timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("skipped") == 7, again.stderr[-3000:]
    after = json.loads((run / "report.json").read_text())
    assert after["caption_match"] == before["caption_match"] and after["wall_s"] == before["wall_s"]


def test_a_different_config_in_the_same_run_dir_is_refused(quick_run):
    run, _ = quick_run
    result = _cli("demo", "--quick", "--out", str(run), "--seed", "7", "--quiet", timeout=120)
    assert result.returncode == 2 and "different config" in result.stderr


def test_sample_command_on_the_demo_run(quick_run, tmp_path):
    run, _ = quick_run
    out = tmp_path / "samples"
    result = _cli("sample", "--run", str(run), "--prompt", "a purple cross above an orange circle",
                  "--prompt", "a red square", "--num-samples", "3", "--top", "2", "--seed", "5", "--quiet",
                  "--out-dir", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    split = re.search(r"sampling ([\d.]+) s, decoding ([\d.]+) s, scoring ([\d.]+) s .*peak RSS (\d+) MiB",
                      result.stdout)  # where the time went, and the memory high-water mark
    assert split and float(split[1]) > 0 and int(split[4]) > 100, result.stdout
    lines = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt_index"], r["rank"]) for r in lines] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(set(r) >= {"prompt_index", "prompt", "rank", "file", "clip_score", "seed"} for r in lines)
    assert [r["file"] for r in lines] == ["0000_00.png", "0000_01.png", "0001_00.png", "0001_01.png"]
    for p in (0, 1):  # ranks are in CLIP-score order
        scores = [r["clip_score"] for r in lines if r["prompt_index"] == p]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
    for r in lines:
        with Image.open(out / r["file"]) as img:
            assert img.size == (32, 32)
    with Image.open(out / "grid.png") as img:
        assert img.size[0] > 64

    # Same seed, another batch size, or on a 2x2x2 mesh (params sharded, 3 candidates padded to the 4-way data
    # split): the same images (per-sample keys).
    for name, extra in (("batch_2", ["--batch-size", "2"]), ("mesh_2x2x2", ["--mesh", "2,2,2"])):
        again = tmp_path / name
        result = _cli("sample", "--run", str(run), "--prompt", "a purple cross above an orange circle",
                      "--prompt", "a red square", "--num-samples", "3", "--top", "2", "--seed", "5", "--quiet",
                      *extra, "--out-dir", str(again), timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        for r in lines:
            np.testing.assert_array_equal(np.asarray(Image.open(out / r["file"])),
                                          np.asarray(Image.open(again / r["file"])), err_msg=name)


def test_concept_guidance_through_the_reranker(quick_run):
    """sample_and_rerank with concepts: a single-object prompt is guided by its one-concept captions (its kept
    images are decodes of exactly what the sampler draws with those concept ids), a relation (no concepts) is drawn
    as without them, and the concepts move the logits."""
    from dalle_jax.data.scorer import one_concept_captions
    from dalle_jax.sampling.rerank import decode_images, encode_prompts, load_run, sample_and_rerank
    from dalle_jax.sampling.sampler import SampleConfig, cached_logits, sample_tokens

    run = load_run(quick_run[0])
    prompts = ["a small red circle", "a purple cross above an orange circle"]
    concepts = [one_concept_captions(p) for p in prompts]
    assert concepts == [["a small circle", "a small red object"], []]
    seed, n = int(np.random.default_rng().integers(2**31)), 4
    cfg = SampleConfig(concept_scale=1.5)
    guided = sample_and_rerank(run, prompts, num_samples=n, top=n, seed=seed, sample_config=cfg, batch_size=4,
                               progress=False, concepts=concepts)
    plain = sample_and_rerank(run, prompts, num_samples=n, top=n, seed=seed, batch_size=4, progress=False)
    text = np.repeat(encode_prompts(run.tokenizer, prompts[:1]), n, axis=0)
    ids = np.broadcast_to(encode_prompts(run.tokenizer, concepts[0]), (n, 2, text.shape[1]))  # (B, K, T)
    tokens = sample_tokens(run.prior, text, seed, cfg, pad_ids=run.tokenizer.pad_ids(), concepts=ids)
    want = decode_images(run, tokens)
    for kept in guided[0]:
        np.testing.assert_array_equal(kept.image, want[kept.sample_index])
    # The concepts move the logits (the quick prior is peaked: with shared noise its draws may not move).
    moved = cached_logits(run.prior, text, tokens, pad_ids=run.tokenizer.pad_ids(), concept_scale=1.5, concepts=ids)
    assert np.abs(moved - cached_logits(run.prior, text, tokens)).max() > 1e-3
    by_index = {k.sample_index: k.image for k in plain[1]}
    for kept in guided[1]:
        np.testing.assert_array_equal(kept.image, by_index[kept.sample_index])


def test_sample_bad_input_is_named(quick_run, tmp_path):
    run, _ = quick_run
    empty = _cli("sample", "--run", str(run), "--prompt", "  ", "--out-dir", str(tmp_path / "a"), timeout=120)
    assert empty.returncode == 2 and "prompt 0 is empty" in empty.stderr
    image = tmp_path / "source.png"
    Image.fromarray(np.full((50, 70), 128, np.uint8), mode="L").save(image)  # any size, any mode
    rows = _cli("sample", "--run", str(run), "--prompt", "a red square", "--image-prefix", str(image),
                "--prefix-rows", "8", "--out-dir", str(tmp_path / "b"), timeout=120)
    assert rows.returncode == 2 and "--prefix-rows 8" in rows.stderr
    missing = _cli("sample", "--run", str(tmp_path / "nowhere"), "--prompt", "a red square",
                   "--out-dir", str(tmp_path / "c"), timeout=120)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    for mesh, message in (("2,2", "three integers"), ("3,1,1", "does not fit this host's 8 devices")):  # 8 devices here
        bad = _cli("sample", "--run", str(run), "--prompt", "a red square", "--mesh", mesh,
                   "--out-dir", str(tmp_path / "d"), timeout=120)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]


PEAK_RSS = """
import resource, sys
from dalle_jax.cli import main
code = main(sys.argv[1:])
print("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)
sys.exit(code)
"""


def _sample_peak_rss(run, out, num_samples: int) -> float:
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, "sample", "--run", str(run), "--prompt", "a red square",
                             "--num-samples", str(num_samples), "--top", "4", "--quiet", "--out-dir", str(out)],
                            env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return float(result.stdout.split("peak_rss_mb")[-1])


def test_sample_memory_does_not_grow_with_num_samples(quick_run, tmp_path):
    """Decode and rerank go batch by batch, keeping the best --top: 4096 candidates cost no more memory than 64
    (the bound, 256 MB, is a quarter of what decoding 4096 quick-preset candidates at once needs)."""
    run, _ = quick_run
    small = _sample_peak_rss(run, tmp_path / "small", 64)
    large = _sample_peak_rss(run, tmp_path / "large", 4096)
    assert large < small + 256, (small, large)
    lines = (tmp_path / "large" / "samples.jsonl").read_text().splitlines()
    assert len(lines) == 4 and max(json.loads(line)["sample_index"] for line in lines) < 4096


def test_sample_checks_its_out_dir_first_and_replaces_an_earlier_runs_files(quick_run, tmp_path, capsys):
    from dalle_jax.cli import main

    run, _ = quick_run
    a_file = tmp_path / "taken.png"
    a_file.write_bytes(b"not a directory")
    # a missing run directory would fail only when loading: the out-dir is named first
    for out_dir in (a_file, a_file / "sub"):
        assert main(["sample", "--run", str(tmp_path / "nowhere"), "--prompt", "a red square",
                     "--out-dir", str(out_dir)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out-dir") and err.count("\n") == 1, err
    out = tmp_path / "reused"
    out.mkdir()
    for stale in ("0007_03.png", "grid.png"):
        (out / stale).write_bytes(b"an earlier run")
    (out / "samples.jsonl").write_text('{"prompt_index": 7}\n')
    (out / "notes.txt").write_text("the user's own file")
    assert main(["sample", "--run", str(run), "--prompt", "a red square", "--num-samples", "2", "--top", "1",
                 "--quiet", "--out-dir", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["0000_00.png", "grid.png", "notes.txt", "samples.jsonl"]
    assert [json.loads(line)["prompt_index"] for line in (out / "samples.jsonl").read_text().splitlines()] == [0]
