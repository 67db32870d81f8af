"""Train the CLIP-style reranker on image + caption pairs — `dalle-jax train-clip`.

Loss: symmetric InfoNCE over the global batch (`models.clip.contrastive_loss`) with the learned temperature.
Under data / FSDP sharding the embeddings are global jax.Arrays, so the (B, B) similarity matrix and the loss
are those of the whole batch; XLA inserts the gathers. (No gradient accumulation: InfoNCE over k microbatches
is not the loss of their union, since every example is a negative for every other.)

Optimiser: AdamW on matrices only, linear warm-up then cosine, optional global-norm clipping, parameter EMA
(the shared loop's). Captions are tokenised with the run's tokenizer, with its BPE-dropout in training unless
clip_train.bpe_dropout is off. The model config the run writes (clip_config.json) narrows text_vocab_size to the
tokenizer's and holds the pixel statistics measured on the training split.

Eval: zero-shot retrieval in batches of `retrieval_batch` validation pairs (32 by default; chance 1/32):
  eval/retrieval_top1                 caption -> image top-1 accuracy over all queries
  eval/retrieval_top1_in_distribution queries whose caption names no held-out (colour, shape) pair
  eval/retrieval_top1_heldout         queries that name a held-out pair (the shapes dataset marks them)
  eval/image_to_text_top1             image -> caption top-1 accuracy (+ _in_distribution / _heldout)
  eval/loss                           InfoNCE of the same batches; eval/retrieval_batch, eval/retrieval_chance
Only full batches count, so every query has exactly `retrieval_batch` candidates. On shapes, captions that
several images in a batch satisfy cap what any model can reach: among 32 validation pairs the exact scorer puts
the ceiling at 0.942 in-distribution, 0.851 held-out, 0.909 overall (1k validation, seed 0).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dalle_jax import config as config_lib
from dalle_jax import sharding
from dalle_jax.config import ClipTrainConfig, Config
from dalle_jax.data.pipeline import DatasetError, Pipeline, caption_text, device_batch, open_split
from dalle_jax.data.tokenizer import TextTokenizer
from dalle_jax.models.clip import CLIP, CLIPConfig, contrastive_loss
from dalle_jax.train import loop

DECAYED = frozenset({"wq", "wk", "wv", "wo", "w1", "w2", "patch_embed", "image_proj", "text_proj"})


# ------------------------------------------------------------------------------------------------ optimizer

def decay_mask(params: Any) -> Any:
    """Weight decay on projection matrices only: not gains, biases, embeddings or the temperature (CLIP)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: str(getattr(path[-1], "key", "")) in DECAYED, params)


def learning_rate_schedule(cfg: ClipTrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                              max(cfg.steps, cfg.warmup_steps + 1),
                                              end_value=cfg.learning_rate * cfg.lr_end_fraction)


def make_optimizer(cfg: ClipTrainConfig) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if cfg.clip_norm > 0 else []
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)


# ------------------------------------------------------------------------------------------------ loss

def clip_loss(model: CLIP, batch: dict, key: jax.Array, step: jax.Array) -> tuple[jax.Array, dict]:
    """InfoNCE of a batch {"image" (B, S, S, 3) uint8, "text" (B, T) int32}."""
    image_emb, text_emb = model(batch["image"], batch["text"])
    return contrastive_loss(image_emb, text_emb, model.logit_scale())


def make_clip_step(cfg: ClipTrainConfig, model_cfg: CLIPConfig, optimizer: optax.GradientTransformation,
                   spec: loop.StateSpec, mesh: jax.sharding.Mesh, rules: sharding.Rules) -> Any:
    """The jitted, donated update of the shared loop for global batches {"image", "text"} sharded on batch."""
    batch_shape = {"image": (cfg.batch_size, model_cfg.image_size, model_cfg.image_size, 3),
                   "text": (cfg.batch_size, model_cfg.text_len)}
    batch_sharding = {k: sharding.named_sharding(mesh, sharding.batch_axes(len(s)), rules, s, "batch")
                      for k, s in batch_shape.items()}
    return loop.make_train_step(clip_loss, optimizer, spec, mesh, rules, batch_sharding, cfg.ema_decay,
                                cfg.ema_warmup)


# ------------------------------------------------------------------------------------------------ data

def pair_transform(tokenizer: TextTokenizer, training: bool, holdout: set[tuple[str, str]] = frozenset()):
    """Image dataset example -> {"image" uint8 (S, S, 3), "text" int32 (T,), "heldout" bool, "caption" str}.

    `training` applies the tokenizer's BPE-dropout (its randomness from the per-example generator, so a resumed
    run tokenises as the uninterrupted one).
    """
    from dalle_jax.train.prior import is_heldout

    def transform(example: dict, rng: np.random.Generator) -> dict:
        caption = caption_text(example["caption"])
        text = tokenizer.encode([caption], training=training, rng=rng)[0].astype(np.int32)
        return {"image": np.asarray(example["image"], np.uint8), "text": text,
                "heldout": np.bool_(bool(holdout) and is_heldout(caption, holdout)), "caption": caption}

    return transform


def check_compatible(config: Config, tokenizer: TextTokenizer, dataset_dir: Path) -> None:
    """Errors naming the mismatch before anything compiles."""
    tokenizer.check_config(config.text)
    size = config.clip.image_size
    example = open_split(dataset_dir, "train")[0]
    if "image" not in example:
        raise DatasetError(f"{dataset_dir} has no 'image' field (fields: {sorted(example)}): train-clip reads an "
                           f"image dataset (`dalle-jax data shapes` / `data folder`), not a token dataset")
    shape = np.asarray(example["image"]).shape
    if shape != (size, size, 3):
        raise config_lib.ConfigError(f"dataset {dataset_dir} has {shape} images but the config expects "
                                     f"({size}, {size}, 3): pass --set data.image_size={shape[0]}")


# ------------------------------------------------------------------------------------------------ eval

def retrieval_counts(image_emb: np.ndarray, text_emb: np.ndarray, heldout: np.ndarray) -> dict:
    """Top-1 hits of one batch of n matched pairs, both directions, split by the query's held-out flag.

    text -> image: caption i ranks the n images; a hit when image i scores highest. image -> text likewise.
    """
    sim = text_emb @ image_emb.T  # (n texts, n images)
    target = np.arange(len(sim))
    hits = {"t2i": np.argmax(sim, axis=1) == target, "i2t": np.argmax(sim, axis=0) == target}
    counts = {"n": len(sim), "n_heldout": int(heldout.sum())}
    for direction, hit in hits.items():
        counts[direction] = int(hit.sum())
        counts[f"{direction}_heldout"] = int(hit[heldout].sum())
    return counts


def info_nce_numpy(image_emb: np.ndarray, text_emb: np.ndarray, logit_scale: float) -> float:
    logits = logit_scale * (image_emb @ text_emb.T).astype(np.float64)

    def ce_rows(x):
        x = x - x.max(axis=1, keepdims=True)
        return -np.mean(np.diag(x) - np.log(np.exp(x).sum(axis=1)))

    return 0.5 * (ce_rows(logits) + ce_rows(logits.T))


def make_eval(spec: loop.StateSpec, mesh, rules, source, tokenizer: TextTokenizer, cfg: ClipTrainConfig,
              holdout: set[tuple[str, str]]):
    """Zero-shot retrieval among `retrieval_batch` validation pairs (see the module docstring)."""
    transform = pair_transform(tokenizer, training=False, holdout=holdout)
    replicated = NamedSharding(mesh, PartitionSpec())
    which = "ema_params" if cfg.eval_ema else "params"

    # Outputs replicated: every host reads whole batches, including rows other hosts read.
    @jax.jit
    def embed(params, batch):
        model = loop.merged_model(spec, params)
        image_emb, text_emb = model(batch["image"], batch["text"])
        out = {"image": image_emb, "text": text_emb, "heldout": batch["heldout"], "valid": batch["valid"],
               "scale": model.logit_scale()}
        return jax.lax.with_sharding_constraint(out, replicated)

    def evaluate(state: dict, step: int) -> dict:
        batches = Pipeline(source, global_batch=cfg.retrieval_batch, train=False, transform=transform,
                           read_threads=1)
        total: dict[str, float] = {}
        losses = []
        with jax.set_mesh(mesh), sharding.axis_rules(rules):
            for b, batch in enumerate(batches):
                if cfg.eval_batches and b >= cfg.eval_batches:
                    break
                arrays = device_batch({k: batch[k] for k in ("image", "text", "heldout", "valid")}, mesh, rules)
                out = jax.device_get(embed(state[which], arrays))
                if not out["valid"].all():
                    continue  # the padded tail: fewer candidates would make retrieval easier
                counts = retrieval_counts(out["image"], out["text"], out["heldout"])
                total = {k: total.get(k, 0) + v for k, v in counts.items()}
                losses.append(info_nce_numpy(out["image"], out["text"], float(out["scale"])))
        if not losses:
            raise DatasetError(f"the validation split has {len(source)} examples, fewer than one retrieval batch "
                               f"of {cfg.retrieval_batch}: lower clip_train.retrieval_batch")
        n, n_held = total["n"], total["n_heldout"]
        metrics = {"loss": float(np.mean(losses)), "retrieval_batch": cfg.retrieval_batch,
                   "retrieval_chance": 1.0 / cfg.retrieval_batch, "retrieval_queries": n}
        for direction, name in (("t2i", "retrieval_top1"), ("i2t", "image_to_text_top1")):
            metrics[name] = total[direction] / n
            if n - n_held:
                metrics[f"{name}_in_distribution"] = (total[direction] - total[f"{direction}_heldout"]) / (n - n_held)
            if n_held:
                metrics[f"{name}_heldout"] = total[f"{direction}_heldout"] / n_held
        return metrics

    return evaluate


# ------------------------------------------------------------------------------------------------ driver

def pixel_statistics(source: Any, count: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of [0, 1] pixels over the first `count` examples of a split."""
    images = np.stack([np.asarray(source[i]["image"]) for i in range(min(count, len(source)))])
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
    return tuple(float(v) for v in pixels.mean(0)), tuple(float(max(v, 1e-3)) for v in pixels.std(0))


def model_config_for(config: Config, tokenizer: TextTokenizer, train_source: Any | None = None) -> CLIPConfig:
    """The config's CLIP with text_vocab_size = the tokenizer's BPE size (ids from there up are its pads) and,
    given the training split, pixel statistics measured on it."""
    derived: dict[str, Any] = {"text_vocab_size": tokenizer.vocab_size}
    if train_source is not None:
        derived["pixel_mean"], derived["pixel_std"] = pixel_statistics(train_source)
    return dataclasses.replace(config.clip, **derived)


def train_clip(config: Config, dataset_dir: str | Path, tokenizer_path: str | Path, run_dir: str | Path, *,
               progress: bool = True) -> dict:
    """Trains (or resumes) the reranker of `config` on an image dataset into `run_dir/clip`."""
    from dalle_jax.data.shapes import parse_holdout
    from dalle_jax.images import plot_curves

    run_dir, dataset_dir = Path(run_dir), Path(dataset_dir)
    out = run_dir / "clip"
    cfg = config.clip_train
    if not Path(tokenizer_path).is_file():
        raise DatasetError(f"tokenizer {tokenizer_path} not found: train one with `dalle-jax tokenizer train "
                           f"--data {dataset_dir} --out {tokenizer_path}`")
    tokenizer = TextTokenizer.load(tokenizer_path)
    check_compatible(config, tokenizer, dataset_dir)
    model_cfg = model_config_for(config, tokenizer, open_split(dataset_dir, "train"))
    out.mkdir(parents=True, exist_ok=True)
    config_lib.save_config(config, out / "config.json")
    (out / "clip_config.json").write_text(json.dumps(dataclasses.asdict(model_cfg), indent=2) + "\n")
    tokenizer.save(out / "tokenizer.json")

    mesh = sharding.make_mesh(config.mesh)
    rules = config.mesh.rules
    sharding.check_batch(cfg.batch_size, mesh, rules, jax.process_count())
    sharding.check_batch(cfg.retrieval_batch, mesh, rules, jax.process_count())
    holdout = set(parse_holdout(config.data.holdout)) if config.data.dataset == "shapes" else set()
    batches = Pipeline(open_split(dataset_dir, "train"), global_batch=cfg.batch_size, seed=cfg.seed,
                       transform=pair_transform(tokenizer, training=cfg.bpe_dropout),
                       read_threads=config.data.read_threads, prefetch=config.data.prefetch)
    optimizer = make_optimizer(cfg)
    state, spec = loop.init_state(lambda: CLIP(model_cfg, rngs=nnx.Rngs(cfg.seed)), optimizer, mesh, rules,
                                  cfg.seed)
    train_step = make_clip_step(cfg, model_cfg, optimizer, spec, mesh, rules)
    evaluate = make_eval(spec, mesh, rules, open_split(dataset_dir, "validation"), tokenizer, cfg, holdout)
    schedule = learning_rate_schedule(cfg)

    runner = loop.Loop(out, steps=cfg.steps, save_every=cfg.save_every, log_every=cfg.log_every,
                       eval_every=cfg.eval_every, keep=cfg.keep_checkpoints, name="clip")
    result = runner.run(state, spec, train_step, batches, batch_size=cfg.batch_size, evaluate=evaluate,
                        to_device=lambda b: device_batch({"image": b["image"], "text": b["text"]}, mesh, rules),
                        extra_scalars=lambda step: {"lr": float(schedule(step))}, progress=progress)
    if jax.process_index() == 0:
        plot_curves(out / "loss_curve.png", out, ["loss", "eval/loss"], title="CLIP InfoNCE loss (nats)")
        plot_curves(out / "retrieval_curve.png", out,
                    ["eval/retrieval_top1_in_distribution", "eval/retrieval_top1_heldout",
                     "eval/image_to_text_top1", "eval/retrieval_chance"],
                    title=f"zero-shot retrieval top-1 among {cfg.retrieval_batch}")
    return {"step": result["step"], "metrics": result["metrics"], "preempted": result["preempted"],
            "run_dir": str(out)}


# ------------------------------------------------------------------------------------------------ loading

def find_clip_dir(run_or_clip_dir: str | Path) -> Path:
    """The directory holding clip_config.json: the given one or its `clip/` (a run directory)."""
    from dalle_jax.train.checkpoint import find_model_dir

    return find_model_dir(run_or_clip_dir, "clip", "clip_config.json",
                          "pass the --out of `dalle-jax train-clip` (or its clip/ directory)")


def load_clip(run_or_clip_dir: str | Path, use_ema: bool | None = None) -> tuple[CLIP, TextTokenizer, Config]:
    """The trained reranker (latest intact checkpoint), its tokenizer and the run's config.

    `use_ema` defaults to the run's clip_train.eval_ema (the parameters its eval reported). The checkpoint is
    restored into the abstract train state rebuilt from the saved configs (on one device), so its content
    fingerprints are checked like a resume's.
    """
    directory = find_clip_dir(run_or_clip_dir)
    config = config_lib.load_config(directory / "config.json")
    saved = json.loads((directory / "clip_config.json").read_text())
    model_cfg = CLIPConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    tokenizer = TextTokenizer.load(directory / "tokenizer.json")
    use_ema = config.clip_train.eval_ema if use_ema is None else use_ema
    model = loop.load_trained(directory / "checkpoints", lambda: CLIP(model_cfg, rngs=nnx.Rngs(0)),
                              make_optimizer(config.clip_train), use_ema=use_ema)
    return model, tokenizer, config


# ------------------------------------------------------------------------------------------------ CLI

CLIP_SUMMARY = ("loss", "eval/retrieval_top1", "eval/retrieval_top1_heldout", "eval/image_to_text_top1")


def register_cli(subparsers: Any) -> None:
    from dalle_jax.cli import add_trainer_parser, run_trainer

    add_trainer_parser(
        subparsers, "train-clip", help="train the CLIP-style reranker on images + captions",
        description="Trains a small dual encoder (ViT image tower, transformer text tower over the run's BPE ids) "
                    "with a symmetric InfoNCE loss and a learned temperature; the sampler uses it to rerank. "
                    "Evaluates zero-shot caption -> image retrieval among clip_train.retrieval_batch validation "
                    "pairs, in-distribution and on held-out shapes combinations. Checkpoints, metrics.jsonl, "
                    "TensorBoard events, loss/retrieval curves go to OUT/clip; rerunning resumes.",
        epilog="example: dalle-jax train-clip --data runs/data --tokenizer runs/tokenizer.json --out runs/demo "
               "--preset demo",
        data_help="image dataset (`dalle-jax data shapes` / `data folder`) or a dir above it",
        out_help="run directory; the reranker goes to OUT/clip",
        func=lambda args: run_trainer(args, train_clip, "clip", CLIP_SUMMARY))
