"""Runs an experiment's (variant, seed) cells with the library's stage functions (the ones `dalle-jax demo` uses).

Layout of OUT (default runs/experiments/<name>/<scale>) and SHARED (default runs/experiments/shared/<scale>, shared
by every experiment of that scale; OUT/shared when OUT is given):

    SHARED/<stage>-<hash>/       one dataset, tokenizer, dVAE (+ its tokens), prior or CLIP per distinct config:
                                 the hash covers the config sections that produced it, so cells that agree upstream
                                 share the work (every prior ablation, in any experiment, trains one demo dVAE);
                                 `done.json` marks it finished. Run one experiment at a time per SHARED.
    OUT/cells/<variant>/seed<k>/ dvae, prior, clip -> links to the shared stages; result.json when the cell is done

Resumable: finished shared stages and cells are skipped; an interrupted training stage resumes from its checkpoints
(the trainers' own resume), a SIGTERM during one saves and stops the run with a line saying to rerun. A sweep longer
than one machine's session continues on another from its published results (`Runner.adopt`): a published cell whose
variant, seed, scale, sampling and config equal this run's counts as finished and keeps its date and commit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dalle_jax import config as config_lib
from dalle_jax import runs
from dalle_jax.config import Config
from dalle_jax.demo.report import machine
from dalle_jax.demo.runner import build_dataset, build_tokenizer, train_stage
from dalle_jax.experiments.spec import Experiment
from dalle_jax.train.loop import DivergenceError

log = logging.getLogger(__name__)
RESULT = "result.json"
DONE = "done.json"

# Per scale: how each cell is evaluated (prompts per caption-match set, candidates per prompt, images for the
# Fréchet distances, blur radii). An experiment may raise num_samples (rerank_n needs 64).
EVALUATION = {
    "quick": {"prompts_per_set": 2, "num_samples": 4, "frechet_images": 16, "blur_radii": (0, 1)},
    "cpu": {"prompts_per_set": 32, "num_samples": 8, "frechet_images": 256, "blur_radii": (0, 1, 2)},
    "tpu": {"prompts_per_set": 256, "num_samples": 64, "frechet_images": 2048, "blur_radii": (0, 1, 2, 4)},
}

# Which config sections produce each shared stage (its directory name hashes them).
_INPUTS = {
    "data": ("data",),
    "tokenizer": ("data", "text"),
    "dvae": ("data", "dvae", "dvae_train"),
    "prior": ("data", "text", "dvae", "dvae_train", "prior", "prior_train"),
    "clip": ("data", "text", "clip", "clip_train"),
}


def stage_key(config: Config, stage: str) -> str:
    """`<stage>-<12 hex>`: the hash of what the sections that produce `stage` set away from their defaults (data_dir
    excluded: set by the runner), so a field added to the code later, left at its default, keeps every key."""
    set_fields = _set_fields(config_lib.to_dict(config), config)
    sections = {name: set_fields[name] for name in _INPUTS[stage]}
    digest = hashlib.sha256(json.dumps(sections, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{stage}-{digest}"


class Preempted(Exception):
    """A signal stopped a training stage after it saved (the trainers' SIGTERM handling); a rerun resumes it."""


@dataclasses.dataclass
class Runner:
    experiment: Experiment
    scale: str
    out: Path
    seeds: tuple[int, ...] | None = None
    progress: bool = True
    variants: tuple[str, ...] | None = None  # a subset of the experiment's variants (default: all)
    shared_root: Path | None = None  # where shared stages live (default OUT/shared)
    commit: str | None = None  # the source commit cells record (taken when run() starts)

    @property
    def evaluation(self) -> dict:
        options = dict(EVALUATION[self.scale])
        options.update(self.experiment.evaluation.get(self.scale, {}))
        return options

    def cell_dir(self, variant: str, seed: int) -> Path:
        return self.out / "cells" / variant / f"seed{seed}"

    def cell_done(self, variant: str, seed: int) -> bool:
        return (self.cell_dir(variant, seed) / RESULT).is_file()

    def run(self) -> list[dict]:
        """Every cell (skipping finished ones); returns their results."""
        from tqdm.auto import tqdm

        self.commit = _commit()  # the code this process runs (HEAD may move while a long sweep goes on)

        self.out.mkdir(parents=True, exist_ok=True)
        cells = self.experiment.cells(self.seeds, self.variants)
        todo = [c for c in cells if not self.cell_done(*c)]
        if len(todo) < len(cells):
            log.info("%s: %d of %d cells done before — skipped", self.experiment.name, len(cells) - len(todo),
                     len(cells))
        bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=f"{self.experiment.name} cells",
                   unit="cell", disable=not self.progress, dynamic_ncols=True)
        for variant, seed in todo:
            bar.set_postfix(cell=f"{variant}/seed{seed}")
            self.run_cell(variant, seed)
            bar.update(1)
        bar.close()
        return [self.result(variant, seed) for variant, seed in cells]

    def finished(self, selected_only: bool = True) -> list[dict]:
        """The results of the cells finished so far (for a report on a sweep still running): of this run's seeds and
        variants, or with `selected_only=False` of the whole experiment (what a run of a subset publishes, so that
        the cells run or adopted before stay in the report)."""
        cells = self.experiment.cells(*((self.seeds, self.variants) if selected_only else ()))
        return [self.result(*cell) for cell in cells if self.cell_done(*cell)]

    def result(self, variant: str, seed: int) -> dict:
        return json.loads((self.cell_dir(variant, seed) / RESULT).read_text())

    def adopt(self, published: Path, source: Experiment | None = None) -> list[tuple[str, int]]:
        """Takes the cells of a published results.json (`experiment report --publish`) that this run would compute
        identically (same variant, seed, scale, sampling and config, the dataset's location aside) as finished,
        writing each into its cell directory with `adopted_from`; returns them. Every cell of the experiment is
        adopted, not only this run's seeds and variants: a run of a subset reports (and publishes) them too. A
        published cell whose config differs (the experiment or a preset changed since) is logged and left to run.

        With `source` (another experiment, whose results `published` holds): a cell of it counts for every cell of
        this experiment with the same seed, scale, sampling and config, under whatever variant names — a cell is
        what its config computes. The two must run the same stages and evaluation. (A metric added to the code after
        the cell ran is missing from it, as from a same-experiment cell published before; the report shows "—".)"""
        document = json.loads(Path(published).read_text())
        source = source or self.experiment
        if document.get("experiment") != source.name:
            raise ValueError(f"{published} holds experiment {document.get('experiment')!r}, not {source.name!r}")
        other = source is not self.experiment
        if other and (source.stages != self.experiment.stages
                      or source.evaluation.get(self.scale) != self.experiment.evaluation.get(self.scale)):
            raise ValueError(f"experiment {source.name} runs other stages or another evaluation than "
                             f"{self.experiment.name} at scale {self.scale}: its cells are not this experiment's")
        adopted = []
        wanted = set(self.experiment.cells())
        for cell in document.get("cells", []):
            seed = cell["seed"]
            keys = ([(v, seed) for v in self.experiment.variants] if other else [(cell["variant"], seed)])
            for key in keys:
                if key not in wanted or cell["scale"] != self.scale or self.cell_done(*key):
                    continue
                same = (_same_config(cell["config"], self.experiment.config(*key, self.scale))
                        and cell.get("sampling", {}) == self.experiment.sampling.get(key[0], {}))
                if not same:
                    if not other:  # this experiment's own cell changed since it was published
                        log.warning("%s: published cell %s/seed%d ran another config; it runs again",
                                    self.experiment.name, *key)
                    continue
                origin = f"{published} ({source.name} {cell['variant']}/seed{seed})" if other else str(published)
                self.cell_dir(*key).mkdir(parents=True, exist_ok=True)
                _write_json(self.cell_dir(*key) / RESULT, {**cell, "experiment": self.experiment.name,
                                                           "variant": key[0], "adopted_from": origin})
                adopted.append(key)
        return adopted

    # ---- one cell

    def run_cell(self, variant: str, seed: int) -> dict:
        start = time.perf_counter()
        config = self.experiment.config(variant, seed, self.scale)
        cell = self.cell_dir(variant, seed)
        cell.mkdir(parents=True, exist_ok=True)
        metrics: dict[str, float] = {}
        stages = self.experiment.stages
        dataset = self.shared(config, "data", lambda d: self._data(config, d))["dataset_dir"]
        config = config_lib.apply_overrides(config, [f"data.data_dir={dataset}"])
        tokenizer = None
        if "prior" in stages or "clip" in stages:
            tokenizer = self.shared(config, "tokenizer", lambda d: self._tokenizer(config, dataset, d))["path"]
        builds = {"dvae": lambda d: self._dvae(config, dataset, d),
                  "prior": lambda d: self._prior(config, self._tokens(config, summaries["dvae"], dataset), tokenizer,
                                                 d),
                  "clip": lambda d: self._clip(config, dataset, tokenizer, d)}
        summaries: dict[str, dict] = {}
        diverged = None
        for stage in (s for s in stages if s in builds):
            summaries[stage] = self.shared(config, stage, builds[stage])
            if "diverged" in summaries[stage]:  # the cell's result is the divergence; later stages cannot run
                diverged = summaries[stage]["diverged"]
                break
            metrics.update(_prefixed(stage, summaries[stage]["metrics"]))
            _link(cell / stage, Path(summaries[stage]["dir"]) / stage)
        if "evaluate" in stages and diverged is None:
            from dalle_jax.experiments.evaluate import evaluate_cell

            options = {**self.evaluation, "sample": self.experiment.sampling.get(variant, {})}
            metrics.update(evaluate_cell(cell, config, dataset, seed, options, progress=self.progress))
        metrics["diverged"] = float(diverged is not None)  # so a claim can count divergences across seeds
        result = {"experiment": self.experiment.name, "variant": variant, "seed": seed, "scale": self.scale,
                  "overrides": self.experiment.variants[variant],
                  "sampling": self.experiment.sampling.get(variant, {}), "metrics": metrics, "diverged": diverged,
                  "wall_s": time.perf_counter() - start, "finished": time.strftime("%Y-%m-%d"),
                  "commit": self.commit or _commit(), "machine": machine(), "config": config_lib.to_dict(config)}
        _write_json(cell / RESULT, result)
        log.info("%s: cell %s/seed%d done in %.0f s", self.experiment.name, variant, seed, result["wall_s"])
        return result

    def shared(self, config: Config, stage: str, build: Callable[[Path], dict]) -> dict:
        """Runs `build(directory)` once per distinct upstream config; later cells read its done.json."""
        directory = (self.shared_root or self.out / "shared") / stage_key(config, stage)
        done = directory / DONE
        if done.is_file():
            return json.loads(done.read_text())
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            summary = build(directory)
        except DivergenceError as error:  # a finding (the paper: linear temperature "typically led to divergence")
            log.warning("%s: %s diverged: %s", self.experiment.name, stage, error)
            summary = {"diverged": str(error)}
        if summary.get("preempted"):
            raise Preempted(f"{self.experiment.name}: the {stage} stage in {directory} was stopped by a signal and "
                            "saved; rerun the same command to resume it")
        summary = {**summary, "dir": str(directory), "wall_s": time.perf_counter() - start}
        _write_json(done, summary)
        return summary

    # ---- the shared stages: the demo's stage bodies, each into its own directory

    def _data(self, config: Config, directory: Path) -> dict:
        return {"dataset_dir": build_dataset(config, directory)}

    def _tokenizer(self, config: Config, dataset: str, directory: Path) -> dict:
        build_tokenizer(config, dataset, directory)
        return {"path": str(runs.tokenizer_path(directory))}

    def _dvae(self, config: Config, dataset: str, directory: Path) -> dict:
        from dalle_jax.encode import encode_dataset

        summary = train_stage("dvae", config, directory, progress=self.progress)
        if summary["preempted"] or "prior" not in self.experiment.stages:  # tokens only feed a prior
            return {"metrics": _metrics(summary), "preempted": summary["preempted"]}
        tokens = encode_dataset(runs.stage_dir(directory, "dvae"), dataset, runs.tokens_dir(directory),
                                progress=self.progress)
        return {"metrics": _metrics(summary), "tokens": str(tokens)}

    def _tokens(self, config: Config, dvae: dict, dataset: str) -> str:
        """The token set the cell's prior reads: the dVAE stage's argmax tokens, or (for a prior trained on the
        posterior) a second set beside them with the top-k posterior, encoded once by the same dVAE."""
        from dalle_jax.encode import encode_dataset

        topk = config.prior_train.encoded_topk
        if not topk:
            return dvae["tokens"]
        return str(encode_dataset(runs.stage_dir(dvae["dir"], "dvae"), dataset, runs.tokens_dir(dvae["dir"]),
                                  posterior_topk=topk, progress=self.progress))

    def _prior(self, config: Config, tokens: str, tokenizer: str, directory: Path) -> dict:
        summary = train_stage("prior", config, directory, data=tokens, tokenizer=tokenizer, progress=self.progress)
        return {"metrics": _metrics(summary), "preempted": summary["preempted"]}

    def _clip(self, config: Config, dataset: str, tokenizer: str, directory: Path) -> dict:
        summary = train_stage("clip", config, directory, data=dataset, tokenizer=tokenizer, progress=self.progress)
        return {"metrics": _metrics(summary), "preempted": summary["preempted"]}


def _set_fields(values: dict, config: Config) -> dict:
    """`values` (a config as `to_dict` gives it, or as a results.json stored it) reduced to what each section sets
    away from the defaults of `config`'s section types, in JSON form, without the dataset's location (the runner sets
    it). Two configs that train alike reduce alike, also when one was recorded before a field (at its default)
    existed."""
    values = json.loads(json.dumps(values, default=str))
    values["data"].pop("data_dir", None)
    values.pop("name", None)  # the preset's name labels a config; it trains nothing
    reduced = {}
    for name, section in values.items():
        if isinstance(section, dict) and dataclasses.is_dataclass(getattr(config, name, None)):
            defaults = json.loads(json.dumps(dataclasses.asdict(type(getattr(config, name))()), default=str))
            section = {k: v for k, v in section.items() if k not in defaults or v != defaults[k]}
        reduced[name] = section
    return reduced


def _same_config(published: dict, current: Config) -> bool:
    """Equal configs, the dataset's location aside; a field the published config lacks (added to the code since it
    ran) counts as equal when this run leaves it at its default: the published cell ran without it, i.e. as if so."""
    return _set_fields(published, current) == _set_fields(config_lib.to_dict(current), current)


def _commit() -> str | None:
    """The source checkout's commit (with "+changes" when its tracked files differ), or None outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "diff", "--quiet", "HEAD", "--", "dalle_jax"],
                               capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+changes" if dirty.returncode else "")


def _metrics(summary: dict) -> dict[str, float]:
    return {k: v for k, v in summary.items() if k not in ("step", "preempted")}


def _prefixed(stage: str, metrics: dict) -> dict[str, float]:
    return {f"{stage}/{k}": v for k, v in metrics.items()}


def _link(link: Path, target: Path) -> None:
    """cells/<variant>/seed<k>/<stage> -> the shared stage (relative, so OUT can move)."""
    if link.is_symlink() or link.exists():
        return
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float) + "\n")
    tmp.replace(path)
