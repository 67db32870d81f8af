"""The DALL·E prior: a decoder-only sparse transformer over [text | image] tokens, in Flax NNX.

Layout and masks: see `dalle_jax.models.masks` (position 0 is a learned start vector, positions 1..T hold the
text ids, T+1.. the image tokens but the last; position p predicts token p of [text | image]).

Embeddings: text id + text position (one learned pad id per position comes from the tokenizer's id space);
image token + row + column. Pre-norm blocks (attention + 4x GELU MLP), residual projections initialised with
std 0.02 / sqrt(2 n_layers). Separate fp32 text and image heads.

Layers are stacked (a leading "layers" axis on every block parameter) and applied with `lax.scan`; each layer
picks its mask from a small stack by index, so 64 layers compile like one. Every parameter carries logical axis
names and activations are constrained by name, so data / FSDP / tensor parallelism is only a change of rules.

One block function serves training, prefill and decoding: with a KV cache (per layer k, v: (B, heads, L,
head_dim)) and the absolute position of the first query it writes the new keys and values at that position and
returns the updated cache. Decoding loops over the layers in Python rather than scanning: see `forward`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_jax.errors import ConfigError
from dalle_jax.models import masks as masks_lib
from dalle_jax.models import splash as splash_lib
from dalle_jax.models.dvae import pair_sums
from dalle_jax.models.init import ones as _ones
from dalle_jax.models.init import param as _param
from dalle_jax.sharding import constrain

RESIDUAL = ("batch", "length", None)
ATTENTION_IMPLS = ("dense", "blocked", "splash")
HEADS = ("batch", "length", "heads", None)
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Architecture. Defaults are the paper's 12B model.

    Inside a `Config` the vocabulary, text length, pad mode and grid fields are derived from the text, dvae and
    data sections (see `Config.__post_init__`); set those there.
    """

    text_vocab_size: int = 16384  # BPE ids; pad ids come on top (see text_rows)
    text_len: int = 256
    # "per_position" (paper): one learned pad per text position; "shared": one pad id (the ablation).
    pad_mode: str = "per_position"
    image_vocab_size: int = 8192
    # Product codes (dvae.factor_codes; not in the paper, issue 17): with A > 0 an image token t is the pair
    # (t // (V / A), t % (V / A)) and `product_head` (below) decides how the prior sees it. Derived, like the vocab.
    image_factor_codes: int = 0
    # With product codes: True embeds a token as the sum of one row per table and predicts it as the sum of one
    # logit per table, so p(token) = p(first) p(second) given the context, and a pair of entries that training
    # used in other pairs gets the product of their probabilities (with one row per code, a code no training image
    # uses is only ever pushed down). False: one row and one logit per code, as the paper (the ablation).
    product_head: bool = True
    grid_size: int = 32
    d_model: int = 3968
    n_layers: int = 64
    n_heads: int = 62
    head_dim: int = 64
    mlp_ratio: int = 4
    attention: str = "sparse"  # the paper's row/column/conv schedule; "dense" for the ablation (see masks.py)
    last_layer_conv: bool = True  # False: the conv-mask ablation
    conv_kernel: int = 11  # at a 32x32 grid; small presets scale it down
    dropout: float = 0.0
    compute_dtype: str = "float32"  # "bfloat16" for TPU; params, softmax, LN and logits stay fp32
    remat: str = "none"  # none | full | dots
    # Training/full-sequence attention: "dense" is the reference (masked softmax over all keys); "blocked" computes
    # the same values but splits queries into blocks of `attention_block` and skips the keys past the last one
    # any layer's mask lets the block see (~40% of the scores at 320 tokens). "splash": a Pallas TPU kernel that
    # computes only the (splash_block x splash_block) tiles each layer's own mask shows (models/splash.py; 44% of
    # the tiles at the paper's 1280 tokens, a causal mask shows 55%). Cached prefill/decode stay dense.
    attention_impl: str = "blocked"
    attention_block: int = 64
    splash_block: int = 128  # splash tile size (queries and keys); a multiple of the TPU lane width, 128
    # The splash kernel compiles only for TPU; True runs it in Pallas interpret mode elsewhere (CPU tests; slow).
    splash_interpret: bool = False
    init_std: float = 0.02

    def __post_init__(self):
        if self.pad_mode not in ("per_position", "shared"):
            raise ConfigError(f"prior.pad_mode='{self.pad_mode}': choose 'per_position' or 'shared'")
        if self.remat not in REMAT_POLICIES:
            raise ConfigError(f"prior.remat='{self.remat}': choose one of {sorted(REMAT_POLICIES)}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(f"prior.attention_impl='{self.attention_impl}': choose one of {ATTENTION_IMPLS}")
        if self.attention_block < 1:
            raise ConfigError(f"prior.attention_block={self.attention_block} must be >= 1")
        if self.splash_block < 128 or self.splash_block % 128:
            raise ConfigError(f"prior.splash_block={self.splash_block} must be a positive multiple of 128 (the "
                             f"splash kernel tiles keys by the TPU lane width)")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"prior.compute_dtype='{self.compute_dtype}': float32 or bfloat16")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"prior.dropout={self.dropout} must be in [0, 1)")
        if self.attention not in ("sparse", *masks_lib.LAYER_TYPES):
            raise ConfigError(f"prior.attention='{self.attention}': choose 'sparse' (the paper's schedule) or one "
                              f"type for every layer: {masks_lib.LAYER_TYPES}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 != 1:
            raise ConfigError(f"prior.conv_kernel={self.conv_kernel} must be a positive odd number")
        if self.image_factor_codes and (self.image_factor_codes < 2 or self.image_vocab_size % self.image_factor_codes):
            raise ConfigError(f"prior.image_factor_codes={self.image_factor_codes} must divide image_vocab_size="
                              f"{self.image_vocab_size} (it is derived from dvae.factor_codes: set that)")
        if min(self.n_layers, self.n_heads, self.head_dim, self.d_model, self.mlp_ratio) < 1:
            raise ConfigError("prior.n_layers, n_heads, head_dim, d_model and mlp_ratio must be >= 1")

    @property
    def text_rows(self) -> int:
        """Rows of the text embedding: BPE ids + pads (matches TextTokenizer.embedding_size)."""
        return self.text_vocab_size + (self.text_len if self.pad_mode == "per_position" else 1)

    @property
    def image_tables(self) -> tuple[int, ...]:
        """Rows per image embedding table (and logits per head): (V,), or (A, V / A) with a product head."""
        if self.image_factor_codes and self.product_head:
            return (self.image_factor_codes, self.image_vocab_size // self.image_factor_codes)
        return (self.image_vocab_size,)

    @property
    def image_len(self) -> int:
        return self.grid_size**2

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    def masks(self) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
        return masks_lib.mask_stack(self.n_layers, self.text_len, self.grid_size, self.grid_size,
                                    attention=self.attention, last_layer_conv=self.last_layer_conv,
                                    conv_kernel=self.conv_kernel)


@functools.lru_cache(maxsize=8)
def _masks_for(config: PriorConfig) -> tuple[np.ndarray, np.ndarray]:
    """The config's mask stack and per-layer index: constants rebuilt from the config, never checkpointed."""
    masks, layer_index, _ = config.masks()
    return masks, layer_index


@functools.lru_cache(maxsize=8)
def query_blocks(config: PriorConfig) -> tuple[tuple[int, int, int], ...]:
    """(first query, end query, key end) per block of `attention_block` queries for the "blocked" attention.

    The key end is one past the last key that any layer's mask shows any query of the block, so the skipped
    keys are masked out in every layer and the result equals the dense softmax. At text 4, grid 4x4, block 8:
    ((0, 8, 8), (8, 16, 16), (16, 20, 20)).
    """
    mask_stack, _ = _masks_for(config)
    seen = mask_stack.any(axis=0)  # (L, L): visible in some layer
    last = np.where(seen.any(axis=1), seen.shape[1] - np.argmax(seen[:, ::-1], axis=1), 1)
    size = config.attention_block
    return tuple((a, min(a + size, len(last)), int(last[a:a + size].max())) for a in range(0, len(last), size))


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float = 1e-5) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def layer_stack(rngs: nnx.Rngs, n: int, d: int, h: int, k: int, f: int, std: float, key_bias: bool) -> nnx.Dict:
    """The parameters of n pre-norm blocks stacked on a leading "layers" axis (for lax.scan): width d, h heads
    of size k, MLP width f; N(0, std^2) matrices, residual projections at std / sqrt(2n) (GPT-2 style)."""
    out_std = std / math.sqrt(2 * n)
    L = "layers"
    biases = ("bq", "bk", "bv") if key_bias else ("bq", "bv")
    return nnx.Dict(
        ln1_scale=_ones((n, d), (L, "embed")), ln1_bias=_param(rngs, (n, d), 0, (L, "embed")),
        **{name: _param(rngs, (n, d, h, k), std, (L, "embed", "heads", "kv")) for name in ("wq", "wk", "wv")},
        **{name: _param(rngs, (n, h, k), 0, (L, "heads", "kv")) for name in biases},
        wo=_param(rngs, (n, h, k, d), out_std, (L, "heads", "kv", "embed")),
        bo=_param(rngs, (n, d), 0, (L, "embed")),
        ln2_scale=_ones((n, d), (L, "embed")), ln2_bias=_param(rngs, (n, d), 0, (L, "embed")),
        w1=_param(rngs, (n, d, f), std, (L, "embed", "mlp")), b1=_param(rngs, (n, f), 0, (L, "mlp")),
        w2=_param(rngs, (n, f, d), out_std, (L, "mlp", "embed")), b2=_param(rngs, (n, d), 0, (L, "embed")),
    )


class Prior(nnx.Module):
    def __init__(self, config: PriorConfig, *, rngs: nnx.Rngs):
        self.config = config
        c, std = config, config.init_std
        d, n, h, k, f = c.d_model, c.n_layers, c.n_heads, c.head_dim, c.d_model * c.mlp_ratio
        self.start_embed = _param(rngs, (d,), std, ("embed",))
        self.text_embed = _param(rngs, (c.text_rows, d), std, ("vocab", "embed"))
        self.text_pos = _param(rngs, (c.text_len, d), std, (None, "embed"))
        tables = c.image_tables
        self.image_embed = _param(rngs, (tables[0], d), std, ("vocab", "embed"))
        if len(tables) == 2:
            self.image_embed_second = _param(rngs, (tables[1], d), std, ("vocab", "embed"))
        self.row_embed = _param(rngs, (c.grid_size, d), std, (None, "embed"))
        self.col_embed = _param(rngs, (c.grid_size, d), std, (None, "embed"))
        self.layers = layer_stack(rngs, n, d, h, k, f, std, key_bias=True)
        self.final_scale = _ones((d,), ("embed",))
        self.final_bias = _param(rngs, (d,), 0, ("embed",))
        self.text_head = _param(rngs, (d, c.text_vocab_size), std, ("embed", "vocab"))
        self.image_head = _param(rngs, (d, tables[0]), std, ("embed", "vocab"))
        if len(tables) == 2:
            self.image_head_second = _param(rngs, (d, tables[1]), std, ("embed", "vocab"))

    # ---------------------------------------------------------------------------------------------- inputs

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        """tokens (B, S) int at absolute `positions` (S,) -> (B, S, d) fp32 (the token at position 0 is ignored)."""
        c = self.config
        is_text = positions <= c.text_len
        text = (self.text_embed[...][jnp.clip(tokens, 0, c.text_rows - 1)]
                + self.text_pos[...][jnp.clip(positions - 1, 0, c.text_len - 1)])
        cell = jnp.clip(positions - c.text_len - 1, 0, c.image_len - 1)
        image = (self.image_token_embed(jnp.clip(tokens, 0, c.image_vocab_size - 1))
                 + self.row_embed[...][cell // c.grid_size] + self.col_embed[...][cell % c.grid_size])
        x = jnp.where(is_text[None, :, None], text, image)
        x = jnp.where((positions == 0)[None, :, None], self.start_embed[...], x)
        return constrain(x, RESIDUAL)

    def image_token_embed(self, tokens: jax.Array) -> jax.Array:
        """Image tokens (...) -> (..., d): one row, or with a product head the sum of a row from each table."""
        tables = self.config.image_tables
        if len(tables) == 1:
            return self.image_embed[...][tokens]
        return self.image_embed[...][tokens // tables[1]] + self.image_embed_second[...][tokens % tables[1]]

    @staticmethod
    def input_tokens(text: jax.Array, image: jax.Array) -> jax.Array:
        """Training input (B, T + N): [start | text | image[:-1]] (the start slot holds 0)."""
        start = jnp.zeros((text.shape[0], 1), text.dtype)
        return jnp.concatenate([start, text, image[:, :-1].astype(text.dtype)], axis=1)

    # ---------------------------------------------------------------------------------------------- body

    def forward(self, tokens: jax.Array, start: jax.Array | int = 0, cache: list[dict] | None = None,
                dropout_key: jax.Array | None = None, layers: list[dict] | None = None
                ) -> tuple[jax.Array, list[dict] | None]:
        """Hidden states (B, S, d) fp32 after the final norm for `tokens` at positions start..start+S-1.

        Without a cache the keys are these S positions (training, `start` = 0). With a cache (one
        {"k", "v": (B, heads, L, head_dim)} per layer, `init_cache`) they are the cache with this call's keys
        written at `start`; the updated cache is returned. `layers` (cached calls only) are `layer_params()`
        taken once by a caller that decodes many steps.
        """
        c = self.config
        s = tokens.shape[1]
        positions = start + jnp.arange(s)
        x = self.embed(tokens, positions)
        mask_stack, layer_index = _masks_for(c)
        masks = jnp.asarray(mask_stack)
        full = cache is None and isinstance(start, int) and start == 0 and s == c.seq_len
        blocks = query_blocks(c) if full and c.attention_impl == "blocked" else None
        use_splash = full and c.attention_impl == "splash"
        dtype = jnp.dtype(c.compute_dtype)

        if cache is not None:
            # Decoding: a Python loop over the layers, each with its own cache buffers written in place. One stacked
            # cache carried through a layer scan made XLA:CPU copy each layer's slice out of the stack at every
            # step (and slices of stacked weights too; see `layer_params`).
            layers = self.layer_params() if layers is None else layers
            new_cache = []
            for index, (p, layer_cache) in enumerate(zip(layers, cache, strict=True)):
                mask = masks[int(layer_index[index])]
                x, kv = _block(x, p, mask, start, (layer_cache["k"], layer_cache["v"]), c, dtype, None)
                new_cache.append({"k": kv[0], "v": kv[1]})
            return layer_norm(x, self.final_scale[...], self.final_bias[...]), new_cache

        params = {name: value[...] for name, value in self.layers.items()}
        train_dropout = c.dropout > 0 and dropout_key is not None
        keys = (jax.random.split(dropout_key, c.n_layers) if train_dropout
                else jnp.zeros((c.n_layers,), jnp.uint32))

        def layer(x, xs):
            p, mask_index, key = xs
            mask = jax.lax.dynamic_index_in_dim(masks, mask_index, keepdims=False)
            x, _ = _block(x, p, mask, start, None, c, dtype,
                          key if train_dropout else None, blocks, mask_index if use_splash else None)
            return x, None

        if c.remat != "none":
            layer = jax.checkpoint(layer, policy=REMAT_POLICIES[c.remat])
        x, _ = jax.lax.scan(layer, x, (params, jnp.asarray(layer_index), keys))
        return layer_norm(x, self.final_scale[...], self.final_bias[...]), None

    def text_logits(self, h: jax.Array) -> jax.Array:
        return constrain(jnp.einsum("bsd,dv->bsv", h, self.text_head[...]), ("batch", "length", "vocab"))

    def image_logits(self, h: jax.Array) -> jax.Array:
        logits = jnp.einsum("bsd,dv->bsv", h, self.image_head[...])
        if len(self.config.image_tables) == 2:  # token (a, b) scores logit_a + logit_b: a product of two softmaxes
            logits = pair_sums(logits, jnp.einsum("bsd,dv->bsv", h, self.image_head_second[...]))
        return constrain(logits, ("batch", "length", "vocab"))

    def __call__(self, text: jax.Array, image: jax.Array, dropout_key: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """text (B, T) ids, image (B, N) tokens -> text logits (B, T, text_vocab), image logits (B, N, image_vocab)."""
        h, _ = self.forward(self.input_tokens(text, image), dropout_key=dropout_key)
        t = self.config.text_len
        return self.text_logits(h[:, :t]), self.image_logits(h[:, t:])

    def layer_params(self) -> list[dict]:
        """Each layer's parameters as its own arrays (copies of the stack's slices); why a decode loop takes them
        once: `sampling.sampler.decode_layers`."""
        stacked = {name: value[...] for name, value in self.layers.items()}
        return [{name: value[i] for name, value in stacked.items()} for i in range(self.config.n_layers)]

    def init_cache(self, batch: int, dtype: Any = jnp.float32) -> list[dict]:
        """An empty KV cache: per layer {"k", "v": (B, heads, seq_len, head_dim)} (head-major: see `attend`)."""
        c = self.config
        shape = (batch, c.n_heads, c.seq_len, c.head_dim)
        return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(c.n_layers)]


def _block(x: jax.Array, p: dict, mask: jax.Array, start: jax.Array | int,
           kv_cache: tuple[jax.Array, jax.Array] | None, c: PriorConfig, dtype: Any, key: jax.Array | None,
           blocks: tuple[tuple[int, int, int], ...] | None = None, splash_mask_index: jax.Array | None = None
           ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One pre-norm block. x (B, S, d) fp32 residual stream; mask (L, L) bool for this layer.

    With a cache, kv_cache is this layer's (k, v), each (B, heads, L, head_dim): the block writes its keys and
    values at `start` and attends over the whole buffer; the updated pair is returned.
    `blocks` selects the "blocked" attention, `splash_mask_index` (this layer's index into the mask stack) the
    splash kernel; both only for the full sequence without a cache.
    """
    w = {name: v.astype(dtype) for name, v in p.items() if name[0] in "wb"}
    h = layer_norm(x, p["ln1_scale"], p["ln1_bias"]).astype(dtype)
    q = constrain(jnp.einsum("bsd,dhk->bshk", h, w["wq"]) + w["bq"], HEADS)
    k = constrain(jnp.einsum("bsd,dhk->bshk", h, w["wk"]) + w["bk"], HEADS)
    v = constrain(jnp.einsum("bsd,dhk->bshk", h, w["wv"]) + w["bv"], HEADS)
    new_kv = None
    # k, v are in the compute dtype; only a cache (which may be stored in another dtype) needs casting back
    if kv_cache is not None:  # head-major (B, heads, L, head_dim): see `attend`
        at = (0, 0, start, 0)
        new_kv = tuple(jax.lax.dynamic_update_slice(buffer, jnp.swapaxes(new, 1, 2).astype(buffer.dtype), at)
                       for buffer, new in zip(kv_cache, (k, v), strict=True))
        attn = attend(q, new_kv[0].astype(dtype), new_kv[1].astype(dtype), mask, start, head_major=True)
    elif splash_mask_index is not None:  # the same values from the block-sparse TPU kernel (models/splash.py)
        attn = splash_lib.splash_attention(q, k, v, splash_mask_index, c)
    elif blocks is None:
        attn = attend(q, k, v, mask, start)
    else:  # same values, without the key blocks no query of a block can see (see query_blocks)
        attn = jnp.concatenate([attend(q[:, a:b], k[:, :hi], v[:, :hi], mask, a) for a, b, hi in blocks], axis=1)
    out = jnp.einsum("bshk,hkd->bsd", attn, w["wo"], preferred_element_type=jnp.float32) + w["bo"]
    keys = jax.random.split(key) if key is not None else (None, None)
    x = constrain(x + _dropout(out, c.dropout, keys[0]), RESIDUAL)
    h = layer_norm(x, p["ln2_scale"], p["ln2_bias"]).astype(dtype)
    hidden = jax.nn.gelu(jnp.einsum("bsd,df->bsf", h, w["w1"]) + w["b1"])
    hidden = constrain(hidden, ("batch", "length", "mlp"))
    out = jnp.einsum("bsf,fd->bsd", hidden, w["w2"], preferred_element_type=jnp.float32) + w["b2"]
    return constrain(x + _dropout(out, c.dropout, keys[1]), RESIDUAL), new_kv


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, start: jax.Array | int,
           head_major: bool = False) -> jax.Array:
    """Masked softmax attention, one joint softmax per query, fp32 scores.

    q (B, S, H, D) at positions start..start+S-1; k, v (B, Lk, H, D) at positions 0..Lk-1, or (B, H, Lk, D) with
    `head_major` (the KV cache's layout); mask (L, L) bool over absolute positions. The reference implementation
    every faster kernel is tested against.

    Why the cache is head-major: with (B, Lk, H, D) keys XLA:CPU transposed the layer's whole cache for the score
    and value matmuls at every decode step, two full copies per layer and step (a trace at batch 4: 44% of the
    step). Stored head-major, the matmuls read the cache as it lies.
    """
    kv = "bhtd" if head_major else "bthd"
    s, lk = q.shape[1], k.shape[2 if head_major else 1]
    visible = jax.lax.dynamic_slice(mask, (start, 0), (s, lk))
    scores = jnp.einsum(f"bshd,{kv}->bhst", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    scores = jnp.where(visible[None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum(f"bhst,{kv}->bshd", probs, v)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def count_params(config: PriorConfig) -> int:
    """Parameters of the prior, computed abstractly (nothing allocated)."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Prior(config, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
