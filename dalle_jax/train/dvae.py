"""Stage 1: train the discrete VAE (paper appendix A) — `dalle-jax train-dvae`.

Loss per image, divided by H*W*3 (the paper's normalisation):
    -log p(x | z) under the logit-Laplace likelihood, z = Gumbel-softmax(logits / tau)  (relaxed one-hot)
    + beta * KL(q(z | x) || uniform over the codebook), summed over the token grid
with beta cosine-annealed 0 -> 6.6, tau cosine-annealed 1 -> 1/16, lr cosine 1e-4 -> 1.25e-6, AdamW, EMA.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dalle_jax import distributed, runs
from dalle_jax.config import Config, DVAETrainConfig
from dalle_jax.data.pipeline import caption_text, open_split
from dalle_jax.errors import ConfigError
from dalle_jax.models.dvae import DVAE, map_pixels, reconstruct
from dalle_jax.train import loop, optim
from dalle_jax.train import stage as stage_lib

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------------ schedules

def _cosine_ramp(step: jax.Array, length: int) -> jax.Array:
    """0 -> 1 along half a cosine over `length` steps, then 1."""
    progress = jnp.clip(step.astype(jnp.float32) / max(length, 1), 0.0, 1.0)
    return 0.5 * (1.0 - jnp.cos(jnp.pi * progress))


def kl_weight_at(step: jax.Array, cfg: DVAETrainConfig) -> jax.Array:
    return cfg.kl_weight * _cosine_ramp(step, cfg.kl_warmup_steps)


def temperature_at(step: jax.Array, cfg: DVAETrainConfig) -> jax.Array:
    if cfg.temperature_schedule == "cosine":
        ramp = _cosine_ramp(step, cfg.temperature_steps)
    else:  # linear, the ablation the paper reports diverging
        ramp = jnp.clip(step.astype(jnp.float32) / max(cfg.temperature_steps, 1), 0.0, 1.0)
    return cfg.temperature_start + (cfg.temperature_end - cfg.temperature_start) * ramp


# ------------------------------------------------------------------------------------------------ loss

def logit_laplace_nll(x: jax.Array, decoder_output: jax.Array) -> jax.Array:
    """-log f(x | mu, b) per pixel-channel for x already mapped into [eps, 1 - eps].

    f(x | mu, b) = exp(-|logit(x) - mu| / b) / (2 b x (1 - x)), with mu = channels 0..2 and ln b = 3..5.
    """
    mu, log_b = decoder_output[..., :3], decoder_output[..., 3:]
    logit_x = jnp.log(x) - jnp.log1p(-x)
    return jnp.abs(logit_x - mu) * jnp.exp(-log_b) + log_b + jnp.log(2.0) + jnp.log(x) + jnp.log1p(-x)


def dvae_loss(model: DVAE, batch: dict, key: jax.Array, step: jax.Array, cfg: DVAETrainConfig
              ) -> tuple[jax.Array, dict]:
    images = batch["image"].astype(jnp.float32) / 255.0  # (B, H, W, 3)
    x = map_pixels(images)
    logits = model.encoder(x)  # (B, h, w, K) fp32
    tau = temperature_at(step, cfg)
    gumbel = jax.random.gumbel(key, logits.shape, jnp.float32)
    soft_codes = jax.nn.softmax((logits + gumbel) / tau, axis=-1)  # relaxed one-hot
    if cfg.straight_through:  # forward the hard one-hot, backpropagate through the relaxation
        hard = jax.nn.one_hot(jnp.argmax(soft_codes, axis=-1), soft_codes.shape[-1], dtype=soft_codes.dtype)
        soft_codes = hard + soft_codes - jax.lax.stop_gradient(soft_codes)
    out = model.decoder(soft_codes)  # (B, H, W, 6)
    if cfg.likelihood == "logit_laplace":
        recon = logit_laplace_nll(x, out)
    else:  # MSE on mapped pixels (ablation)
        recon = jnp.square(jax.nn.sigmoid(out[..., :3]) - x)
    log_q = jax.nn.log_softmax(logits, axis=-1)
    kl = jnp.sum(jnp.exp(log_q) * (log_q + math.log(model.config.vocab_size)), axis=-1)  # (B, h, w) nats
    pixels = images.shape[1] * images.shape[2] * images.shape[3]
    beta = kl_weight_at(step, cfg)
    recon_per_image = jnp.sum(recon, axis=(1, 2, 3))
    kl_per_image = jnp.sum(kl, axis=(1, 2))
    loss = jnp.mean(recon_per_image + beta * kl_per_image) / pixels
    mse = jnp.mean(jnp.square(reconstruct(out) - images))
    # Perplexity of the batch-mean posterior: how many codes the batch spreads its mass over (collapse monitor).
    mean_q = jnp.mean(jnp.exp(log_q), axis=(0, 1, 2))
    batch_perplexity = jnp.exp(-jnp.sum(mean_q * jnp.log(jnp.maximum(mean_q, 1e-30))))
    return loss, {"recon": jnp.mean(recon_per_image) / pixels, "kl_per_token": jnp.mean(kl), "mse": mse,
                  "batch_code_perplexity": batch_perplexity}


# ------------------------------------------------------------------------------------------------ code revival

# (encoder output conv, decoder input conv) of each code table: one, or two for product codes (dvae.factor_codes)
CODE_TABLES = (("output", "input"), ("output_second", "input_second"))


def revive_dead_codes(params: dict, features: tuple[jax.Array, ...], key: jax.Array
                      ) -> tuple[dict, tuple[jax.Array, ...]]:
    """Moves every code that no token picks onto a token of the batch, per code table on that table's features
    (B, h, w, C_t) (`Encoder.table_features`: one array, or two for product codes).

    For the "distance" logits: code c's vector is column c of the encoder's output conv. A revived code gets a
    donor token's feature f_t as its vector (distance 0, so it wins t) and the decoder embedding of the code t
    picks now (so t decodes as before). Donors are drawn with probability proportional to their squared distance
    to their current code (k-means++ seeding): badly quantised tokens (object edges) rather than the background.
    Returns (params, per table the (K,) bool mask of codes that were in use, i.e. kept).
    """
    tables = [table for table in CODE_TABLES if table[0] in params["encoder"]]
    used = []
    for i, (table, part) in enumerate(zip(tables, features, strict=True)):
        params, kept = _revive_table(params, table, part, key if i == 0 else jax.random.fold_in(key, i))
        used.append(kept)
    return params, tuple(used)


def _revive_table(params: dict, table: tuple[str, str], features: jax.Array, key: jax.Array
                  ) -> tuple[dict, jax.Array]:
    codes, embed = _codebook(params, table)  # (C, K), (K, n_init)
    flat = features.reshape(-1, features.shape[-1]).astype(jnp.float32)  # (N, C)
    logits = 2 * flat @ codes - jnp.sum(jnp.square(codes), axis=0)
    picked = jnp.argmax(logits, axis=-1)  # (N,)
    error = jnp.maximum(jnp.sum(jnp.square(flat), axis=-1) - jnp.max(logits, axis=-1), 0.0)  # ||f - e_picked||^2
    used = jnp.zeros(codes.shape[1], bool).at[picked].set(True)
    p = (error + 1e-12) / jnp.sum(error + 1e-12)
    donors = jax.random.choice(key, flat.shape[0], (codes.shape[1],), p=p)  # one donor per code
    new_codes = jnp.where(used[None, :], codes, flat[donors].T)
    new_embed = jnp.where(used[:, None], embed, embed[picked[donors]])
    return _with_codebook(params, table, new_codes, new_embed), used


def _codebook(params: dict, table: tuple[str, str]) -> tuple[jax.Array, jax.Array]:
    """(code vectors (C, K), decoder embeddings (K, n_init)) of one code table of a dVAE's params."""
    encoder, decoder = table
    return params["encoder"][encoder]["w"][0, 0], params["decoder"][decoder]["w"][0, 0]


def _with_codebook(params: dict, table: tuple[str, str], codes: jax.Array, embed: jax.Array) -> dict:
    encoder, decoder = table
    return {**params,
            "encoder": {**params["encoder"], encoder: {**params["encoder"][encoder], "w": codes[None, None]}},
            "decoder": {**params["decoder"], decoder: {**params["decoder"][decoder], "w": embed[None, None]}}}


def with_code_revival(train_step: Any, spec: loop.StateSpec, mesh, cfg: DVAETrainConfig) -> Any:
    """`train_step` followed, every `cfg.revive_every` steps up to `revive_until`, by `revive_dead_codes` on the
    step's batch (params and EMA alike; the optimizer moments are kept)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    until = int(cfg.revive_until * cfg.steps)

    @functools.partial(jax.jit, donate_argnums=0, out_shardings=(spec.shardings, replicated))
    def revive(state: dict, images: jax.Array, key: jax.Array) -> tuple[dict, jax.Array]:
        model = loop.merged_model(spec, state["params"])
        features = model.encoder.table_features(map_pixels(images.astype(jnp.float32) / 255.0))
        params, used = revive_dead_codes(state["params"], features, key)
        # The EMA takes the revived codes as they are (an average with the dead vector would be neither).
        ema = state["ema_params"]
        for table, kept in zip(CODE_TABLES, used, strict=False):
            (codes, embed), (ema_codes, ema_embed) = _codebook(params, table), _codebook(ema, table)
            ema = _with_codebook(ema, table, jnp.where(kept[None, :], ema_codes, codes),
                                 jnp.where(kept[:, None], ema_embed, embed))
        return {**state, "params": params, "ema_params": ema}, sum(jnp.sum(~kept) for kept in used)

    done = {"step": None}  # host-side step count (read once from the state: resume-safe, no per-step sync)

    def step(state: dict, batch: dict) -> tuple[dict, dict]:
        if done["step"] is None:
            done["step"] = int(jax.device_get(state["step"]))
        state, metrics = train_step(state, batch)
        done["step"] += 1
        n = done["step"]
        if n % cfg.revive_every == 0 and n <= until:
            key = jax.random.fold_in(jax.random.key(cfg.seed + 7), n)
            with jax.set_mesh(mesh):
                state, revived = revive(state, batch["image"], key)
            log.info("step %d: revived %d dead codes", n, int(revived))
        return state, metrics

    return step


# ------------------------------------------------------------------------------------------------ eval

def codebook_usage(tokens: np.ndarray, vocab_size: int) -> dict[str, float]:
    """Perplexity exp(H) of the empirical code distribution and the fraction of codes used."""
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=vocab_size).astype(np.float64)
    p = counts / counts.sum()
    entropy = -np.sum(p[p > 0] * np.log(p[p > 0]))
    return {"codebook_perplexity": float(np.exp(entropy)), "codebook_used": float((counts > 0).mean())}


def make_evaluator(spec: loop.StateSpec, mesh, eval_images: np.ndarray, captions: list[str], run_dir: Path,
              vocab_size: int, score_shapes: bool):
    """Eval hook: EMA model on a held validation batch -> codebook usage, reconstruction error, shapes-scorer
    accuracy of the reconstructions, and a PNG grid (original | reconstruction)."""
    from dalle_jax.images import save_grid

    replicated = NamedSharding(mesh, PartitionSpec())
    images = jax.device_put(eval_images, replicated)

    # Replicated outputs: every host can read them (a sharded result would not be addressable on other hosts).
    @functools.partial(jax.jit, out_shardings=replicated)
    def encode_decode(params, images):
        model = loop.merged_model(spec, params)
        tokens = model.encode(images.astype(jnp.float32) / 255.0)
        return tokens, model.decode(tokens)

    def evaluate(state: dict, step: int) -> dict:
        with jax.set_mesh(mesh):
            tokens, recons = jax.device_get(encode_decode(state["ema_params"], images))
        recons_u8 = np.clip(np.round(recons * 255.0), 0, 255).astype(np.uint8)
        metrics = {**codebook_usage(tokens, vocab_size),
                   "mse": float(np.mean((recons - eval_images / 255.0) ** 2))}
        if score_shapes:
            from dalle_jax.data.scorer import score

            metrics["recon_color_shape_acc"] = float(np.mean(
                [score(r, c)["color_shape"] for r, c in zip(recons_u8, captions, strict=True)]))
        if distributed.is_main():
            pairs = [im for pair in zip(eval_images[:16], recons_u8[:16], strict=True) for im in pair]
            save_grid(run_dir / "reconstructions" / f"step_{step:07d}.png", pairs,
                      [t for c in captions[:16] for t in (c, "reconstruction")], columns=8)
        return metrics

    return evaluate


# ------------------------------------------------------------------------------------------------ driver

def train_dvae(config: Config, run_dir: str | Path, *, progress: bool = True) -> dict:
    """Trains (or resumes) the dVAE of `config` into RUN/dvae; returns the final metrics."""
    stage_lib.check_rerun(config, run_dir, "dvae")
    cfg, model_cfg = config.dvae_train, config.dvae
    model_cfg.grid_size(config.data.image_size)  # fail early on an incompatible image size
    if cfg.revive_every and model_cfg.logits != "distance":
        raise ConfigError("dvae_train.revive_every needs dvae.logits=distance (code vectors to move); "
                          "set --set dvae.logits=distance or dvae_train.revive_every=0")
    dataset_dir = runs.dataset_dir_for(config.data, run_dir)
    validation = open_split(dataset_dir, "validation")
    held = [validation[i] for i in range(min(cfg.num_eval_images, len(validation)))]
    held.sort(key=lambda e: int(e["id"]))
    eval_images = np.stack([e["image"] for e in held])
    captions = [caption_text(e["caption"]) for e in held]
    size = config.data.image_size

    def make_step(optimizer, spec, mesh, rules):
        shardings = stage_lib.batch_shardings({"image": (cfg.batch_size, size, size, 3)}, mesh, rules)
        step = loop.make_train_step(lambda m, b, k, s: dvae_loss(m, b, k, s, cfg), optimizer, spec, mesh, rules,
                                    shardings, cfg.ema_decay, cfg.ema_warmup)
        return with_code_revival(step, spec, mesh, cfg) if cfg.revive_every else step

    def make_eval(spec, mesh, rules):
        return make_evaluator(spec, mesh, eval_images, captions, runs.stage_dir(run_dir, "dvae"),
                              model_cfg.vocab_size, score_shapes=config.data.dataset == "shapes")

    lr = optim.learning_rate_schedule(cfg)

    def schedules(step: int) -> dict:
        s = jnp.asarray(step)
        return {"tau": temperature_at(s, cfg), "beta": kl_weight_at(s, cfg), "lr": lr(s)}

    stage = stage_lib.Stage(
        name="dvae", train=cfg, model_config=model_cfg, model_fn=lambda: DVAE(model_cfg, rngs=nnx.Rngs(cfg.seed)),
        make_step=make_step, train_source=open_split(dataset_dir, "train"),
        transform=lambda example, rng: {"image": np.asarray(example["image"], np.uint8)}, device_keys=("image",),
        make_eval=make_eval, scalars=schedules,
        curves=(("loss_curve.png", ("mse", "eval/mse"), "dVAE reconstruction MSE (hard codes at eval)"),))
    return stage_lib.run_stage(stage, config, run_dir, progress=progress)
