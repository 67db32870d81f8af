"""Splash attention: the prior's full-sequence attention as a block-sparse Pallas TPU kernel.

`PriorConfig.attention_impl="splash"` routes the training (and any other full, cache-free) forward pass through
`jax.experimental.pallas.ops.tpu.splash_attention`. The kernel tiles the (query, key) plane into
`splash_block` x `splash_block` blocks, never touches a block its mask hides entirely and applies the mask
inside the blocks it shows only in part, so a layer costs its mask's visible blocks rather than L^2.

The masks are the prior's own numpy masks (`PriorConfig.masks()`, see models/masks.py) wrapped as splash
`NumpyMask`s, one kernel per distinct mask of the stack; inside the layer scan `lax.switch` picks the kernel by
the layer's mask index, as the dense path picks its mask by the same index. Sequence lengths that are not a
multiple of the block are padded (padded keys are invisible to real queries; padded queries see only
themselves, so no row is empty, and are dropped). Under a mesh the kernel runs per device inside `shard_map`,
batch and heads split by the logical rules; the sequence stays whole on every device (the kernel cannot split
keys).

Numerics follow `attend`: scores q k^T / sqrt(head_dim) in fp32, one softmax over all keys per query (online,
blockwise in the kernel), probabilities times v accumulated in fp32 (`attend` rounds them to the compute dtype
first, so bf16 results differ by bf16 rounding). The kernel does not scale q, so q is scaled before it (in
fp32, then rounded to the compute dtype; exact when head_dim is a power of four, as 64 is).

The kernel compiles only for TPU. Elsewhere (CPU tests) it runs in Pallas interpret mode, slowly, with
`splash_interpret=True`.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import PartitionSpec

from dalle_jax import sharding

if TYPE_CHECKING:
    from dalle_jax.models.prior import PriorConfig

# Batch and heads follow the model's rules; the sequence is whole on each device (the kernel cannot split keys).
SHARDED_AXES = ("batch", None, "heads", None)


def padded_length(length: int, block_q: int, block_kv: int | None = None) -> int:
    """`length` rounded up to a multiple of both block sizes (the kernel's query and key tiles)."""
    step = math.lcm(block_q, block_kv or block_q)
    return -(-length // step) * step


@functools.lru_cache(maxsize=16)
def padded_masks(config: PriorConfig, length: int) -> np.ndarray:
    """The config's distinct masks (M, L, L) padded to (M, length, length) with the padded diagonal visible.

    Real queries never see a padded key; a padded query sees only itself, so every row has a visible key (no
    0/0 in the kernel) and no padded row reaches a real key or value in the backward pass.
    """
    masks, _, _ = config.masks()
    m, size, _ = masks.shape
    out = np.zeros((m, length, length), bool)
    out[:, :size, :size] = masks
    pad = np.arange(size, length)
    out[:, pad, pad] = True
    return out


def _block_sizes(block: int) -> splash.BlockSizes:
    # One square tile for the forward and both backward kernels; separate dq and dkv kernels (the fused backward
    # keeps a partial dq per key block: kv_blocks x the size of q in fp32).
    return splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)


@functools.lru_cache(maxsize=16)
def splash_masks(config: PriorConfig) -> tuple[splash.MultiHeadMask, ...]:
    """The config's distinct masks as splash masks, padded to the block, in the order of the mask stack.

    One head each: every head of a layer uses the layer's mask, and the kernel's block metadata for a mask that
    all heads share is one copy broadcast over the heads, the same for any head count.
    """
    length = padded_length(config.seq_len, config.splash_block)
    return tuple(splash.MultiHeadMask([splash.NumpyMask(mask)]) for mask in padded_masks(config, length))


def kernels(config: PriorConfig, interpret: bool) -> tuple[splash.SplashAttentionKernel, ...]:
    """One splash kernel per distinct mask of the config's stack.

    Build them inside the trace that calls them: the factory lifts its block metadata into the active trace as
    constants (a kernel cached across traces would hold another trace's values). The numpy work, finding each
    block's visibility, is cached by splash's own mask processing, so a retrace costs little.
    """
    return tuple(splash.make_splash_mha(mask, block_sizes=_block_sizes(config.splash_block), head_shards=1,
                                        q_seq_shards=1, interpret=interpret) for mask in splash_masks(config))


def _target_platform() -> str:
    """The platform the traced program is for: the mesh's devices (an AOT compile for TPU on a CPU host), else
    the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_index: jax.Array | int,
                     config: PriorConfig) -> jax.Array:
    """`attend(q, k, v, masks[mask_index], 0)` over the whole sequence, with the splash kernel.

    q, k, v (B, L, H, D) with L = config.seq_len, one dtype; mask_index () int into the config's mask stack
    (`config.masks()[0]`, the same index the layer scan uses). Returns (B, L, H, D) in q's dtype.
    """
    if q.shape[1] != config.seq_len or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"splash attention covers the whole sequence: q, k, v must all be (B, {config.seq_len}, "
                         f"H, D); got {q.shape}, {k.shape}, {v.shape} (cached prefill/decode use attention 'dense')")
    platform = _target_platform()
    if platform != "tpu" and not config.splash_interpret:
        raise ValueError(f"prior.attention_impl='splash' is a TPU kernel but this program is for '{platform}': "
                         f"use prior.attention_impl='blocked' (or 'dense') here, or set prior.splash_interpret=true "
                         f"to run the kernel in Pallas interpret mode (slow; for tests)")
    interpret = config.splash_interpret
    rules = sharding.active_rules()
    mesh = jax.sharding.get_abstract_mesh()
    mask_index = jnp.asarray(mask_index, jnp.int32)
    if rules is None or mesh.empty:
        return _local_attention(q, k, v, mask_index, config, interpret)
    spec = sharding.logical_to_spec(SHARDED_AXES, rules)
    sharding.check_divisible(q.shape, spec, mesh, "splash attention q/k/v", SHARDED_AXES)
    # check_vma=False: the splash kernel's pallas_call does not declare how its outputs vary over mesh axes.
    local = jax.shard_map(functools.partial(_local_attention, config=config, interpret=interpret),
                          in_specs=(spec, spec, spec, PartitionSpec()), out_specs=spec, check_vma=False)
    return local(q, k, v, mask_index)


def _local_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_index: jax.Array, config: PriorConfig,
                     interpret: bool) -> jax.Array:
    """This device's rows and heads: (b, L, h, D) -> (b, L, h, D), padded to the block and run per mask."""
    length, d = q.shape[1], q.shape[3]
    padded = padded_length(length, config.splash_block)
    q = (q.astype(jnp.float32) * (1.0 / math.sqrt(d))).astype(q.dtype)  # the kernel does not scale

    def heads_major(x):  # (b, L, h, D) -> (b, h, padded, D): the kernel's layout, one example at a time
        return jnp.swapaxes(jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))), 1, 2)

    branches = [jax.vmap(kernel) for kernel in kernels(config, interpret)]
    args = (heads_major(q), heads_major(k), heads_major(v))
    out = branches[0](*args) if len(branches) == 1 else jax.lax.switch(mask_index, branches, *args)
    return jnp.swapaxes(out, 1, 2)[:, :length]


def block_stats(config: PriorConfig, block_q: int | None = None, block_kv: int | None = None
                ) -> dict[str, dict[str, float]]:
    """What attention computes per layer at config.seq_len, for each distinct mask type and the whole schedule.

    For each mask type (models/masks.py) and "schedule" (summed over the config's layers, as fractions of
    n_layers times the per-layer total):
      visible          (query, key) score entries the mask shows (per layer)
      dense_fraction   visible / L^2 (no mask)
      causal_fraction  visible / (L (L + 1) / 2) (a causal mask)
      blocks           block_q x block_kv tiles of the padded mask with any visible entry: the tiles the splash
                       kernel computes (partially visible ones included, masked inside the tile)
      partial_blocks   of those, the tiles only partly visible
      block_fraction   blocks / all tiles of the padded (L', L') grid
      causal_block_fraction  blocks / the tiles a causal mask computes
      grid_fraction    the forward kernel's grid steps / all tiles: each query-block row is padded to the row
                       with most computed tiles, the extra steps skip their tile (cheap, not free)
    Block sizes default to config.splash_block.
    """
    block_q = block_q or config.splash_block
    block_kv = block_kv or config.splash_block
    length = config.seq_len
    padded = padded_length(length, block_q, block_kv)
    masks, layer_index, types = config.masks()
    tiles = padded_masks(config, padded).reshape(len(types), padded // block_q, block_q, padded // block_kv,
                                                 block_kv)
    causal = np.tril(np.ones((padded, padded), bool)).reshape(padded // block_q, block_q, padded // block_kv,
                                                              block_kv)
    causal_blocks = int(causal.any(axis=(1, 3)).sum())
    total_blocks = (padded // block_q) * (padded // block_kv)
    rows = []
    for mask, tile in zip(masks, tiles, strict=True):
        computed = tile.any(axis=(1, 3))
        rows.append({"visible": int(mask.sum()), "blocks": int(computed.sum()),
                     "partial_blocks": int((computed & ~tile.all(axis=(1, 3))).sum()),
                     "grid": computed.shape[0] * int(computed.sum(axis=1).max())})
    counts = np.bincount(layer_index, minlength=len(types))
    schedule = {key: sum(int(n) * row[key] for n, row in zip(counts, rows, strict=True)) for key in rows[0]}
    out = {}
    for name, row, layers in [*zip(types, rows, [1] * len(types), strict=True), ("schedule", schedule,
                                                                                config.n_layers)]:
        out[name] = {**row,
                     "dense_fraction": row["visible"] / (layers * length**2),
                     "causal_fraction": row["visible"] / (layers * length * (length + 1) / 2),
                     "block_fraction": row["blocks"] / (layers * total_blocks),
                     "causal_block_fraction": row["blocks"] / (layers * causal_blocks),
                     "grid_fraction": row["grid"] / (layers * total_blocks)}
    return out
