"""The experiment system: every experiment file loads and its variants differ only in their ablated keys; the
statistics (t-intervals, verdicts) and the CLIP Fréchet distance against references; a --quick sweep end to end
through the CLI (cells share upstream stages, a rerun skips finished cells, a SIGTERM'd cell resumes, the report
has intervals and a verdict per claim)."""

import dataclasses
import datetime
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import linalg, stats

from dalle_jax import config as config_lib
from dalle_jax.demo.report import machine
from dalle_jax.errors import InputError
from dalle_jax.experiments import Claim, report, spec
from dalle_jax.experiments.metrics import blur, frechet_distance, frechet_distance_from_stats
from dalle_jax.experiments.runner import Runner

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "dalle_jax.cli", "experiment", *args], env=ENV,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------ the files

def _changed_fields(a: config_lib.Config, b: config_lib.Config) -> set[str]:
    da, db = config_lib.to_dict(a), config_lib.to_dict(b)
    return {f"{section}.{key}" for section in da if isinstance(da[section], dict)
            for key in da[section] if da[section][key] != db[section][key]}


# The prior's and reranker's fields Config.__post_init__ derives from the text, dvae and data sections.
DERIVED = {f"prior.{k}" for k in ("text_vocab_size", "text_len", "pad_mode", "image_vocab_size",
                                  "image_factor_codes", "grid_size")} | {
    f"clip.{k}" for k in ("image_size", "text_vocab_size", "text_len", "pad_mode")}


def _named(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0] for o in overrides}


@pytest.mark.parametrize("name", spec.available())
def test_every_experiment_loads_and_its_variants_differ_only_in_the_ablated_keys(name):
    experiment = spec.load(name)
    assert experiment.doc.startswith(f"dalle-jax experiment run {name}"), "the docstring opens with the command"
    assert len(experiment.seeds) >= 3 and experiment.claims
    assert len(experiment.cells()) == len(experiment.variants) * len(experiment.seeds)
    variants = list(experiment.variants)
    for scale in experiment.scales:
        configs = {v: experiment.config(v, experiment.seeds[0], scale) for v in variants}  # every key resolves
        for v in variants[1:]:
            changed = _changed_fields(configs[variants[0]], configs[v])
            allowed = _named(experiment.variants[variants[0]]) | _named(experiment.variants[v])
            # a key a variant sets may change the fields Config derives (text.pad_mode -> prior.pad_mode,
            # dvae.vocab_size -> prior.image_vocab_size, dvae.group_count -> prior.grid_size)
            assert changed - DERIVED <= allowed, f"{name}/{v} at {scale} also changes {changed - allowed}"
    seeded = experiment.config(variants[0], experiment.seeds[1], "cpu")
    for section in experiment.seed_sections:
        assert getattr(seeded, section).seed == experiment.seeds[1]
    for seed, overrides in experiment.seed_overrides.items():  # e.g. the seed's holdout set reaches its cells
        for v in variants:
            resolved = experiment.config(v, seed, "cpu")
            assert config_lib.apply_overrides(resolved, overrides) == resolved or _named(overrides) & _named(
                experiment.variants[v]), f"{name}/{v}: seed {seed}'s overrides {overrides} do not hold"


def test_experiments_share_one_stage_cache_per_scale_unless_out_is_given():
    import argparse

    from dalle_jax.commands.experiment import _setup

    args = dict(name="dvae_kl_weight", scale="cpu", quick=False, seeds=None, variants=None, quiet=True)
    default, _ = _setup(argparse.Namespace(**args, out=None))
    assert default.out == Path("runs/experiments/dvae_kl_weight/cpu")
    assert default.shared_root == Path("runs/experiments/shared/cpu")
    other, _ = _setup(argparse.Namespace(**{**args, "name": "prior_padding"}, out=None))
    assert other.shared_root == default.shared_root  # one demo dVAE for every experiment at this scale
    given, _ = _setup(argparse.Namespace(**args, out="elsewhere"))
    assert given.shared_root is None and given.out == Path("elsewhere")  # self-contained: elsewhere/shared


def test_variants_select_a_subset_of_cells_and_an_unknown_one_is_named():
    import argparse

    from dalle_jax.commands.experiment import _setup

    experiment = spec.load("composition_sampling")
    args = dict(name="composition_sampling", scale="cpu", quick=False, seeds="0,2", quiet=True, out=None)
    runner, command = _setup(argparse.Namespace(**args, variants="guidance_1,clip_negatives"))
    assert experiment.cells(runner.seeds, runner.variants) == [("guidance_1", 0), ("guidance_1", 2),
                                                               ("clip_negatives", 0), ("clip_negatives", 2)]
    assert command.endswith("--seeds 0,2 --variants guidance_1,clip_negatives")
    with pytest.raises(InputError, match="guidance_3 not among composition_sampling's variants"):
        _setup(argparse.Namespace(**args, variants="guidance_1,guidance_3"))
    with pytest.raises(InputError, match="--seeds 0,5: 5 not among composition_sampling's seeds 0, 1, 2"):
        _setup(argparse.Namespace(**{**args, "seeds": "0,5"}, variants=None))
    with pytest.raises(InputError, match="give comma-separated integers"):
        _setup(argparse.Namespace(**{**args, "seeds": "zero"}, variants=None))


def test_stage_keys_follow_their_inputs_and_ignore_a_field_added_at_its_default():
    import dataclasses

    from dalle_jax.experiments.runner import stage_key

    config = config_lib.resolve("demo", [])
    keys = {stage: stage_key(config, stage) for stage in ("data", "tokenizer", "dvae", "prior", "clip")}
    longer = config_lib.apply_overrides(config, ["dvae_train.steps=3000"])
    assert stage_key(longer, "dvae") != keys["dvae"] and stage_key(longer, "prior") != keys["prior"]
    assert stage_key(longer, "clip") == keys["clip"] and stage_key(longer, "data") == keys["data"]
    moved = config_lib.apply_overrides(config, ["data.data_dir=/elsewhere"])
    assert all(stage_key(moved, stage) == key for stage, key in keys.items())

    @dataclasses.dataclass(frozen=True)
    class DataWithALaterField(config_lib.DataConfig):
        added_later: float = 0.0

    later = dataclasses.replace(config, data=DataWithALaterField(**dataclasses.asdict(config.data)))
    assert all(stage_key(later, stage) == key for stage, key in keys.items())
    set_away = dataclasses.replace(later, data=dataclasses.replace(later.data, added_later=0.5))
    assert stage_key(set_away, "dvae") != keys["dvae"]


def test_seed_overrides_and_sampling_name_only_what_exists():
    fields = dict(name="t", base="demo", variants={"a": []}, stages=("dvae",), metrics=("dvae/x",),
                  claims=(), scales={"cpu": [], "quick": []})
    with pytest.raises(config_lib.ConfigError, match="seed_overrides"):
        spec.Experiment(**fields, seed_overrides={7: ["data.seed=1"]})
    with pytest.raises(config_lib.ConfigError, match="guidance"):
        spec.Experiment(**fields, sampling={"a": {"guidance": 2.0}})
    experiment = spec.Experiment(**fields, seed_overrides={1: ["data.holdout=red circle"]})
    assert experiment.config("a", 1, "cpu").data.holdout == "red circle"
    assert experiment.config("a", 0, "cpu").data.holdout == config_lib.DataConfig().holdout


def test_list_names_every_experiment_and_a_bad_name_is_one_line():
    listed = _cli("list", timeout=120)
    assert listed.returncode == 0, listed.stderr[-2000:]
    for name in spec.available():
        assert f"{name}:" in listed.stdout
    bad = _cli("run", "no_such_experiment", timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "no experiment 'no_such_experiment'" in bad.stderr and "dvae_kl_weight" in bad.stderr


# ------------------------------------------------------------------------------------------------ statistics

def test_interval_is_the_student_t_interval_and_drops_non_finite_values():
    rng = np.random.default_rng()
    values = list(rng.normal(size=int(rng.integers(2, 9))))
    got = report.interval([*values, math.nan])
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert got["n"] == len(values)
    np.testing.assert_allclose([got["mean"], got["low"], got["high"]], [np.mean(values), low, high], rtol=1e-10)
    assert math.isnan(report.interval([1.0])["low"]) and report.interval([])["n"] == 0


@pytest.mark.parametrize("expect,low,high,verdict", [
    ("higher", 0.1, 0.5, "reproduced"), ("higher", -0.5, -0.1, "contradicted"), ("higher", -0.1, 0.5, "inconclusive"),
    ("lower", -0.5, -0.1, "reproduced"), ("lower", 0.1, 0.5, "contradicted"), ("lower", math.nan, 0.1, "inconclusive"),
    ("same", -0.04, 0.03, "reproduced"), ("same", 0.06, 0.2, "contradicted"), ("same", -0.01, 0.2, "inconclusive"),
])
def test_verdicts(expect, low, high, verdict):
    claim = Claim("c", a=("a", "m"), b=("b", "m"), expect=expect, tolerance=0.05)
    assert report.verdict(claim, low, high) == verdict


def test_claims_pair_seeds_and_diverged_cells_drop_out():
    experiment = spec.Experiment(
        name="t", base="demo", variants={"a": [], "b": []}, stages=("dvae",), metrics=("dvae/x", "diverged"),
        claims=(Claim("a higher", a=("a", "dvae/x"), b=("b", "dvae/x"), expect="higher"),),
        scales={"cpu": [], "quick": []})
    rng = np.random.default_rng()
    base = rng.normal(size=4) * 10  # large seed effects that pairing removes
    results = [{"variant": "a", "seed": s, "metrics": {"dvae/x": base[s] + 1 + 0.01 * s, "diverged": 0.0}}
               for s in range(4)]
    results += [{"variant": "b", "seed": s, "metrics": {"dvae/x": base[s], "diverged": 0.0}} for s in range(3)]
    results.append({"variant": "b", "seed": 3, "metrics": {"diverged": 1.0}, "diverged": "nan at step 5"})
    summary = report.summarize(experiment, results)
    claim = summary["claims"][0]
    assert claim["n"] == 3 and claim["verdict"] == "reproduced"
    np.testing.assert_allclose(claim["mean"], 1.01)
    assert summary["variants"]["b"]["diverged_cells"] == 1 and summary["variants"]["a"]["dvae/x"]["n"] == 4
    # the count of diverged cells and a metric named "diverged" (0/1 per cell) are both kept
    assert summary["variants"]["b"]["diverged"]["mean"] == 0.25 and summary["variants"]["a"]["diverged_cells"] == 0


# ------------------------------------------------------------------------------------------------ metrics

def test_frechet_distance_of_gaussian_samples_matches_the_closed_form():
    rng = np.random.default_rng()
    dim, count = 6, 40_000
    m1, m2 = rng.normal(size=dim), rng.normal(size=dim)
    v1, v2 = rng.uniform(0.2, 3.0, size=dim), rng.uniform(0.2, 3.0, size=dim)
    x1 = m1 + np.sqrt(v1) * rng.normal(size=(count, dim))
    x2 = m2 + np.sqrt(v2) * rng.normal(size=(count, dim))
    # diagonal Gaussians: ||m1 - m2||^2 + sum (sqrt v1 - sqrt v2)^2
    closed = float(np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2))
    assert abs(frechet_distance(x1, x2) - closed) < 0.03 * closed + 0.02


def test_frechet_from_stats_matches_the_sqrtm_formula_on_full_covariances():
    rng = np.random.default_rng()
    dim = int(rng.integers(3, 12))
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    c1, c2 = a @ a.T + 0.1 * np.eye(dim), b @ b.T + 0.1 * np.eye(dim)
    m1, m2 = rng.normal(size=dim), rng.normal(size=dim)
    reference = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    np.testing.assert_allclose(frechet_distance_from_stats(m1, c1, m2, c2), reference, rtol=1e-6)
    assert abs(frechet_distance_from_stats(m1, c1, m1, c1)) < 1e-8


def test_blur_removes_high_frequencies_and_radius_0_is_identity():
    images = np.zeros((2, 16, 16, 3), np.uint8)
    images[:, ::2] = 255  # horizontal stripes: the highest frequency
    assert blur(images, 0) is images
    blurred = blur(images, 1.5)
    assert blurred.shape == images.shape and blurred.std() < 0.25 * images.std()


def test_round_trip_accuracy_groups_lattice_objects_by_size_and_holdout():
    from dalle_jax.data import shapes
    from dalle_jax.experiments.evaluate import round_trip_accuracy

    config = config_lib.resolve("demo", ["data.holdout=red circle,blue square"])
    objects = shapes.lattice_objects(32, 4)
    assert len(objects) == 32 * (7 * 7 + 5 * 5)  # every pair; 7x7 corners for 8 px objects, 5x5 for 14 px ones
    assert round_trip_accuracy(lambda images: images, config) == {
        "round_trip/large_heldout": 1.0, "round_trip/large_trained": 1.0, "round_trip/small_heldout": 1.0,
        "round_trip/small_trained": 1.0}
    # a codec that always answers one large red circle is right exactly for the red circles (a held-out pair here)
    circle = shapes.render_objects([objects[-1] | {"color": "red", "shape": "circle"}], 32)
    measured = round_trip_accuracy(lambda images: np.broadcast_to(circle, images.shape), config)
    assert measured["round_trip/large_heldout"] == pytest.approx(0.5)  # red circle right, blue square wrong
    assert measured["round_trip/large_trained"] == 0.0 and measured["round_trip/small_trained"] == 0.0
    assert measured["round_trip/small_heldout"] == pytest.approx(0.5)  # the scorer ignores size here


# ------------------------------------------------------------------------------------------------ end to end

SWEEP = '''\
"""dalle-jax experiment run {path}

A two-variant prior sweep at the quick scale, for the tests."""

from dalle_jax.experiments import Claim, Experiment

EXPERIMENT = Experiment(
    name="{name}", base="demo",
    variants={{"weight_eighth": ["prior_train.text_loss_weight=0.125"],
               "weight_half": ["prior_train.text_loss_weight=0.5"]}},
    stages={stages},
    metrics={metrics},
    claims=(Claim("text weight 1/2 lowers the text loss", a=("weight_half", "{claim_metric}"),
                  b=("weight_eighth", "{claim_metric}"), expect="lower"),),
    scales={{"cpu": [], "quick": {quick}}},
    seeds=(0, 1),
    seed_sections={seed_sections},{extra}
)
'''
# Seed 1 also holds other pairs out (a replicate over holdout sets); weight_half samples with guidance.
REPLICATES = """
    seed_overrides={1: ["data.holdout=purple circle,orange square,cyan triangle,black cross"]},
    sampling={"weight_half": {"cfg_scale": 2.0}},"""


def _write_experiment(directory: Path, name: str, extra: str = "", **fields) -> Path:
    path = directory / f"{name}.py"
    path.write_text(SWEEP.format(path=path, name=name, extra=extra, **fields))
    return path


@pytest.fixture(scope="module")
def quick_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    path = _write_experiment(root, "sweep", stages=("dvae", "prior", "clip", "evaluate"),
                             metrics=("prior/eval/text_loss", "caption/mean/best_of_1", "frechet/generated_blur0",
                                      "frechet/reconstructed_blur0"),
                             claim_metric="prior/eval/text_loss", quick=[], seed_sections=("prior_train",),
                             extra=REPLICATES)
    out = root / "out"
    first = _cli("run", str(path), "--quick", "--out", str(out), "--quiet")
    assert first.returncode == 0, first.stderr[-4000:]
    return path, out, first


def test_quick_sweep_runs_every_cell_sharing_upstream_stages(quick_sweep):
    _, out, first = quick_sweep
    shared = sorted(p.name.split("-")[0] for p in (out / "shared").iterdir())
    # one dataset, tokenizer, dVAE and CLIP per holdout set (the seed's), shared by both variants; a prior per cell
    assert shared == ["clip"] * 2 + ["data"] * 2 + ["dvae"] * 2 + ["prior"] * 4 + ["tokenizer"] * 2
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 4
    holdouts = {c["seed"]: c["config"]["data"]["holdout"] for c in results["cells"]}
    assert holdouts[0] == config_lib.DataConfig().holdout and holdouts[1].startswith("purple circle")
    assert {c["variant"]: c["sampling"] for c in results["cells"]} == {"weight_eighth": {},
                                                                        "weight_half": {"cfg_scale": 2.0}}
    for cell in results["cells"]:
        metrics = cell["metrics"]
        assert 0.0 <= metrics["caption/mean/best_of_1"] <= 1.0
        assert {k for k in metrics if k.startswith("round_trip/")} == {
            f"round_trip/{size}_{pairs}" for size in ("small", "large") for pairs in ("trained", "heldout")}
        assert all(0.0 <= v <= 1.0 for k, v in metrics.items() if k.startswith("round_trip/"))
        for category in ("in_distribution", "heldout", "position", "relations"):
            # a sample right on everything is right on its colours and on its shapes
            for concept in ("color", "shape"):
                assert metrics[f"caption/{category}/{concept}_per_sample"] >= metrics[f"caption/{category}/best_of_1"]
        assert metrics["frechet/generated_blur0"] >= 0 and metrics["frechet/reconstructed_blur0"] >= 0
        cell_dir = out / "cells" / cell["variant"] / f"seed{cell['seed']}"
        assert (cell_dir / "samples.png").is_file() and (cell_dir / "samples_heldout.png").is_file()
        assert (cell_dir / "prior" / "prior_config.json").is_file()
    weights = {c["variant"]: c["config"]["prior_train"]["text_loss_weight"] for c in results["cells"]}
    assert weights == {"weight_eighth": 0.125, "weight_half": 0.5}
    assert "sweep:" in first.stdout and "4 cells" in first.stdout


def test_quick_sweep_report_has_intervals_and_a_verdict_per_claim(quick_sweep):
    _, out, _ = quick_sweep
    markdown = (out / "results.md").read_text()
    assert "95% interval" in markdown and "| verdict at this scale |" in markdown
    claim_rows = [line for line in markdown.splitlines() if line.startswith("| text weight 1/2")]
    assert len(claim_rows) == 1 and any(f"**{v}**" in claim_rows[0]
                                        for v in ("reproduced", "contradicted", "inconclusive"))
    results = json.loads((out / "results.json").read_text())
    values = results["variants"]["weight_half"]["prior/eval/text_loss"]["values"]
    assert len(values) == 2 and f"{np.mean(values):.4g} [" in markdown  # mean and interval of the two seeds
    today = datetime.date.today().isoformat()
    assert f"- cells finished: {today} at " in markdown and f" on {machine()} (4 cells)" in markdown
    assert {cell["machine"] for cell in results["cells"]} == {machine()}  # each cell says where it ran
    assert (out / "plot.png").stat().st_size > 1000


def test_quick_sweep_rerun_skips_finished_cells(quick_sweep):
    path, out, _ = quick_sweep
    before = {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/result.json")}
    again = _cli("run", str(path), "--quick", "--out", str(out), "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "4 of 4 cells done before" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("cells/*/*/result.json")} == before
    reported = _cli("report", str(path), "--quick", "--out", str(out))
    assert reported.returncode == 0 and "4 cells" in reported.stdout
    # A run of a subset reports every finished cell (what it publishes keeps the others); `report` of a subset
    # reports that subset.
    subset = _cli("run", str(path), "--quick", "--out", str(out), "--quiet", "--variants", "weight_half",
                  "--seeds", "0")
    assert subset.returncode == 0 and "1 of 1 cells done before" in subset.stderr and "4 cells" in subset.stdout
    assert len(json.loads((out / "results.json").read_text())["cells"]) == 4
    reported = _cli("report", str(path), "--quick", "--out", str(out), "--variants", "weight_half")
    assert reported.returncode == 0 and "2 cells" in reported.stdout
    assert _cli("report", str(path), "--quick", "--out", str(out)).returncode == 0  # all 4 again, for later tests


def test_published_cells_with_this_runs_config_are_adopted_and_changed_ones_run_again(quick_sweep, tmp_path):
    path, out, _ = quick_sweep
    experiment = spec.load(str(path))
    published = json.loads((out / "results.json").read_text())
    changed = published["cells"][1]
    changed["config"]["prior_train"]["text_loss_weight"] = 0.3  # as if the experiment changed since publishing
    del published["cells"][0]["config"]["data"]["train_coverage"]  # as if the field (at its default) came later
    del published["cells"][2]["config"]["data"]["grid"]  # ... but this run sets it away from its default (1)
    (tmp_path / "sweep.json").write_text(json.dumps(published))
    # A run of one cell adopts every published cell of the experiment, not only its own.
    runner = Runner(experiment, "quick", tmp_path / "out", progress=False, seeds=(1,), variants=("weight_half",))
    adopted = runner.adopt(tmp_path / "sweep.json")
    key = lambda cell: (cell["variant"], cell["seed"])  # noqa: E731
    assert key(changed) not in adopted and key(published["cells"][2]) not in adopted
    assert key(published["cells"][0]) in adopted and len(adopted) == 2
    for variant, seed in adopted:
        result = runner.result(variant, seed)
        original = next(c for c in published["cells"] if (c["variant"], c["seed"]) == (variant, seed))
        assert result["metrics"] == original["metrics"] and result["adopted_from"] == str(tmp_path / "sweep.json")
    assert len(runner.finished(selected_only=False)) == 2 and len(runner.finished()) == 1
    assert runner.adopt(tmp_path / "sweep.json") == []  # already finished here
    published["experiment"] = "another"
    (tmp_path / "other.json").write_text(json.dumps(published))
    with pytest.raises(ValueError, match="another"):
        runner.adopt(tmp_path / "other.json")
    missing = _cli("run", str(path), "--quick", "--out", str(tmp_path / "out"), "--resume-published")
    assert missing.returncode == 2 and "sweep.json does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_cells_another_experiment_published_count_where_their_config_is_this_runs(quick_sweep, tmp_path):
    """--adopt-from: a published cell of another experiment is taken for each cell of this one with the same seed,
    scale, sampling and config, under this experiment's variant name; not when it samples otherwise; and never
    from an experiment with another evaluation."""
    path, out, _ = quick_sweep
    sweep = spec.load(str(path))
    published = json.loads((out / "results.json").read_text())
    other = dataclasses.replace(
        sweep, name="other", sampling={},
        variants={"baseline": ["prior_train.text_loss_weight=0.125"], "heavier": ["prior_train.text_loss_weight=0.3"]},
        claims=(Claim("heavier", a=("heavier", "prior/eval/text_loss"), b=("baseline", "prior/eval/text_loss"),
                      expect="lower"),))
    runner = Runner(other, "quick", tmp_path / "out", progress=False)
    # weight_eighth is baseline; weight_half (1/2, guided) is no cell of this experiment
    assert sorted(runner.adopt(out / "results.json", sweep)) == [("baseline", 0), ("baseline", 1)]
    for seed in (0, 1):
        result = runner.result("baseline", seed)
        original = next(c for c in published["cells"] if (c["variant"], c["seed"]) == ("weight_eighth", seed))
        assert result["metrics"] == original["metrics"]
        assert (result["experiment"], result["variant"]) == ("other", "baseline")
        assert result["adopted_from"].endswith(f"(sweep weight_eighth/seed{seed})")
    assert runner.adopt(out / "results.json", sweep) == []  # already finished here
    guided = dataclasses.replace(other, sampling={"baseline": {"cfg_scale": 3.0}})
    assert Runner(guided, "quick", tmp_path / "guided", progress=False).adopt(out / "results.json", sweep) == []
    graded_apart = dataclasses.replace(other, evaluation={"quick": {"num_samples": 3}})
    with pytest.raises(ValueError, match="another evaluation"):
        Runner(graded_apart, "quick", tmp_path / "apart", progress=False).adopt(out / "results.json", sweep)
    missing = _cli("run", str(path), "--quick", "--out", str(tmp_path / "cli"), "--adopt-from", "no_such_experiment")
    assert missing.returncode == 2 and "no_such_experiment.json does not exist" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_a_sigterm_during_a_cell_saves_and_the_rerun_resumes_it(tmp_path):
    path = _write_experiment(tmp_path, "long", stages=("dvae",), metrics=("dvae/eval/mse",),
                             claim_metric="dvae/eval/mse", seed_sections=("dvae_train",),
                             quick=["dvae_train.steps=200", "dvae_train.save_every=5", "dvae_train.log_every=5",
                                    "dvae_train.eval_every=200", "dvae_train.lr_decay_steps=200"])
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dalle_jax.cli", "experiment", "run", str(path), "--quick", "--out", str(out),
               "--seeds", "0"]
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        logged = [json.loads(line)["step"] for m in out.glob("shared/dvae-*/dvae/metrics.jsonl")
                  for line in m.read_text().splitlines()]
        if any(step >= 15 for step in logged):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "stopped by a signal and saved; rerun the same command" in err
    assert not list(out.glob("cells/*/*/result.json"))
    rerun = subprocess.run([*command, "--quiet"], env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [int(line.rsplit("resumed from step ", 1)[1].split()[0]) for line in rerun.stderr.splitlines()
               if "resumed from step" in line]
    assert resumed and resumed[0] >= 15
    results = [json.loads((out / "cells" / v / "seed0" / "result.json").read_text())
               for v in ("weight_eighth", "weight_half")]
    assert all(math.isfinite(r["metrics"]["dvae/eval/mse"]) for r in results)
    # the variants differ only in the prior: both cells link the one dVAE (trained once, resumed once)
    assert len(list(out.glob("shared/dvae-*"))) == 1
    assert results[0]["metrics"] == results[1]["metrics"]
    assert not (out / "cells" / "weight_eighth" / "seed1").exists()  # --seeds 0


def test_the_readme_table_is_the_one_written_from_the_published_results():
    directory = spec.default_directory()
    readme = (directory / "README.md").read_text()
    assert f"{report.INDEX_START}\n{report.index_table(directory)}\n{report.INDEX_END}" in readme, (
        "experiments/README.md is stale: rerun `dalle-jax experiment report NAME --publish`")
