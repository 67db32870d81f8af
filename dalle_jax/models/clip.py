"""A small CLIP-style dual encoder, used to rerank the prior's samples against their caption.

DALL·E reranks with OpenAI's CLIP; we train a small one in-project on the same images and captions, so the
reranker sees exactly the data distribution (and the held-out shapes combinations) the prior does.

Image tower: a ViT. Pixels in [0, 1] are normalised per channel, cut into patch_size² patches, linearly
embedded, plus a learned position embedding, then pre-norm transformer blocks, attention pooling by one learned
query (or the mean patch), a LayerNorm of the pooled vector and a linear projection. The norm comes *after*
pooling and there is no per-token pre-norm, on purpose: on images that are mostly background, per-token norms
give the identical background patches as much weight as the few that differ, so at init every image embeds
alike (measured on 32 px shapes: cosine 0.997 between images with a pre-norm and no pixel normalisation, 0.97
with pixel normalisation, 0.06 ± 0.5 as built here) and InfoNCE sits on its log(batch) plateau, or collapses to
it. A ViT rather than a conv net: XLA:CPU's conv weight-gradients are slow (see the dVAE's notes) and a ViT of
8 px patches at 32 px is a few matmuls on 16 tokens.

Text tower: the same BPE ids as the prior, including the tokenizer's pad ids (any id >= text_vocab_size is a
pad, per-position or shared). A learned start vector sits in front of the caption; attention is bidirectional
with pad *keys* masked out, and the output is the LayerNorm of the mean over the start slot and the non-pad
tokens. So a text embedding is exactly independent of what stands in the pad positions (a property the tests
check), and an empty caption still has one position to pool.

Both embeddings are projected to `embed_dim` and L2-normalised; similarities are cosines, multiplied in the
loss by a learned temperature exp(log_logit_scale), initialised at 1/0.07 and capped at 100 (as CLIP does).

Layers of each tower are stacked (leading "layers" axis) and run under `lax.scan`; every parameter carries
logical axis names from the shared rules table (embed, heads, kv, mlp, layers), so it shards like the prior.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dalle_jax.errors import ConfigError
from dalle_jax.models.init import ones as _ones
from dalle_jax.models.init import param as _param
from dalle_jax.models.prior import layer_norm, layer_stack
from dalle_jax.sharding import constrain

RESIDUAL = ("batch", "length", None)
HEADS = ("batch", "length", "heads", None)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """Architecture. Defaults are CLIP ViT-B/16-like towers (Radford et al. 2021).

    Inside a `Config`, image_size comes from data.image_size and the text fields from the text section (see
    `Config.__post_init__`). The CLIP trainer then sets text_vocab_size to the tokenizer's actual BPE size (it
    can be below text.vocab_size), because ids from there up are pads; the trained model's own
    clip_config.json records that value.
    """

    image_size: int = 256
    patch_size: int = 16
    # "map": one learned query attends over the patches (attention pooling, as big_vision's MAP head); its
    # weights follow content, so where the object is reaches the embedding through the position embedding.
    # "mean": the average patch ("gap").
    image_pool: str = "map"
    image_width: int = 768
    image_layers: int = 12
    image_heads: int = 12
    text_vocab_size: int = 16384  # BPE ids; ids >= this are pads
    text_len: int = 256
    pad_mode: str = "per_position"
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    embed_dim: int = 512
    mlp_ratio: int = 4
    logit_scale_init: float = math.log(1 / 0.07)
    logit_scale_max: float = 100.0
    compute_dtype: str = "float32"  # "bfloat16" on TPU/GPU; params, LayerNorm, softmax and the loss stay fp32
    init_std: float = 0.02
    # Per-channel pixel normalisation (x - mean) / std on [0, 1] pixels. Defaults are CLIP's; the trainer
    # measures them on the training images instead and records them in clip_config.json (derived, like
    # text_vocab_size). Why it matters: on mostly-white images unnormalised patches make every image embed
    # alike at init (cosine ~0.997 on shapes), and training sits on the log(batch) plateau far longer.
    pixel_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    pixel_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ConfigError(f"clip.patch_size={self.patch_size} does not divide the image size {self.image_size}")
        for tower in ("image", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if width % heads:
                raise ConfigError(f"clip.{tower}_width={width} is not divisible by clip.{tower}_heads={heads}")
            if getattr(self, f"{tower}_layers") < 1:
                raise ConfigError(f"clip.{tower}_layers must be >= 1")
        if self.image_pool not in ("map", "mean"):
            raise ConfigError(f"clip.image_pool='{self.image_pool}': choose 'map' or 'mean'")
        if self.pad_mode not in ("per_position", "shared"):
            raise ConfigError(f"clip.pad_mode='{self.pad_mode}': choose 'per_position' or 'shared'")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"clip.compute_dtype='{self.compute_dtype}': float32 or bfloat16")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ConfigError("clip.pixel_mean / clip.pixel_std need 3 entries, std > 0")
        if not 0 < self.logit_scale_init <= math.log(self.logit_scale_max):
            raise ConfigError("clip.logit_scale_init must be in (0, log(logit_scale_max)]")

    @property
    def text_rows(self) -> int:
        """Rows of the token embedding: BPE ids + pad ids (as the prior's). Pad rows are never read."""
        return self.text_vocab_size + (self.text_len if self.pad_mode == "per_position" else 1)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * 3




class TransformerTower(nnx.Module):
    """A stack of pre-norm transformer blocks (bidirectional, optional key mask); returns the residual stream.

    There is no key bias: it adds the same q·b to every score of a query, so its gradient is exactly zero and
    Adam would only amplify rounding noise in it.
    """

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: int, std: float, *, rngs: nnx.Rngs):
        self.layers = layer_stack(rngs, layers, width, heads, width // heads, width * mlp_ratio, std, key_bias=False)

    def __call__(self, x: jax.Array, key_valid: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
        """x (B, S, d) fp32, key_valid (B, S) bool or None -> the residual stream (B, S, d) fp32 (not normed)."""
        params = {name: value[...] for name, value in self.layers.items()}

        def layer(x, p):
            return _block(x, p, key_valid, dtype), None

        x, _ = jax.lax.scan(layer, constrain(x, RESIDUAL), params)
        return x


def _block(x: jax.Array, p: dict, key_valid: jax.Array | None, dtype: jnp.dtype) -> jax.Array:
    """One pre-norm block (attention + GELU MLP) on the fp32 residual stream x (B, S, d)."""
    w = {name: v.astype(dtype) for name, v in p.items() if name[0] in "wb"}
    h = layer_norm(x, p["ln1_scale"], p["ln1_bias"]).astype(dtype)
    q = constrain(jnp.einsum("bsd,dhk->bshk", h, w["wq"]) + w["bq"], HEADS)  # (B, S, H, K)
    k = constrain(jnp.einsum("bsd,dhk->bshk", h, w["wk"]), HEADS)  # no key bias: it shifts a softmax row
    v = constrain(jnp.einsum("bsd,dhk->bshk", h, w["wv"]) + w["bv"], HEADS)
    attn = attention(q, k, v, key_valid)
    out = jnp.einsum("bshk,hkd->bsd", attn, w["wo"], preferred_element_type=jnp.float32) + w["bo"]
    x = constrain(x + out, RESIDUAL)
    h = layer_norm(x, p["ln2_scale"], p["ln2_bias"]).astype(dtype)
    hidden = constrain(jax.nn.gelu(jnp.einsum("bsd,df->bsf", h, w["w1"]) + w["b1"]), ("batch", "length", "mlp"))
    out = jnp.einsum("bsf,fd->bsd", hidden, w["w2"], preferred_element_type=jnp.float32) + w["b2"]
    return constrain(x + out, RESIDUAL)


class AttentionPool(nnx.Module):
    """One learned query per head attends over the tokens: (B, N, d) -> (B, d).

    Keys come from LayerNormed tokens; values from the raw residual stream, so at init (near-uniform weights)
    the result is close to the mean token and keeps the magnitude contrast between background and object
    patches that the pooling-before-norm design relies on.
    """

    def __init__(self, width: int, heads: int, std: float, *, rngs: nnx.Rngs):
        d, h, k = width, heads, width // heads
        self.probe = _param(rngs, (h, k), std, ("heads", "kv"))
        self.key_scale = _ones((d,), ("embed",))  # no key bias: like a key bias it would shift every score alike
        self.wk = _param(rngs, (d, h, k), std, ("embed", "heads", "kv"))
        self.wv = _param(rngs, (d, h, k), d**-0.5, ("embed", "heads", "kv"))
        self.wo = _param(rngs, (h, k, d), (h * k) ** -0.5, ("heads", "kv", "embed"))

    def __call__(self, x: jax.Array, dtype: jnp.dtype) -> jax.Array:
        keys = layer_norm(x, self.key_scale[...], 0.0).astype(dtype)
        k = jnp.einsum("bnd,dhk->bnhk", keys, self.wk[...].astype(dtype))  # (B, N, H, K)
        scores = jnp.einsum("hk,bnhk->bhn", self.probe[...].astype(dtype), k,
                            preferred_element_type=jnp.float32) / math.sqrt(k.shape[-1])
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)  # (B, H, N)
        v = jnp.einsum("bnd,dhk->bnhk", x.astype(dtype), self.wv[...].astype(dtype))
        out = jnp.einsum("bhn,bnhk->bhk", probs, v)
        return jnp.einsum("bhk,hkd->bd", out, self.wo[...].astype(dtype), preferred_element_type=jnp.float32)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array | None) -> jax.Array:
    """Bidirectional softmax attention with fp32 scores; q, k, v (B, S, H, D), key_valid (B, S) bool.

    Masked keys get the most negative finite score, so their weight is exactly 0 (and whatever their values
    hold cannot leak into the output).
    """
    scores = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    if key_valid is not None:
        scores = jnp.where(key_valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhst,bthd->bshd", probs, v)


def normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """L2-normalises the last axis in fp32 (eps keeps a zero vector finite)."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps**2))


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/p * W/p, p * p * C), patches in row-major order."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


class CLIP(nnx.Module):
    """Dual encoder: `encode_image`, `encode_text` -> unit vectors (B, embed_dim); `logit_scale()`."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs):
        self.config = c = config
        std = c.init_std
        # Image tower.
        self.patch_embed = _param(rngs, (c.patch_dim, c.image_width), 1.0 / math.sqrt(c.patch_dim), (None, "embed"))
        self.patch_bias = _param(rngs, (c.image_width,), 0, ("embed",))
        self.image_pos = _param(rngs, (c.num_patches, c.image_width), std, (None, "embed"))
        self.image_encoder = TransformerTower(c.image_width, c.image_layers, c.image_heads, c.mlp_ratio, std, rngs=rngs)
        if c.image_pool == "map":
            self.image_pooler = AttentionPool(c.image_width, c.image_heads, std, rngs=rngs)
        self.image_post_scale = _ones((c.image_width,), ("embed",))
        self.image_post_bias = _param(rngs, (c.image_width,), 0, ("embed",))
        self.image_proj = _param(rngs, (c.image_width, c.embed_dim), c.image_width**-0.5, ("embed", None))
        # Text tower. The token table is not split over "vocab": its row count follows the tokenizer's actual
        # size, which need not divide the tensor axis, and it is small next to the towers.
        self.token_embed = _param(rngs, (c.text_rows, c.text_width), std, (None, "embed"))
        self.text_start = _param(rngs, (c.text_width,), std, ("embed",))
        self.text_pos = _param(rngs, (c.text_len + 1, c.text_width), std, (None, "embed"))
        self.text_encoder = TransformerTower(c.text_width, c.text_layers, c.text_heads, c.mlp_ratio, std, rngs=rngs)
        self.text_post_scale = _ones((c.text_width,), ("embed",))
        self.text_post_bias = _param(rngs, (c.text_width,), 0, ("embed",))
        self.text_proj = _param(rngs, (c.text_width, c.embed_dim), c.text_width**-0.5, ("embed", None))
        self.log_logit_scale = nnx.Param(jnp.full((), c.logit_scale_init, jnp.float32), out_sharding=())

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(self.config.compute_dtype)

    def encode_image(self, images: jax.Array) -> jax.Array:
        """images (B, S, S, 3): uint8 (0..255) or floats in [0, 1] -> unit vectors (B, embed_dim) fp32."""
        c = self.config
        if jnp.issubdtype(images.dtype, jnp.integer):
            images = images.astype(jnp.float32) / 255.0
        images = (images - jnp.asarray(c.pixel_mean)) / jnp.asarray(c.pixel_std)
        patches = patchify(images.astype(self.dtype), c.patch_size)  # (B, N, p*p*3)
        x = jnp.einsum("bnp,pd->bnd", patches, self.patch_embed[...].astype(self.dtype),
                       preferred_element_type=jnp.float32) + self.patch_bias[...]
        h = self.image_encoder(x + self.image_pos[...], None, self.dtype)  # (B, N, d)
        pooled = self.image_pooler(h, self.dtype) if c.image_pool == "map" else jnp.mean(h, axis=1)  # (B, d)
        pooled = layer_norm(pooled, self.image_post_scale[...], self.image_post_bias[...])
        return normalize(pooled @ self.image_proj[...])

    def text_valid(self, text_ids: jax.Array) -> jax.Array:
        """(B, T) ids -> (B, T) bool, False at pads (any id >= text_vocab_size)."""
        return text_ids < self.config.text_vocab_size

    def encode_text(self, text_ids: jax.Array) -> jax.Array:
        """text_ids (B, T) BPE ids with the tokenizer's pads -> unit vectors (B, embed_dim) fp32."""
        c = self.config
        b = text_ids.shape[0]
        valid = jnp.concatenate([jnp.ones((b, 1), bool), self.text_valid(text_ids)], axis=1)  # (B, T + 1)
        tokens = self.token_embed[...][jnp.clip(text_ids, 0, c.text_rows - 1)]  # (B, T, d)
        start = jnp.broadcast_to(self.text_start[...], (b, 1, c.text_width))
        x = jnp.concatenate([start, tokens], axis=1) + self.text_pos[...]  # (B, T + 1, d)
        h = self.text_encoder(x, valid, self.dtype)
        weights = valid.astype(jnp.float32)[..., None]
        pooled = jnp.sum(h * weights, axis=1) / jnp.sum(weights, axis=1)  # (B, d): mean over non-pad slots
        pooled = layer_norm(pooled, self.text_post_scale[...], self.text_post_bias[...])
        return normalize(pooled @ self.text_proj[...])

    def logit_scale(self) -> jax.Array:
        """exp(log_logit_scale), capped at logit_scale_max (CLIP clips at 100)."""
        return jnp.exp(jnp.minimum(self.log_logit_scale[...], math.log(self.config.logit_scale_max)))

    def __call__(self, images: jax.Array, text_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> (image embeddings (B, E), text embeddings (B, E)), unit length."""
        return self.encode_image(images), self.encode_text(text_ids)


def similarity_matrix(model: CLIP, images: jax.Array, text_ids: jax.Array) -> jax.Array:
    """Cosine similarity of every image with every caption: (B_images, B_texts) in [-1, 1]."""
    image_emb, text_emb = model(images, text_ids)
    return image_emb @ text_emb.T


def pair_similarity(model: CLIP, images: jax.Array, text_ids: jax.Array) -> jax.Array:
    """Cosine similarity of matched pairs (image i, caption i): (B,) in [-1, 1]. Rerank by this."""
    image_emb, text_emb = model(images, text_ids)
    return jnp.sum(image_emb * text_emb, axis=-1)


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                     negative_emb: jax.Array | None = None, negative_valid: jax.Array | None = None
                     ) -> tuple[jax.Array, dict]:
    """Symmetric InfoNCE over the batch: mean of CE(image -> its caption) and CE(caption -> its image).

    image_emb, text_emb (B, E) unit vectors (global arrays under sharding: the math is the same),
    logit_scale a scalar. Also returns the in-batch top-1 accuracies both ways.

    With `negative_emb` (B, E), hard-negative captions (NegCLIP, Yuksekgonul et al. 2023): every image also ranks
    the B negatives (those with `negative_valid` False are left out), so image -> text is CE over 2B captions;
    caption -> image is unchanged (a negative has no image). `hard_negative_acc`: images that score their own
    caption above their own negative.
    """
    logits = logit_scale * (image_emb @ text_emb.T).astype(jnp.float32)  # (B images, B texts)
    labels = jnp.arange(logits.shape[0])
    extra = {}
    text_logits = logits
    if negative_emb is not None:
        negative_logits = logit_scale * (image_emb @ negative_emb.T).astype(jnp.float32)  # (B images, B negatives)
        valid = jnp.ones(logits.shape[0], bool) if negative_valid is None else negative_valid
        text_logits = jnp.concatenate([logits, jnp.where(valid[None, :], negative_logits, -jnp.inf)], axis=1)
        own = jnp.diagonal(negative_logits)
        extra["hard_negative_acc"] = jnp.sum((jnp.diagonal(logits) > own) * valid) / jnp.maximum(jnp.sum(valid), 1)
    log_p_text = jax.nn.log_softmax(text_logits, axis=1)  # each image over the captions (and negatives)
    log_p_image = jax.nn.log_softmax(logits, axis=0)  # each caption over the images
    image_to_text = -jnp.mean(log_p_text[labels, labels])
    text_to_image = -jnp.mean(log_p_image[labels, labels])
    loss = 0.5 * (image_to_text + text_to_image)
    return loss, {"image_to_text_loss": image_to_text, "text_to_image_loss": text_to_image,
                  "image_to_text_acc": jnp.mean(jnp.argmax(logits, axis=1) == labels),
                  "text_to_image_acc": jnp.mean(jnp.argmax(logits, axis=0) == labels),
                  "logit_scale": logit_scale, **extra}


def count_params(config: CLIPConfig) -> int:
    """Parameters of the dual encoder, computed abstractly (nothing allocated)."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
