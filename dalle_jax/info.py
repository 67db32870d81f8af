"""`dalle-jax info`: what a preset's prior is, computed abstractly (nothing is allocated).

Parameter count, per-device parameter and optimizer-state bytes under a mesh of any size (the mesh is
resolved on paper, so `--devices 256` works on a laptop), the sequence layout and the layer mask schedule.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx

from dalle_jax import sharding
from dalle_jax.config import Config
from dalle_jax.models import masks as masks_lib
from dalle_jax.models.prior import Prior
from dalle_jax.sharding import MESH_AXES

# Adam keeps two fp32 moments per parameter, the EMA one more copy: params + ema + mu + nu.
STATE_COPIES = {"params": 1, "ema": 1, "adam_moments": 2}


def prior_memory(config: Config, num_devices: int) -> dict[str, Any]:
    """Per-device bytes of the prior's fp32 training state under `config.mesh` over `num_devices` devices."""
    ici, dcn = sharding.resolve_mesh_shape(config.mesh, num_devices)
    mesh_shape = dict(zip(MESH_AXES, (i * d for i, d in zip(ici, dcn, strict=True)), strict=True))
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Prior(config.prior, rngs=nnx.Rngs(0)))
    state = nnx.state(abstract, nnx.Param)
    total, per_device = 0, 0
    problems = []
    for path, variable in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda v: isinstance(v, nnx.Variable)):
        shape = variable.value.shape
        spec = sharding.logical_to_spec(getattr(variable, "out_sharding", None), config.mesh.rules)
        shards = 1
        for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=False):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
            parts = math.prod(mesh_shape[a] for a in axes)
            if dim % parts:
                problems.append((dim, axes, parts, jax.tree_util.keystr(path)))
            shards *= parts
        size = math.prod(shape)
        total += size
        per_device += math.ceil(size / shards)
    bytes_per_param = 4 * sum(STATE_COPIES.values())
    return {"mesh": mesh_shape, "params": total, "params_per_device": per_device,
            "param_bytes_per_device": 4 * per_device, "state_bytes_per_device": bytes_per_param * per_device,
            "problems": problems}


def describe(config: Config, num_devices: int) -> str:
    p = config.prior
    memory = prior_memory(config, num_devices)
    schedule = masks_lib.layer_schedule(p.n_layers, p.attention, p.last_layer_conv)
    gib = 1024**3
    lines = [
        f"preset {config.name}: prior with {memory['params']:,} parameters ({memory['params'] / 1e9:.3f} B)",
        f"  d_model {p.d_model}, {p.n_layers} layers, {p.n_heads} heads x {p.head_dim}, MLP {p.mlp_ratio}x, "
        f"compute {p.compute_dtype}, remat {p.remat}",
        f"  sequence {p.seq_len} = <start> + {p.text_len} text (vocab {p.text_vocab_size} + {p.pad_mode} pads) "
        f"+ {p.image_len - 1} image inputs; targets {p.text_len} text + {p.grid_size}x{p.grid_size} = "
        f"{p.image_len} image tokens (vocab {p.image_vocab_size})",
        f"  masks: {_runs(schedule)} (conv kernel {p.conv_kernel})",
        f"  mesh {memory['mesh']} over {num_devices} devices: per device {memory['params_per_device']:,} parameters,"
        f" {memory['param_bytes_per_device'] / gib:.2f} GiB fp32 params, "
        f"{memory['state_bytes_per_device'] / gib:.2f} GiB with EMA + Adam moments (activations not included)",
    ]
    groups: dict[tuple, list[str]] = {}
    for dim, axes, parts, name in memory["problems"]:
        groups.setdefault((dim, axes, parts), []).append(name)
    for (dim, axes, parts), names in groups.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        lines.append(f"  error: dimension {dim} does not divide over mesh axes {axes} of size {parts} "
                     f"({shown}); pick a mesh whose axes divide it")
    return "\n".join(lines)


def _runs(schedule: tuple[str, ...]) -> str:
    """Counts per type and the first layers: 'row 47, column 16, conv 1; layers 1-8: row column row ...'."""
    counts = ", ".join(f"{t} {schedule.count(t)}" for t in masks_lib.LAYER_TYPES if t in schedule)
    head = " ".join(schedule[:8]) + (" ..." if len(schedule) > 8 else "")
    return f"{counts}; layers 1-{min(8, len(schedule))}: {head}; last: {schedule[-1]}"
