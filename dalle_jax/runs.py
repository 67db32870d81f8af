"""The run-directory contract: where each stage writes, and how later stages and commands find and load it.

Every stage writes into one run directory; nothing else in the package spells these paths.

    RUN/config.json        the run's resolved config (`dalle-jax demo`)
    RUN/stages.json        the demo's finished stages and their summaries
    RUN/data/              the built-in shapes dataset (TFDS), built when data.data_dir is empty
    RUN/tokenizer.json     the BPE caption tokenizer
    RUN/dvae/              config.json, dvae_config.json, checkpoints/, metrics.jsonl, events, reconstructions/
    RUN/tokens/            the token dataset `encode` writes (TFDS)
    RUN/prior/             config.json, prior_config.json, tokenizer.json, checkpoints/, metrics.jsonl, curves
    RUN/clip/              config.json, clip_config.json, tokenizer.json, checkpoints/, metrics.jsonl, curves
    RUN/report.{md,json}   the demo's report, beside its sample grids

A stage directory (RUN/dvae, RUN/prior, RUN/clip) also works on its own: a converted OpenAI dVAE is a directory
with dvae_config.json and checkpoints/ and nothing else. Loaders accept the run directory or the stage directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax

from dalle_jax import config as config_lib
from dalle_jax import distributed
from dalle_jax.config import Config
from dalle_jax.errors import DatasetError, InputError

STAGES = ("dvae", "prior", "clip")
MODEL_CONFIG = {stage: f"{stage}_config.json" for stage in STAGES}  # the model's architecture, per stage dir
CONFIG = "config.json"
STAGES_FILE = "stages.json"  # the demo's record of finished stages
TOKENIZER = "tokenizer.json"
CHECKPOINTS = "checkpoints"
DATA = "data"
TOKENS = "tokens"
_MAKE = {  # how to make each stage directory, for error messages
    "dvae": "pass the --out of `dalle-jax convert openai-dvae` or a run directory of `dalle-jax train-dvae`",
    "prior": "pass a run directory of `dalle-jax train-prior` (or its prior/ directory)",
    "clip": "pass the --out of `dalle-jax train-clip` (or its clip/ directory)",
}


# ------------------------------------------------------------------------------------------------ paths

def stage_dir(run_dir: str | Path, stage: str) -> Path:
    """Where `stage` ("dvae", "prior", "clip") writes inside a run directory."""
    return Path(run_dir) / stage


def tokenizer_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / TOKENIZER


def tokens_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / TOKENS


def data_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / DATA


def find_model_dir(path: str | Path, stage: str) -> Path:
    """The directory holding <stage>_config.json: `path` itself or its `<stage>/` (a run directory).
    FileNotFoundError names both places and how to make one."""
    root = Path(path)
    name = MODEL_CONFIG[stage]
    for candidate in (root, stage_dir(root, stage)):
        if (candidate / name).is_file():
            return candidate
    raise FileNotFoundError(f"no {name} in {root} or {stage_dir(root, stage)}: {_MAKE[stage]}")


def find_dataset_dir(path: str | Path) -> Path:
    """A dataset version directory (holding dataset_info.json), or any directory above exactly one."""
    path = Path(path)
    if (path / "dataset_info.json").is_file():
        return path
    found = sorted(p.parent for p in path.rglob("dataset_info.json")) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise DatasetError(f"no prepared dataset under {path} (no dataset_info.json); build one with "
                           f"`dalle-jax data shapes --out {path}`")
    listing = ", ".join(str(p) for p in found)
    raise DatasetError(f"several datasets under {path}; pass one of: {listing}")


def dataset_dir_for(data_config: Any, run_dir: str | Path) -> Path:
    """The dataset a run trains on: `data.data_dir` if set, else the built-in shapes data built in RUN/data
    (built once; rebuilding with the same spec reuses it)."""
    if data_config.data_dir:
        return Path(data_config.data_dir)
    if data_config.dataset != "shapes":
        raise DatasetError(f"data.dataset='{data_config.dataset}' needs data.data_dir: build it with "
                           f"`dalle-jax data folder SRC --out DIR` and pass --set data.data_dir=<printed dir>")
    from dalle_jax.data import shapes
    from dalle_jax.data.pipeline import shapes_spec

    spec = shapes_spec(data_config)
    # Several hosts: process 0 builds first and the others then reuse its files (a shared run directory) or
    # build their own copy (host-local disks), so no two processes write the same files at once.
    if jax.process_index() == 0:
        shapes.build_shapes(str(data_dir(run_dir)), spec)
    distributed.barrier("dalle_jax_build_shapes")
    return Path(shapes.build_shapes(str(data_dir(run_dir)), spec))


def read_model_config(directory: Path, stage: str, cls: type) -> Any:
    """The <stage>_config.json a trainer (or the converter) wrote, as `cls`; JSON lists become tuples."""
    saved = json.loads((directory / MODEL_CONFIG[stage]).read_text())
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})


def load_run_config(directory: Path) -> Config:
    return config_lib.load_config(directory / CONFIG)


# ------------------------------------------------------------------------------------------------ models

def load_dvae(run_or_dvae_dir: str | Path, use_ema: bool = True) -> Any:
    """A converted or trained dVAE (config + latest intact checkpoint); EMA weights by default.

    Works for any checkpoint whose state has "params" / "ema_params" pure dicts beside other items (a
    trainer's optimizer state, step, key): those are read too (Orbax restores whole trees) and dropped.
    """
    from dalle_jax.models.dvae import DVAEConfig, abstract_params, dvae_from_params
    from dalle_jax.train.checkpoint import Checkpointer
    from dalle_jax.train.loop import check_finite

    directory = find_model_dir(run_or_dvae_dir, "dvae")
    config = read_model_config(directory, "dvae", DVAEConfig)
    checkpoints = directory / CHECKPOINTS
    if not checkpoints.is_dir():
        raise FileNotFoundError(f"{checkpoints} does not exist: the dVAE in {directory} has no checkpoint yet")
    key = "ema_params" if use_ema else "params"
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # keep is only applied when saving; this reader never saves.
    checkpointer = Checkpointer(checkpoints, save_every=1, keep=1, read_only=True)
    try:
        latest = checkpointer.latest_step()
        if latest is None:
            raise FileNotFoundError(f"{checkpoints} holds no finished checkpoint")
        abstract = checkpointer.saved_abstract(latest, device)
        if key not in abstract:
            raise KeyError(f"checkpoint {checkpointer.step_directory(latest)} has no '{key}' (items: "
                           f"{sorted(abstract)}){'; try use_ema=False' if use_ema else ''}")
        ours = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            abstract_params(config)[1])
        abstract.update({name: ours for name in ("params", "ema_params") if name in abstract})
        restored = checkpointer.restore_latest(abstract)
    finally:
        checkpointer.close()
    check_finite(restored.state[key], f"{checkpoints}/{restored.step}")
    return dvae_from_params(config, restored.state[key])


def load_prior(run_or_prior_dir: str | Path) -> tuple[Any, Any, Config]:
    """The prior's EMA weights, its tokenizer and the run's config, from RUN/prior (or that directory)."""
    from flax import nnx

    from dalle_jax.data.tokenizer import TextTokenizer
    from dalle_jax.models.prior import Prior
    from dalle_jax.train import loop, optim

    directory = find_model_dir(run_or_prior_dir, "prior")
    for needed in (CONFIG, TOKENIZER):
        if not (directory / needed).is_file():
            raise InputError(f"{directory / needed} not found: is {directory} a prior trained by "
                             "`dalle-jax train-prior` (RUN/prior)?")
    config = load_run_config(directory)
    model = loop.load_trained(directory / CHECKPOINTS, lambda: Prior(config.prior, rngs=nnx.Rngs(0)),
                              optim.make_optimizer(config.prior_train))
    return model, TextTokenizer.load(directory / TOKENIZER), config


def load_clip(run_or_clip_dir: str | Path, use_ema: bool | None = None) -> tuple[Any, Any, Config]:
    """The trained reranker (latest intact checkpoint), its tokenizer and the run's config.

    `use_ema` defaults to the run's clip_train.eval_ema (the parameters its eval reported). The checkpoint is
    restored into the abstract train state rebuilt from the saved configs (on one device), so its content
    fingerprints are checked like a resume's.
    """
    from flax import nnx

    from dalle_jax.data.tokenizer import TextTokenizer
    from dalle_jax.models.clip import CLIP, CLIPConfig
    from dalle_jax.train import loop, optim

    directory = find_model_dir(run_or_clip_dir, "clip")
    config = load_run_config(directory)
    model_cfg = read_model_config(directory, "clip", CLIPConfig)
    tokenizer = TextTokenizer.load(directory / TOKENIZER)
    use_ema = config.clip_train.eval_ema if use_ema is None else use_ema
    model = loop.load_trained(directory / CHECKPOINTS, lambda: CLIP(model_cfg, rngs=nnx.Rngs(0)),
                              optim.make_optimizer(config.clip_train), use_ema=use_ema)
    return model, tokenizer, config
