"""Stage 2: train the transformer prior on [caption | dVAE image tokens] — `dalle-jax train-prior`.

Loss: cross-entropy on the text part (averaged over the batch's non-pad text tokens) and on the image part
(averaged over image tokens), weighted 1/8 and 7/8. Both averages use the whole batch's counts, so k
microbatches of b sum to exactly one batch of k*b. AdamW (0.9, 0.96, 1e-8, wd 4.5e-2 on matrices only),
global-norm clipping 4, linear warm-up then halving on plateaus (or cosine), parameter EMA 0.99.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dalle_jax import sharding
from dalle_jax.config import Config, PriorTrainConfig
from dalle_jax.data.pipeline import Pipeline, caption_text, device_batch, open_split
from dalle_jax.data.tokenizer import TextTokenizer
from dalle_jax.errors import ConfigError, DatasetError
from dalle_jax.models.prior import Prior, PriorConfig
from dalle_jax.train import loop, optim
from dalle_jax.train import stage as stage_lib

# ------------------------------------------------------------------------------------------------ loss

def count_tokens(batch: dict, text_vocab: int) -> dict:
    """Adds the whole batch's non-pad text and image token counts (the loss normalisers)."""
    n_text = jnp.sum(batch["text"] < text_vocab).astype(jnp.float32)
    n_image = jnp.asarray(batch["image_tokens"].size, jnp.float32)
    return {**batch, "n_text": jnp.maximum(n_text, 1.0), "n_image": n_image}


def token_losses(model: Prior, text: jax.Array, image: jax.Array, text_vocab: int,
                 dropout_key: jax.Array | None = None,
                 soft_targets: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-token cross-entropy: text (B, T) (0 on pads), image (B, N), and the text validity mask (B, T).

    `soft_targets` (codes, probs), each (B, N, k): the image targets are these distributions over k codes
    (prior_train.soft_targets) instead of the input tokens themselves.
    """
    text_logits, image_logits = model(text, image, dropout_key=dropout_key)
    valid = text < text_vocab
    text_ce = optax.softmax_cross_entropy_with_integer_labels(
        text_logits.astype(jnp.float32), jnp.where(valid, text, 0))
    if soft_targets is None:
        image_ce = optax.softmax_cross_entropy_with_integer_labels(image_logits.astype(jnp.float32), image)
    else:
        codes, probs = soft_targets
        log_probs = jax.nn.log_softmax(image_logits.astype(jnp.float32), axis=-1)
        image_ce = -jnp.sum(probs * jnp.take_along_axis(log_probs, codes, axis=-1), axis=-1)
    return jnp.where(valid, text_ce, 0.0), image_ce, valid


def prior_loss(model: Prior, batch: dict, key: jax.Array, step: jax.Array, cfg: PriorTrainConfig,
               text_vocab: int) -> tuple[jax.Array, dict]:
    soft = (batch["target_codes"], batch["target_probs"]) if "target_probs" in batch else None
    text_ce, image_ce, _ = token_losses(model, batch["text"], batch["image_tokens"], text_vocab, key, soft)
    text_loss = jnp.sum(text_ce) / batch["n_text"]
    image_loss = jnp.sum(image_ce) / batch["n_image"]
    loss = cfg.text_loss_weight * text_loss + (1.0 - cfg.text_loss_weight) * image_loss
    return loss, {"text_loss": text_loss, "image_loss": image_loss,
                  "bits_per_image_token": image_loss / math.log(2.0)}


# ------------------------------------------------------------------------------------------------ data

def posterior_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) over the last axis of the stored top-k logits (most likely first): as the
    temperature goes to 0 this is the one-hot of the first code, the argmax token."""
    scaled = (np.asarray(logits, np.float64) - np.max(logits, axis=-1, keepdims=True)) / temperature
    probs = np.exp(scaled)
    return (probs / probs.sum(axis=-1, keepdims=True)).astype(np.float32)


def token_transform(tokenizer: TextTokenizer, training: bool, cfg: PriorTrainConfig | None = None):
    """Token-dataset example -> {"text" (T,) int32, "image_tokens" (N,) int32, "caption"}; in training with
    `cfg.input_tokens == "sampled"` the image tokens are drawn from the stored posterior, and with
    `cfg.soft_targets` the row also carries "target_codes" (N, k) int32 and "target_probs" (N, k) float32."""
    pads = tokenizer.pad_ids().astype(np.int32)
    caption_dropout = cfg.caption_dropout if cfg is not None else 0.0
    posterior = training and cfg is not None and cfg.encoded_topk > 0

    def transform(example: dict, rng: np.random.Generator) -> dict:
        caption = caption_text(example["caption"])
        text = tokenizer.encode([caption], training=training, rng=rng)[0].astype(np.int32)
        if training and caption_dropout and rng.random() < caption_dropout:
            text = pads.copy()
        row = {"text": text, "image_tokens": np.asarray(example["tokens"], np.int32).reshape(-1), "caption": caption}
        if posterior:
            k = cfg.posterior_topk
            codes = np.asarray(example["posterior_codes"], np.int32).reshape(-1, k)
            probs = posterior_probs(np.asarray(example["posterior_logits"]).reshape(-1, k), cfg.posterior_temperature)
            if cfg.input_tokens == "sampled":  # inverse-CDF draw of one code per token
                drawn = np.minimum((np.cumsum(probs, axis=-1) < rng.random((len(codes), 1))).sum(axis=-1), k - 1)
                row["image_tokens"] = codes[np.arange(len(codes)), drawn]
            if cfg.soft_targets:
                row["target_codes"], row["target_probs"] = codes, probs
        return row

    return transform


def is_heldout(caption: str, holdout: set[tuple[str, str]]) -> bool:
    """Does a shapes caption name a held-out (colour, shape) pair? False for captions of other datasets."""
    from dalle_jax.data.scorer import parse_caption

    try:
        objects = parse_caption(caption)["objects"]
    except ValueError:
        return False
    return any((o["color"], o["shape"]) in holdout for o in objects)


def check_compatible(config: Config, tokenizer: TextTokenizer, token_dir: Path) -> None:
    """Errors naming the mismatch before anything compiles."""
    p = config.prior
    tokenizer.check_config(config.text)  # the prior's text_len, pad_mode and text_vocab_size derive from it
    example = open_split(token_dir, "train")[0]
    if "tokens" not in example:
        raise DatasetError(f"{token_dir} has no 'tokens' field (fields: {sorted(example)}): train-prior reads the "
                           "token dataset `dalle-jax encode` writes (RUN/tokens), not an image dataset")
    grid = np.asarray(example["tokens"]).shape
    if grid != (p.grid_size, p.grid_size):
        raise ConfigError(f"token dataset {token_dir} has {grid} grids but the config's prior expects "
                                     f"{p.grid_size}x{p.grid_size} (data.image_size / dVAE downsampling)")
    spec = _token_spec(token_dir)
    if spec and spec.get("vocab_size") != p.image_vocab_size:
        raise ConfigError(f"token dataset {token_dir} was encoded with a {spec.get('vocab_size')}-code "
                                     f"dVAE but dvae.vocab_size is {p.image_vocab_size}")
    needed, stored = config.prior_train.encoded_topk, (spec or {}).get("posterior_topk", 0)
    if needed and stored != needed:
        raise ConfigError(f"prior_train.input_tokens={config.prior_train.input_tokens} / soft_targets="
                          f"{config.prior_train.soft_targets} read the top {needed} posterior codes per token, but "
                          f"token dataset {token_dir} stores {stored}: re-encode with `dalle-jax encode "
                          f"--posterior-topk {needed}` (or set prior_train.posterior_topk={stored})")


def _token_spec(token_dir: Path) -> dict | None:
    info = json.loads((token_dir / "dataset_info.json").read_text())
    description = info.get("description", "")
    return json.loads(description.split("Spec: ", 1)[1]) if "Spec: " in description else None


# ------------------------------------------------------------------------------------------------ eval

def make_evaluator(spec: loop.StateSpec, mesh, rules, source, tokenizer: TextTokenizer, cfg: PriorTrainConfig,
              text_vocab: int, holdout: set[tuple[str, str]]):
    """Validation loss of the EMA parameters, in-distribution and on held-out combinations separately."""
    transform = token_transform(tokenizer, training=False)
    batch_size = cfg.batch_size // cfg.microbatches

    # The batch's sums are reduced on device, with the valid / held-out masks travelling beside their rows: on
    # several hosts each holds only its own rows, so per-example values of the global batch are not addressable
    # here (jax.device_get would fail), while replicated scalars are.
    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, PartitionSpec()))
    def batch_sums(params, text, image, valid, held):
        model = loop.merged_model(spec, params)
        text_ce, image_ce, text_valid = token_losses(model, text, image, text_vocab)
        image_mean = jnp.mean(image_ce, axis=1)  # (B,)
        return {"text": jnp.sum(jnp.where(valid, jnp.sum(text_ce, axis=1), 0.0)),
                "text_count": jnp.sum(jnp.where(valid, jnp.sum(text_valid, axis=1), 0)),
                "image": jnp.sum(jnp.where(valid, image_mean, 0.0)), "n": jnp.sum(valid),
                "image_heldout": jnp.sum(jnp.where(held, image_mean, 0.0)), "n_heldout": jnp.sum(held)}

    def evaluate(state: dict, step: int) -> dict:
        batches = Pipeline(source, global_batch=batch_size, train=False, transform=transform, read_threads=1)
        sums = {"text": 0.0, "text_count": 0, "image": 0.0, "n": 0, "image_heldout": 0.0, "n_heldout": 0}
        with jax.set_mesh(mesh), sharding.axis_rules(rules):
            for b, batch in enumerate(batches):
                if cfg.eval_batches and b >= cfg.eval_batches:
                    break
                valid = np.asarray(batch["valid"])
                held = np.array([is_heldout(c, holdout) for c in batch["caption"]]) & valid
                arrays = device_batch({"text": batch["text"], "image_tokens": batch["image_tokens"], "valid": valid,
                                       "held": held}, mesh, rules)
                batch_totals = jax.device_get(batch_sums(state["ema_params"], arrays["text"],
                                                         arrays["image_tokens"], arrays["valid"], arrays["held"]))
                sums = {k: v + batch_totals[k].item() for k, v in sums.items()}
        n_in = sums["n"] - sums["n_heldout"]
        metrics = {"text_loss": sums["text"] / max(sums["text_count"], 1.0),
                   "image_loss": sums["image"] / max(sums["n"], 1),
                   "uniform_image_loss": math.log(spec_vocab(spec))}
        metrics["bits_per_image_token"] = metrics["image_loss"] / math.log(2.0)
        if n_in:
            metrics["image_loss_in_distribution"] = (sums["image"] - sums["image_heldout"]) / n_in
        if sums["n_heldout"]:
            metrics["image_loss_heldout"] = sums["image_heldout"] / sums["n_heldout"]
        return metrics

    return evaluate


def spec_vocab(spec: loop.StateSpec) -> int:
    """Image vocabulary: the head's logits, or the product of both heads' with product codes."""
    params = spec.abstract["params"]
    return math.prod(params[name].shape[-1] for name in ("image_head", "image_head_second") if name in params)


# ------------------------------------------------------------------------------------------------ driver

def train_prior(config: Config, token_dir: str | Path, tokenizer_path: str | Path, run_dir: str | Path, *,
                progress: bool = True) -> dict:
    """Trains (or resumes) the prior of `config` on a token dataset into RUN/prior."""
    from dalle_jax.data.shapes import parse_holdout

    stage_lib.check_rerun(config, run_dir, "prior")
    token_dir = Path(token_dir)
    cfg, model_cfg = config.prior_train, config.prior
    if not Path(tokenizer_path).is_file():
        raise DatasetError(f"tokenizer {tokenizer_path} not found: train one with `dalle-jax tokenizer train "
                           f"--data <image dataset> --out {tokenizer_path}`")
    tokenizer = TextTokenizer.load(tokenizer_path)
    check_compatible(config, tokenizer, token_dir)
    holdout = set(parse_holdout(config.data.holdout)) if config.data.dataset == "shapes" else set()
    text_vocab = tokenizer.vocab_size

    def make_eval(spec, mesh, rules):
        return make_evaluator(spec, mesh, rules, open_split(token_dir, "validation"), tokenizer, cfg, text_vocab,
                              holdout)

    schedule = optim.learning_rate_schedule(cfg)
    stage = stage_lib.Stage(
        name="prior", train=cfg, model_config=model_cfg, model_fn=lambda: Prior(model_cfg, rngs=nnx.Rngs(cfg.seed)),
        make_step=lambda optimizer, spec, mesh, rules: make_prior_step(cfg, model_cfg, optimizer, spec, mesh, rules,
                                                                       text_vocab),
        train_source=open_split(token_dir, "train"),
        transform=token_transform(tokenizer, True, cfg),
        device_keys=("text", "image_tokens", *(("target_codes", "target_probs") if cfg.soft_targets else ())),
        make_eval=make_eval, tokenizer=tokenizer, batch_checks=(cfg.batch_size // cfg.microbatches,),
        scalars=lambda step: {"lr_schedule": float(schedule(step))},
        tokens_per_example=model_cfg.seq_len,
        curves=(("loss_curve.png", ("image_loss", "eval/image_loss", "eval/image_loss_heldout",
                                    "eval/uniform_image_loss"), "prior image-token loss (nats)"),))
    return stage_lib.run_stage(stage, config, run_dir, progress=progress)


def make_prior_step(cfg: PriorTrainConfig, model_cfg: PriorConfig, optimizer, spec, mesh, rules, text_vocab: int):
    batch_shape = {"text": (cfg.batch_size, model_cfg.text_len), "image_tokens": (cfg.batch_size, model_cfg.image_len)}
    if cfg.soft_targets:
        batch_shape |= dict.fromkeys(("target_codes", "target_probs"),
                                     (cfg.batch_size, model_cfg.image_len, cfg.posterior_topk))
    return loop.make_train_step(
        lambda m, b, k, s: prior_loss(m, b, k, s, cfg, text_vocab), optimizer, spec, mesh, rules,
        stage_lib.batch_shardings(batch_shape, mesh, rules),
        cfg.ema_decay, cfg.ema_warmup, microbatches=cfg.microbatches,
        prepare=lambda b: count_tokens(b, text_vocab),
        state_metrics=lambda state: {"lr_scale": optim.plateau_scale(state["opt_state"])})
