"""The optimizer of every trainer: AdamW with the stage's learning-rate schedule and weight-decay mask.

One function, `make_optimizer(train_config)`, reads the stage's `*_train` section:

  dVAE  (paper A.2)   AdamW (0.9, 0.999), wd 1e-4; lr cosine 1e-4 -> 1.25e-6. Decays every kernel (ndim > 1), not
                      biases (paper silent; `decay_biases` decays those too). No clipping.
  prior (paper B.2)   clip the global norm at 4, AdamW (0.9, 0.96), wd 4.5e-2 on projections and heads only (not gains,
                      biases or embeddings); linear warm-up, then constant with halving on plateaus (or cosine).
  CLIP  (Radford 21)  optional clipping, AdamW (0.9, 0.98, 1e-6), wd 0.2 on projections only; warm-up then cosine.

The optimizer-state trees are exactly the ones each trainer built before they shared this module, so older
checkpoints restore and resume bitwise: the dVAE's AdamW is not wrapped in a chain, the prior's chain always starts
with its clipping and ends with reduce_on_plateau when that schedule is chosen, CLIP's chain has clipping only when
clip_norm > 0.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from dalle_jax.config import ClipTrainConfig, DVAETrainConfig, PriorTrainConfig

TrainSection = DVAETrainConfig | PriorTrainConfig | ClipTrainConfig

# Parameters AdamW decays, by name (the last key of their path). Everything else (gains, biases, embeddings, CLIP's
# temperature) is not decayed.
DECAYED_PRIOR = frozenset({"wq", "wk", "wv", "wo", "w1", "w2", "text_head", "image_head",
                           "image_head_second"})
DECAYED_CLIP = frozenset({"wq", "wk", "wv", "wo", "w1", "w2", "patch_embed", "image_proj", "text_proj"})


def kernels_mask(params: Any) -> Any:
    """Decay weight matrices and kernels (ndim > 1), not biases or gains: the dVAE's rule."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def named_mask(names: frozenset[str]):
    """A mask function that decays the parameters whose name (last path key) is in `names`."""
    def mask(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda path, _: str(getattr(path[-1], "key", "")) in names, params)

    return mask


def decay_mask(cfg: TrainSection):
    """The stage's weight-decay mask function (None: decay every parameter)."""
    if isinstance(cfg, DVAETrainConfig):
        return None if cfg.decay_biases else kernels_mask
    return named_mask(DECAYED_PRIOR if isinstance(cfg, PriorTrainConfig) else DECAYED_CLIP)


def learning_rate_schedule(cfg: TrainSection) -> optax.Schedule:
    """The stage's schedule before any plateau halving (the prior's reduce_on_plateau scales on top of it)."""
    if isinstance(cfg, DVAETrainConfig):
        return optax.cosine_decay_schedule(cfg.learning_rate, cfg.lr_decay_steps,
                                           alpha=cfg.learning_rate_end / cfg.learning_rate)
    if isinstance(cfg, ClipTrainConfig) or cfg.lr_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1),
                                                  max(cfg.steps, cfg.warmup_steps + 1),
                                                  end_value=cfg.learning_rate * cfg.lr_end_fraction)
    warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
    return optax.join_schedules([warmup, optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])


def make_optimizer(cfg: TrainSection) -> optax.GradientTransformation:
    """AdamW with the stage's schedule and mask, plus clipping and plateau halving where the stage has them."""
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                        weight_decay=cfg.weight_decay, mask=decay_mask(cfg))
    if isinstance(cfg, DVAETrainConfig):
        return adamw  # never chained: its checkpoints hold AdamW's state alone
    # The prior always clipped (paper: norm 4); CLIP clips only when asked (CLIP did not).
    clip = isinstance(cfg, PriorTrainConfig) or cfg.clip_norm > 0
    parts = [optax.clip_by_global_norm(cfg.clip_norm)] if clip else []
    parts.append(adamw)
    if isinstance(cfg, PriorTrainConfig) and cfg.lr_schedule == "plateau":
        # Halve when the mean training loss over a window of steps has not improved for `patience` windows.
        parts.append(optax.contrib.reduce_on_plateau(factor=0.5, patience=cfg.plateau_patience,
                                                     accumulation_size=cfg.plateau_window))
    return optax.chain(*parts)


def plateau_scale(opt_state: Any) -> jax.Array:
    """The multiplier reduce_on_plateau currently applies (1.0 without it)."""
    last = opt_state[-1]
    return getattr(last, "scale", jnp.ones((), jnp.float32))
