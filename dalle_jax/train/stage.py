"""The one stage driver of the dVAE, prior and CLIP trainers.

A trainer describes its stage as a `Stage` (model, step, data, evaluation, what to log and plot) and calls
`run_stage`, which does what the three share, in this order:

    RUN/<stage>/ created; config.json, <stage>_config.json and tokenizer.json written by process 0 only
    mesh from config.mesh; every batch the stage uses checked against the data-parallel size and the hosts
    the Grain pipeline over the training split (per-host shard, seeded shuffle, the stage's transform)
    optimizer (train.optim) and the train state born sharded (train.loop.init_state), its parameters taken from
        train.init_from when <stage>_train.init_from names a source run (checked before anything is written)
    the jitted step, the eval hook, and train.loop.Loop: resume, steps, logs, evals, checkpoints, SIGTERM
    curves as PNG (process 0), and the summary {"step", "metrics", "preempted", "run_dir"}

Where each stage's files live is the run-directory contract's (`dalle_jax.runs`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax
from flax import nnx
from jax.sharding import Mesh

from dalle_jax import config as config_lib
from dalle_jax import distributed, runs, sharding
from dalle_jax.config import Config
from dalle_jax.data.pipeline import ExampleTransform, Pipeline, device_batch
from dalle_jax.data.tokenizer import TextTokenizer
from dalle_jax.train import loop, optim
from dalle_jax.train.metrics import read_metrics

# (optimizer, state spec, mesh, rules) -> the jitted train step
StepFactory = Callable[[optax.GradientTransformation, loop.StateSpec, Mesh, sharding.Rules], Callable]
# (state spec, mesh, rules) -> evaluate(state, step) -> metrics
EvalFactory = Callable[[loop.StateSpec, Mesh, sharding.Rules], Callable[[dict, int], dict]]


@dataclasses.dataclass
class Stage:
    """What one trainer trains, and how; `run_stage` does the rest."""

    name: str  # "dvae" | "prior" | "clip": the run subdirectory and the progress-bar label
    train: Any  # the stage's *_train config section (batch, steps, seed, schedule, checkpoints)
    model_config: Any  # the model's config, written as <name>_config.json
    model_fn: Callable[[], nnx.Module]
    make_step: StepFactory
    train_source: Any  # random-access training split
    transform: ExampleTransform  # example -> the arrays of one row of a batch
    device_keys: tuple[str, ...]  # the host batch's fields the step takes
    make_eval: EvalFactory
    tokenizer: TextTokenizer | None = None  # saved beside the model when the stage reads captions
    batch_checks: tuple[int, ...] = ()  # further global batches the mesh must divide (microbatches, eval batches)
    scalars: Callable[[int], dict] | None = None  # host-side values logged with the metrics (schedules)
    tokens_per_example: int | None = None  # adds tokens_per_s to the logs
    curves: tuple[tuple[str, tuple[str, ...], str], ...] = ()  # (PNG name, metric keys, title) after training


def batch_shardings(shapes: dict[str, tuple[int, ...]], mesh: Mesh, rules: sharding.Rules) -> dict:
    """NamedShardings of global batch arrays, sharded on their leading (batch) axis."""
    return {name: sharding.named_sharding(mesh, sharding.batch_axes(len(shape)), rules, shape, "batch")
            for name, shape in shapes.items()}


# Fields a rerun may change: how long to train and how often to log, evaluate and save (extending a run), and how
# the data is read. Everything else must match the run's saved config (the mesh may change: restores reshard).
RERUN_MAY_CHANGE = frozenset({"steps", "log_every", "eval_every", "save_every", "keep_checkpoints",
                              "max_nonfinite_steps", "eval_batches", "read_threads", "prefetch"})


def check_rerun(config: Config, run_dir: str | Path, stage: str) -> None:
    """Raises, before anything is written, if RUN/<stage> was trained with another config: a rerun resumes the
    saved run, so a different model, data or recipe would overwrite its config and fail on its checkpoints."""
    saved_path = runs.stage_dir(run_dir, stage) / runs.CONFIG
    if not saved_path.is_file():
        return
    saved = config_lib.load_config(saved_path)
    differences = []
    for section in ("data", "text", stage, f"{stage}_train"):
        before, after = config_lib.to_dict(getattr(saved, section)), config_lib.to_dict(getattr(config, section))
        differences += [f"{section}.{name}={before[name]!r}, you asked {after[name]!r}" for name in before
                        if before[name] != after[name] and name not in RERUN_MAY_CHANGE]
    if differences:
        shown = "; ".join(differences[:3]) + (f" (and {len(differences) - 3} more)" if len(differences) > 3 else "")
        raise config_lib.ConfigError(
            f"{saved_path.parent} was trained with {shown}: rerun with the run's options (its config is "
            f"{saved_path}, preset '{saved.name}') or use another run directory; nothing was changed")


def write_stage_files(out: Path, config: Config, stage: str, model_config: Any,
                      tokenizer: TextTokenizer | None = None) -> None:
    """config.json, <stage>_config.json (+ tokenizer.json): process 0 only, since on a shared run directory the
    hosts would race on the same files."""
    out.mkdir(parents=True, exist_ok=True)
    if not distributed.is_main():
        return
    config_lib.save_config(config, out / runs.CONFIG)
    (out / runs.MODEL_CONFIG[stage]).write_text(json.dumps(dataclasses.asdict(model_config), indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save(out / runs.TOKENIZER)


def _has_checkpoint(directory: Path) -> bool:
    return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def run_stage(stage: Stage, config: Config, run_dir: str | Path, *, progress: bool = True) -> dict:
    """Trains (or resumes) `stage` into RUN/<stage.name>; returns its final step, metrics and directory."""
    from dalle_jax.images import plot_curves

    cfg = stage.train
    out = runs.stage_dir(run_dir, stage.name)
    mesh = sharding.make_mesh(config.mesh)
    rules = config.mesh.rules
    for batch in (cfg.batch_size, *stage.batch_checks):
        sharding.check_batch(batch, mesh, rules, jax.process_count())
    optimizer = optim.make_optimizer(cfg)
    source = None
    if cfg.init_from and not _has_checkpoint(out / runs.CHECKPOINTS):  # a started run resumes from its own
        from dalle_jax.train.init_from import load_source_params

        # before anything is written or compiled: a model that does not fit the source leaves nothing behind
        source = load_source_params(cfg.init_from, stage.name,
                                    loop.state_spec(stage.model_fn, optimizer, mesh, rules, cfg.seed))
    write_stage_files(out, config, stage.name, stage.model_config, stage.tokenizer)
    batches = Pipeline(stage.train_source, global_batch=cfg.batch_size, seed=cfg.seed, transform=stage.transform,
                       read_threads=config.data.read_threads, prefetch=config.data.prefetch)
    state, spec = loop.init_state(stage.model_fn, optimizer, mesh, rules, cfg.seed)
    if source is not None:
        state = {**state, **source}
    train_step = stage.make_step(optimizer, spec, mesh, rules)
    evaluate = stage.make_eval(spec, mesh, rules)

    runner = loop.Loop(out, out / runs.CHECKPOINTS, steps=cfg.steps, save_every=cfg.save_every, log_every=cfg.log_every,
                       eval_every=cfg.eval_every, keep=cfg.keep_checkpoints, name=stage.name,
                       max_nonfinite_steps=cfg.max_nonfinite_steps)
    result = runner.run(state, spec, train_step, batches, batch_size=cfg.batch_size, evaluate=evaluate,
                        to_device=lambda b: device_batch({k: b[k] for k in stage.device_keys}, mesh, rules),
                        extra_scalars=stage.scalars, progress=progress, tokens_per_example=stage.tokens_per_example)
    if distributed.is_main():
        for name, keys, title in stage.curves:
            plot_curves(out / name, read_metrics(out), list(keys), title=title)
    return {"step": result["step"], "metrics": result["metrics"], "preempted": result["preempted"],
            "run_dir": str(out)}
