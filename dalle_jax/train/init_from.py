"""Fine-tuning: a stage starts from another run's parameters (and their EMA) with a fresh optimizer.

`<stage>_train.init_from` names the source (a run directory or its stage directory, or a converted OpenAI dVAE).
Before anything compiles, every parameter's shape is compared with the source checkpoint's metadata; a mismatch
is one `ConfigError` naming the parameters, both shapes and the fix. A stage that already has its own checkpoint
resumes from it and ignores the source.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from dalle_jax import runs
from dalle_jax.errors import ConfigError

_SHOWN = 3  # mismatched parameters named in the message


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def source_checkpoints(source: str | Path, stage: str) -> Path:
    """The checkpoint directory of `stage` in `source` (a run or a stage directory)."""
    try:
        return runs.find_model_dir(source, stage) / runs.CHECKPOINTS
    except FileNotFoundError as err:
        raise ConfigError(f"{stage}_train.init_from={source}: {err}") from err


def load_source_params(source: str | Path, stage: str, spec: Any) -> dict:
    """{"params", "ema_params"} of the source's latest checkpoint, laid out as `spec` (the new run's state spec)
    lays out its own; a source without EMA (a converted dVAE) gives its params for both.

    Raises:
        ConfigError: the source has no checkpoint, or its parameters differ in name or shape from the new run's.
    """
    from dalle_jax.train.checkpoint import Checkpointer

    directory = source_checkpoints(source, stage)
    if not directory.is_dir():
        raise ConfigError(f"{stage}_train.init_from={source}: {directory} does not exist (train that stage first)")
    checkpointer = Checkpointer(directory, save_every=1, keep=1, read_only=True)
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise ConfigError(f"{stage}_train.init_from={source}: {directory} holds no finished checkpoint")
        abstract = checkpointer.saved_abstract(step, spec.shardings["step"])  # replicated
        _check_shapes(_flat_shapes(abstract["params"]), _flat_shapes(spec.abstract["params"]), source, stage)
        for name in ("params", "ema_params"):
            if name in abstract:
                abstract[name] = spec.abstract["params"]
        restored = checkpointer.restore_latest(abstract)
    finally:
        checkpointer.close()
    params = restored.state["params"]
    return {"params": params, "ema_params": restored.state.get("ema_params", params)}


def _check_shapes(theirs: dict, ours: dict, source: str | Path, stage: str) -> None:
    problems = [f"{name} is {theirs[name]} there and {shape} here" for name, shape in ours.items()
                if name in theirs and theirs[name] != shape]
    problems += [f"{name} is missing there" for name in ours if name not in theirs]
    problems += [f"{name} is not in this model" for name in theirs if name not in ours]
    if problems:
        shown = "; ".join(problems[:_SHOWN]) + (f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN
                                                 else "")
        hint = " and tokenizer" if stage in ("prior", "clip") else ""
        raise ConfigError(f"{stage}_train.init_from={source}: the {stage} does not fit: {shown}; train with the "
                          f"source run's {stage} config{hint} (its preset and --set values, "
                          f"{runs.find_model_dir(source, stage) / runs.MODEL_CONFIG[stage]})")
