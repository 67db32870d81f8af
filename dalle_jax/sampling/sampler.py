"""Sampling image tokens from the prior: prefill, cached decode, filtering, guidance, image prefix.

Layout (see `dalle_jax.models.masks`): position 0 is the start slot, 1..T the caption ids, T+1+j holds image
token j; position p predicts token p of [text | image]. So one forward over [start | text | prefix of P image
tokens] (positions 0..T+P) gives, at its last position, the logits of image token P; after that, feeding token
j-1 at position T+j gives the logits of token j. `sample_tokens` does exactly that: ONE prefill pass that fills
the explicit KV cache, then `lax.scan` over the remaining positions, one token per step, inside one `jax.jit`.
`sample_reference` draws the same tokens without a cache (a full forward over the whole sequence buffer at every
step); it exists to prove the cache right and as the benchmark's baseline.

Randomness is per sample, not per batch: sample i of a call with `sample_offset=o` uses the key
`fold_in(key(seed), o + i)`, and image token j of it `fold_in(that, j)`. A sample therefore does not depend on
the batch it is drawn in, its position in that batch, the padding added for the mesh or the mesh itself:
drawing 512 candidates as one batch or as 8 calls of 64 with offsets 0, 64, ... gives the same 512.

Filtering (all in fp32, in this order): guidance on the raw logits, then temperature, then top-k, then top-p on
the distribution that top-k left. The paper samples at temperature 1 with no top-k/top-p (the defaults).

Classifier-free guidance ("super conditioning", not in the paper): logits = u + s * (c - u), with c the
caption-conditioned logits and u those of the same image prefix under the all-pad caption — the input the
prior learns unconditionally from when training replaces a caption by the tokenizer's pad ids (caption
dropout, `train/prior.py`). The two branches run as one forward on a doubled batch [cond; uncond]; s = 1 is
plain conditional sampling and skips the unconditional branch; s = 0 samples the unconditional model.

Concept guidance (composable guidance, Liu et al. 2022, "Compositional Visual Generation with Composable
Diffusion Models"; not in the paper): given K concept captions per sample c_1..c_K (e.g. "a blue object" and "a
circle" for "a blue circle"), logits = u + s (c - u) + w * sum_k (c_k - u): a product of experts
p(x | caption)^s * prod_k p(x | c_k)^w / p(x)^(s + K w - 1), so each concept pulls on its own even when the
caption names a pair the prior never saw together. The branches [cond; concept 1; ...; concept K; uncond] run as
one forward on a (K + 2)-fold batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from dalle_jax import sharding
from dalle_jax.errors import ConfigError
from dalle_jax.models.prior import Prior, PriorConfig

CACHE_AXES = ("batch", "heads", "length", "kv")  # each layer's k, v: (B, heads, L, head_dim), head-major
NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """How image tokens are drawn.

    temperature: logits are divided by it (1.0, the paper's setting).
    top_k: keep only the k most likely tokens (0 = off; ties with the k-th are kept).
    top_p: nucleus sampling, keep the smallest set of most likely tokens whose probability reaches top_p
        (1.0 = off; the most likely token is always kept).
    cfg_scale: classifier-free guidance s in u + s (c - u): 1.0 = plain conditional sampling (the paper),
        0.0 = the unconditional model (all-pad caption), > 1 pushes samples towards the caption. Any s != 1
        doubles the batch of every forward pass.
    prefix_rows: image rows given as a prefix and kept (the paper's image-to-image completion gives 15 of
        32 rows); 0 = text only. See `sample_tokens` for how a prefix is passed.
    concept_scale: concept guidance w (see the module doc): each concept caption given to the sampler adds
        w (c_k - u) to the logits; 0.0 = off (the paper). With concepts, every forward pass runs K + 2 batches.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    cfg_scale: float = 1.0
    prefix_rows: int = 0
    concept_scale: float = 0.0

    def __post_init__(self):
        if not self.temperature > 0:
            raise ConfigError(f"sample.temperature={self.temperature} (--temperature) must be > 0")
        if self.top_k < 0:
            raise ConfigError(f"sample.top_k={self.top_k} (--top-k) must be >= 0 (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sample.top_p={self.top_p} (--top-p) must be in (0, 1] (1 = off)")
        if not math.isfinite(self.cfg_scale):
            raise ConfigError(f"sample.cfg_scale={self.cfg_scale} (--cfg-scale) must be finite")
        if self.prefix_rows < 0:
            raise ConfigError(f"sample.prefix_rows={self.prefix_rows} (--prefix-rows) must be >= 0")
        if not math.isfinite(self.concept_scale):
            raise ConfigError(f"sample.concept_scale={self.concept_scale} (--concept-scale) must be finite")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


# ------------------------------------------------------------------------------------------------ filtering

def filter_logits(logits: jax.Array, temperature: float | jax.Array = 1.0, top_k: int = 0,
                  top_p: float | jax.Array | None = None) -> jax.Array:
    """Temperature, top-k and top-p applied to logits (..., V); removed tokens get -inf (fp32 throughout).

    top_k is static (a Python int; 0 = off). top_p may be traced; None or a Python number >= 1 is off. Top-p
    works on the distribution after temperature and top-k: sorted by probability, token i is kept while the
    probability of the tokens before it is still below top_p (so the kept set is the smallest whose mass
    reaches top_p). Ties with the last kept logit are kept.
    """
    logits = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]  # (..., 1)
        logits = jnp.where(logits >= kth, logits, NEG_INF)
    if top_p is not None and not (isinstance(top_p, (int, float)) and top_p >= 1.0):
        ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)  # (..., V) descending
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < jnp.asarray(top_p, jnp.float32)
        keep = keep.at[..., 0].set(True)
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, NEG_INF)
    return logits


def guide(logits: jax.Array, batch: int, scale: float | jax.Array, concept_scale: float | jax.Array = 0.0
          ) -> jax.Array:
    """((K + 2) B, ..., V) logits of the [cond; concept 1; ...; concept K; uncond] batch -> (B, ..., V) guided
    logits u + s (c - u) + w * sum_k (c_k - u), fp32 (K = 0: classifier-free guidance alone)."""
    logits = logits.astype(jnp.float32)
    cond, uncond = logits[:batch], logits[-batch:]
    guided = uncond + jnp.asarray(scale, jnp.float32) * (cond - uncond)
    concepts = logits[batch:-batch]  # (K B, ..., V)
    if concepts.shape[0]:
        per_concept = concepts.reshape(-1, batch, *concepts.shape[1:]) - uncond  # (K, B, ..., V)
        guided = guided + jnp.asarray(concept_scale, jnp.float32) * per_concept.sum(axis=0)
    return guided


def _sample_row_keys(base_key: jax.Array, sample_ids: jax.Array) -> jax.Array:
    """One key per sample from its global index (so it does not depend on the batch it is drawn in)."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(base_key, sample_ids)  # (B,) keys


def _draw(logits: jax.Array, row_keys: jax.Array, token_index: jax.Array | int, scalars: jax.Array,
          top_k: int, nucleus: bool) -> jax.Array:
    """(B, V) guided logits -> (B,) int32 tokens; each row with its own key folded with the token index."""
    filtered = filter_logits(logits, scalars[0], top_k, scalars[1] if nucleus else None)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(row_keys, token_index)
    return jax.vmap(jax.random.categorical)(step_keys, filtered).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------ decoding

# choose(guided logits (B, V), token index j, image buffer (B, N)) -> tokens (B,) int32
Choose = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _branches(text: jax.Array, pad_ids: jax.Array, guided: bool, concepts: jax.Array | None = None) -> jax.Array:
    """(B, T) captions and (B, K, T) concept captions -> ((K + 2) B, T) [captions; concept 1; ...; concept K;
    all-pad captions] when guided, else the captions unchanged."""
    if not guided:
        return text
    parts = [] if concepts is None else [concepts[:, k] for k in range(concepts.shape[1])]
    return jnp.concatenate([text, *parts, jnp.broadcast_to(pad_ids.astype(text.dtype), text.shape)], axis=0)


def _tile(x: jax.Array, branches: int) -> jax.Array:
    """The same image tokens for every branch."""
    return jnp.concatenate([x] * branches, axis=0) if branches > 1 else x


def _constrain_cache(cache: list[dict]) -> list[dict]:
    return jax.tree.map(lambda value: sharding.constrain(value, CACHE_AXES), cache)


def cache_shape(config: PriorConfig, batch: int) -> tuple[int, ...]:
    """Shape of one layer's k and v in the KV cache (a list of per-layer {"k", "v"}): (batch, heads, seq_len,
    head_dim), axes `CACHE_AXES`."""
    return (batch, config.n_heads, config.seq_len, config.head_dim)


def decode_layers(model: Prior) -> list[dict] | None:
    """The per-layer weights a decode loop should take once, before its steps (`Prior.layer_params`), or None
    (each step slices the stack itself).

    XLA:CPU copies a slice of the stacked weights every time a step takes it: a decode step read every weight
    three times (a trace at batch 4: ~40% of the step). Taking them once costs one extra copy of the block
    weights while sampling. TPU and GPU compilers read such slices in place inside the matmul, so there the
    stack is sliced per step and no copy is held.
    """
    return model.layer_params() if jax.default_backend() == "cpu" else None


def prefill(model: Prior, cache: list[dict], text: jax.Array, image: jax.Array, layers: list[dict] | None = None
            ) -> tuple[jax.Array, list[dict]]:
    """The sampler's prefill pass: [start | text | image[:, :-1]] at positions 0.. into an empty cache.

    text (B, T) ids; image (B, P + 1) holds a prefix of P image tokens and one more slot (never read: the
    forward's inputs are shifted by one). Returns the hidden states (B, T + 1 + P, d) and the filled cache; the
    last position predicts image token P. `dalle-jax aot` compiles this same function.
    """
    h, cache = model.forward(Prior.input_tokens(text, image), 0, cache, layers=layers)
    return h, _constrain_cache(cache)


def decode_step(model: Prior, cache: list[dict], token: jax.Array, position: jax.Array | int,
                layers: list[dict] | None = None) -> tuple[jax.Array, list[dict]]:
    """One cached decode step: `token` (B,) fed at `position` -> its hidden state (B, 1, d) and the cache.

    Feeding image token j - 1 at position T + j gives the logits of token j. `dalle-jax aot` compiles this same
    function.
    """
    h, cache = model.forward(token[:, None], position, cache, layers=layers)
    return h, _constrain_cache(cache)


def _decode_cached(model: Prior, cache: list[dict], text: jax.Array, pad_ids: jax.Array, image: jax.Array,
                   scales: jax.Array, static: _Static, choose: Choose, collect: bool,
                   concepts: jax.Array | None = None) -> tuple[jax.Array, list[dict], jax.Array | None]:
    """Prefill once, then one cached forward per image token.

    image (B, N) int32 holds the prefix in [:, :static.prefix_len] (and, for teacher forcing, the tokens `choose`
    reads); scales = (s, w); concepts (B, K, T) or None. Returns the filled image (B, N), the cache, and with
    `collect` the guided logits (B, N, V).
    """
    c = model.config
    t, n, batch = c.text_len, c.image_len, text.shape[0]
    guided, branches, prefix_len = static.guided, static.branches, static.prefix_len

    def logits_of(h: jax.Array) -> jax.Array:  # (B', S, d) -> (B, S, V) fp32
        logits = model.image_logits(h).astype(jnp.float32)
        return guide(logits, batch, scales[0], scales[1]) if guided else logits

    layers = decode_layers(model)
    h, cache = prefill(model, cache, _branches(text, pad_ids, guided, concepts),
                       _tile(image[:, : prefix_len + 1], branches), layers)  # (B', T + 1 + P, d): positions 0..T+P
    first = logits_of(h[:, t:] if collect else h[:, -1:])  # (B, P + 1 | 1, V); the last predicts token P
    token = choose(first[:, -1], jnp.asarray(prefix_len, jnp.int32), image)  # (B,)
    image = image.at[:, prefix_len].set(token)

    def step(carry, j):
        cache, image, token = carry
        h, cache = decode_step(model, cache, _tile(token, branches), t + j, layers)  # token j-1 at position T+j
        logits = logits_of(h)[:, 0]  # (B, V): image token j
        token = choose(logits, j, image)
        image = jax.lax.dynamic_update_slice(image, token[:, None], (0, j))
        return (cache, image, token), (logits if collect else None)

    (cache, image, _), rest = jax.lax.scan(step, (cache, image, token),
                                           jnp.arange(prefix_len + 1, n, dtype=jnp.int32))
    logits = None
    if collect:
        logits = jnp.concatenate([first, jnp.swapaxes(rest, 0, 1)], axis=1)  # (B, N, V)
    return image, cache, logits


def _decode_reference(model: Prior, text: jax.Array, pad_ids: jax.Array, image: jax.Array, scales: jax.Array,
                      static: _Static, choose: Choose, concepts: jax.Array | None = None) -> jax.Array:
    """No cache: at every step a full forward over the whole (B', T + N) sequence buffer.

    Positions after the current one hold placeholder zeros; the masks are causal, so they are never seen (the
    causality tests in test_transformer.py prove that), and the logits at position T + j are those of token j.
    """
    c = model.config
    t, batch = c.text_len, text.shape[0]
    text = _branches(text, pad_ids, static.guided, concepts)

    def step(j, image):
        h, _ = model.forward(Prior.input_tokens(text, _tile(image, static.branches)))  # (B', T + N, d)
        logits = model.image_logits(jax.lax.dynamic_slice_in_dim(h, t + j, 1, axis=1))[:, 0]  # (B', V)
        logits = guide(logits, batch, scales[0], scales[1]) if static.guided else logits.astype(jnp.float32)
        token = choose(logits, j, image)
        return jax.lax.dynamic_update_slice(image, token[:, None], (0, j))

    return jax.lax.fori_loop(static.prefix_len, c.image_len, step, image)


@dataclasses.dataclass(frozen=True)
class _Static:
    """What changes the compiled program (everything else is a traced argument)."""

    top_k: int
    nucleus: bool
    guided: bool
    prefix_len: int
    concepts: int = 0  # K concept captions per sample (guided only)

    @property
    def branches(self) -> int:
        """Batches in every forward pass: [cond; concept 1..K; uncond] when guided, else 1."""
        return self.concepts + 2 if self.guided else 1


def _sampler_choose(row_keys: jax.Array, scalars: jax.Array, static: _Static) -> Choose:
    return lambda logits, j, image: _draw(logits, row_keys, j, scalars, static.top_k, static.nucleus)


@functools.lru_cache(maxsize=64)
def _cached_sampler(graphdef: Any, static: _Static) -> Callable:
    """The jitted cached sampler for one model structure and static setting; jit caches per batch shape."""

    def run(params, cache, text, pad_ids, image, sample_ids, key, scalars, concepts):
        model = nnx.merge(graphdef, nnx.State(params))
        choose = _sampler_choose(_sample_row_keys(key, sample_ids), scalars, static)
        image, cache, _ = _decode_cached(model, cache, text, pad_ids, image, scalars[2:], static, choose,
                                         collect=False, concepts=concepts)
        return sharding.constrain(image, ("batch", None)), cache

    return jax.jit(run, donate_argnames=("cache",))


@functools.lru_cache(maxsize=64)
def _reference_sampler(graphdef: Any, static: _Static) -> Callable:
    def run(params, text, pad_ids, image, sample_ids, key, scalars, concepts):
        model = nnx.merge(graphdef, nnx.State(params))
        choose = _sampler_choose(_sample_row_keys(key, sample_ids), scalars, static)
        return _decode_reference(model, text, pad_ids, image, scalars[2:], static, choose, concepts)

    return jax.jit(run)


@functools.lru_cache(maxsize=16)
def _forced_logits(graphdef: Any, static: _Static) -> Callable:
    def run(params, cache, text, pad_ids, image, scales, concepts):
        model = nnx.merge(graphdef, nnx.State(params))
        choose = lambda logits, j, image: jax.lax.dynamic_index_in_dim(image, j, 1, keepdims=False)
        return _decode_cached(model, cache, text, pad_ids, image, scales, static, choose, collect=True,
                              concepts=concepts)[2]

    return jax.jit(run)


# ------------------------------------------------------------------------------------------------ inputs

def split_model(model: Prior | tuple[Any, Any]) -> tuple[Any, dict]:
    """A Prior, or (graphdef, params) as the trainers keep them (`spec.graphdef`, `state["ema_params"]`)."""
    if isinstance(model, Prior):
        graphdef, params = nnx.split(model, nnx.Param)
    else:
        graphdef, params = model
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return graphdef, params


SERVING_DTYPES = ("float32", "bfloat16")


def check_serving_dtype(dtype: str) -> None:
    if dtype not in SERVING_DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of {', '.join(SERVING_DTYPES)}")


def serving_prior(model: Prior, dtype: str = "bfloat16") -> Prior:
    """The prior for sampling in `dtype`: its blocks' matrices and biases stored in it (a decode step reads every
    weight once, so bf16 halves those bytes), computing in it, and a KV cache in it by default; LayerNorm,
    embeddings, the heads, softmax and logits stay fp32. float32 returns the model unchanged."""
    check_serving_dtype(dtype)
    if dtype == "float32":
        return model
    config = dataclasses.replace(model.config, compute_dtype=dtype)
    with nnx.use_eager_sharding(False):
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: Prior(config, rngs=nnx.Rngs(0))), nnx.Param)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params["layers"] = {name: value.astype(dtype) if name[0] in "wb" else value
                        for name, value in params["layers"].items()}
    return nnx.merge(graphdef, nnx.State(params))


def _config_of(graphdef: Any, params: dict) -> PriorConfig:
    return nnx.merge(graphdef, nnx.State(params)).config


def pad_batch(x: np.ndarray, multiple: int) -> tuple[np.ndarray, int]:
    """Appends copies of the last row so the batch divides `multiple` (the data-parallel size).

    Returns (padded, original size); trim results with `[:size]`. Padded rows are real inputs, so they cost
    compute but never produce NaNs, and with per-sample keys they do not change the other rows' samples.
    """
    x = np.asarray(x)
    size = x.shape[0]
    if size == 0:
        raise ValueError("cannot sample an empty batch")
    extra = -size % multiple
    if extra:
        x = np.concatenate([x, np.repeat(x[-1:], extra, axis=0)], axis=0)
    return x, size


def prefix_tokens(prefix: Any, prefix_rows: int, config: PriorConfig, batch: int) -> np.ndarray:
    """The image prefix as (B, prefix_rows * W) int32, validated.

    `prefix` is (B, R, W) or (B, R * W) image tokens with R >= prefix_rows (e.g. a whole encoded image; its
    first `prefix_rows` rows are used); with prefix_rows = 0 all R given rows are used. None means no prefix
    (then prefix_rows must be 0).
    """
    g = config.grid_size
    if prefix is None:
        if prefix_rows:
            raise ValueError(f"prefix_rows={prefix_rows} needs prefix image tokens (B, rows, {g})")
        return np.zeros((batch, 0), np.int32)
    prefix = np.asarray(prefix)
    if prefix.ndim == 2:
        if prefix.shape[1] % g:
            raise ValueError(f"prefix of shape {prefix.shape}: its {prefix.shape[1]} tokens are not whole rows of "
                             f"the {g}x{g} grid")
        prefix = prefix.reshape(prefix.shape[0], -1, g)
    if prefix.ndim != 3 or prefix.shape[0] != batch or prefix.shape[2] != g:
        raise ValueError(f"prefix of shape {prefix.shape}: expected ({batch}, rows, {g}) or ({batch}, rows * {g})")
    rows = prefix_rows or prefix.shape[1]
    if not 0 <= rows < g:
        raise ValueError(f"prefix_rows={rows} with a {g}x{g} image grid: need 0 <= prefix_rows < {g} so that at "
                         f"least one row is left to sample")
    if prefix.shape[1] < rows:
        raise ValueError(f"prefix_rows={rows} but the prefix has only {prefix.shape[1]} rows")
    prefix = prefix[:, :rows].reshape(batch, rows * g)
    if not np.issubdtype(prefix.dtype, np.integer) or (
            prefix.size and (prefix.min() < 0 or prefix.max() >= config.image_vocab_size)):
        raise ValueError(f"prefix tokens must be integers in [0, {config.image_vocab_size})")
    return prefix.astype(np.int32)


def _check_text(text: np.ndarray, config: PriorConfig) -> np.ndarray:
    text = np.asarray(text)
    if text.ndim != 2 or text.shape[1] != config.text_len or not text.shape[0]:
        raise ValueError(f"text ids of shape {text.shape}: expected (batch, {config.text_len})")
    if text.min() < 0 or text.max() >= config.text_rows:
        raise ValueError(f"text ids must be in [0, {config.text_rows}) (BPE ids and pads)")
    return text.astype(np.int32)


def _check_concepts(concepts: Any, concept_scale: float, batch: int, config: PriorConfig) -> np.ndarray | None:
    """(B, K, T) concept caption ids, validated; None when concept guidance is off (w = 0; any concepts ignored)."""
    if concept_scale == 0.0:
        return None
    if concepts is None:
        raise ValueError(f"concept_scale={concept_scale} needs concept captions (B, K, T) to guide with")
    concepts = np.asarray(concepts)
    if concepts.ndim != 3 or concepts.shape[0] != batch or not concepts.shape[1]:
        raise ValueError(f"concept caption ids of shape {concepts.shape}: expected ({batch}, K >= 1, "
                         f"{config.text_len})")
    return _check_text(concepts.reshape(-1, concepts.shape[2]), config).reshape(concepts.shape)


def _pads(pad_ids: Any, config: PriorConfig, needed: bool) -> np.ndarray:
    if pad_ids is None:
        if needed:
            raise ValueError("cfg_scale != 1 or concept guidance needs pad_ids (the tokenizer's `pad_ids()`) for the "
                             "unconditional branch")
        return np.zeros((config.text_len,), np.int32)
    pad_ids = np.asarray(pad_ids, np.int32)
    if pad_ids.shape != (config.text_len,):
        raise ValueError(f"pad_ids of shape {pad_ids.shape}: expected ({config.text_len},)")
    return pad_ids


@functools.lru_cache(maxsize=16)
def _sharded_zeros(shape: tuple[int, ...], dtype: Any, where: NamedSharding) -> Callable[[], jax.Array]:
    """Zeros born sharded (never whole on one device), compiled once per shape and layout."""
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=where)


class _Placement:
    """Puts host arrays on the mesh (batch-sharded or replicated), or does nothing without a mesh."""

    def __init__(self, mesh: Mesh | None, rules: sharding.Rules):
        self.mesh, self.rules = mesh, rules

    def context(self):
        if self.mesh is None:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(sharding.axis_rules(self.rules))
        return stack

    def put(self, x: np.ndarray, batched: bool) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        axes = sharding.batch_axes(x.ndim) if batched else None
        where = sharding.named_sharding(self.mesh, axes, self.rules, x.shape, what="sampler input")
        return jax.make_array_from_callback(x.shape, where, lambda index: x[index])

    def cache(self, config: PriorConfig, batch: int, dtype: Any) -> list[dict]:
        shape = cache_shape(config, batch)
        if self.mesh is None:
            zeros = functools.partial(jnp.zeros, shape, dtype)
        else:
            where = sharding.named_sharding(self.mesh, CACHE_AXES, self.rules, shape, what="KV cache")
            zeros = _sharded_zeros(shape, jnp.dtype(dtype), where)
        return [{"k": zeros(), "v": zeros()} for _ in range(config.n_layers)]

    def get(self, x: jax.Array) -> np.ndarray:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))


def _prepare(model, text, cfg, pad_ids, prefix, mesh, rules, sample_offset, guided, concepts):
    graphdef, params = split_model(model)
    config = _config_of(graphdef, params)
    text = _check_text(text, config)
    batch = text.shape[0]
    concepts = _check_concepts(concepts, cfg.concept_scale, batch, config)
    guided = guided or concepts is not None
    pads = _pads(pad_ids, config, guided)
    prefix = prefix_tokens(prefix, cfg.prefix_rows, config, batch)
    if rules is None and mesh is not None:
        from dalle_jax.config import DEFAULT_RULES

        rules = DEFAULT_RULES
    rules = tuple((name, axes if axes is None or isinstance(axes, str) else tuple(axes)) for name, axes in rules or ())
    multiple = 1 if mesh is None else sharding.data_parallel_size(mesh, rules)
    image = np.zeros((batch, config.image_len), np.int32)
    image[:, : prefix.shape[1]] = prefix
    text, _ = pad_batch(text, multiple)
    image, _ = pad_batch(image, multiple)
    concepts = None if concepts is None else pad_batch(concepts, multiple)[0]
    if np.ndim(sample_offset):  # explicit ids, one per row (rows of different requests batched together)
        ids = np.asarray(sample_offset, np.int64).reshape(-1)
        if ids.shape != (batch,):
            raise ValueError(f"sample_offset has {ids.size} ids for a batch of {batch}")
    else:
        ids = sample_offset + np.arange(batch)
    padding = ids.max() + 1 + np.arange(text.shape[0] - batch)  # rows added for the mesh, trimmed after
    sample_ids = np.concatenate([ids, padding]).astype(np.int32)
    static = _Static(top_k=cfg.top_k, nucleus=cfg.top_p < 1.0, guided=guided, prefix_len=prefix.shape[1],
                     concepts=0 if concepts is None else concepts.shape[1])
    scalars = np.array([cfg.temperature, cfg.top_p, cfg.cfg_scale, cfg.concept_scale], np.float32)
    return (graphdef, params, config, static, _Placement(mesh, rules), batch,
            (text, pads, image, sample_ids, scalars, concepts))


# ------------------------------------------------------------------------------------------------ public API

def sample_tokens(model: Prior | tuple[Any, Any], text: Any, seed: int, cfg: SampleConfig = SampleConfig(), *,
                  pad_ids: Any = None, prefix: Any = None, mesh: Mesh | None = None,
                  rules: sharding.Rules | None = None, sample_offset: int | np.ndarray = 0, cache_dtype: Any = None,
                  concepts: Any = None) -> np.ndarray:
    """Draws image tokens (B, N) int32 for captions `text` (B, T) with the cached sampler.

    Args:
      model: a Prior, or (graphdef, params) from a trainer's state. With a mesh the params must already be
        placed on it (born sharded, `sharding.shard_state`, or restored into a sharded target).
      text: (B, T) caption ids with the tokenizer's per-position pads (`TextTokenizer.encode`).
      seed: sample i is drawn with `fold_in(key(seed), sample_offset + i)`, whatever the batch (see module doc).
      cfg: temperature, top-k, top-p, guidance scale, prefix rows.
      pad_ids: (T,) the tokenizer's `pad_ids()`; the unconditional caption, needed when cfg.cfg_scale != 1.
      prefix: image tokens (B, R, W) or (B, R * W) kept at image positions 0..prefix_rows * W - 1 and returned
        unchanged; the rest is sampled (see `prefix_tokens`).
      mesh, rules: shard the batch over the data-parallel axes (and the KV cache's heads over "tensor") by the
        logical rules (default: the config's DEFAULT_RULES). The batch is padded to a multiple of the
        data-parallel size and trimmed after.
      sample_offset: global index of this call's first sample (for drawing many samples over several calls), or
        a (B,) array of each row's sample index (rows of several prompts drawn in one call, each as if alone).
      cache_dtype: KV-cache dtype; default the model's compute dtype.
      concepts: (B, K, T) ids of K concept captions per sample for concept guidance (cfg.concept_scale != 0;
        ignored at 0), encoded like `text`.

    Returns: (B, N) int32 numpy tokens in raster order (reshape to (B, grid, grid)).

    The compiled program is cached per (model structure, top_k, whether top-p and guidance are on, prefix
    length, number of concepts) and, by jit, per batch shape; temperature, top_p, cfg_scale and concept_scale
    are traced, so sweeping them does not recompile.
    """
    return _sample(model, text, seed, cfg, pad_ids=pad_ids, prefix=prefix, mesh=mesh, rules=rules,
                   sample_offset=sample_offset, cache_dtype=cache_dtype, guided=cfg.guided, concepts=concepts)


def _sample(model, text, seed, cfg, *, pad_ids, prefix, mesh, rules, sample_offset, cache_dtype, guided,
            concepts=None):
    """`sample_tokens` with the batched-guidance switch exposed (tests run it at s = 1)."""
    graphdef, params, config, static, place, batch, host = _prepare(model, text, cfg, pad_ids, prefix, mesh, rules,
                                                                   sample_offset, guided, concepts)
    text_, pads, image, sample_ids, scalars, concepts_ = host
    width = text_.shape[0] * static.branches
    dtype = jnp.dtype(cache_dtype or config.compute_dtype)
    with place.context():
        cache = place.cache(config, width, dtype)
        tokens, _ = _cached_sampler(graphdef, static)(
            params, cache, place.put(text_, True), place.put(pads, False), place.put(image, True),
            place.put(sample_ids, True), jax.random.key(seed), place.put(scalars, False),
            None if concepts_ is None else place.put(concepts_, True))
    return place.get(tokens)[:batch]


def sample_reference(model: Prior | tuple[Any, Any], text: Any, seed: int, cfg: SampleConfig = SampleConfig(), *,
                     pad_ids: Any = None, prefix: Any = None, sample_offset: int = 0, concepts: Any = None
                     ) -> np.ndarray:
    """The same samples as `sample_tokens` (same arguments, keys, filtering, guidance), drawn without a cache.

    Every step runs the full forward over the whole sequence, so it costs O(N) times the cached sampler's
    work: the slow, obviously-correct baseline for tests and benchmarks. Single device.
    """
    graphdef, params, _, static, place, batch, host = _prepare(model, text, cfg, pad_ids, prefix, None, None,
                                                              sample_offset, cfg.guided, concepts)
    text_, pads, image, sample_ids, scalars, concepts_ = host
    tokens = _reference_sampler(graphdef, static)(params, jnp.asarray(text_), jnp.asarray(pads), jnp.asarray(image),
                                                  jnp.asarray(sample_ids), jax.random.key(seed), jnp.asarray(scalars),
                                                  None if concepts_ is None else jnp.asarray(concepts_))
    return place.get(tokens)[:batch]


def cached_logits(model: Prior | tuple[Any, Any], text: Any, image: Any, *, prefix_rows: int = 0,
                  cfg_scale: float = 1.0, pad_ids: Any = None, cache_dtype: Any = None, concepts: Any = None,
                  concept_scale: float = 0.0) -> np.ndarray:
    """Teacher-forced (B, N, V) fp32 image logits through the sampler's own prefill + cached-decode code.

    The first `prefix_rows` rows of `image` (B, N) go into the prefill pass, every later token is fed one
    step at a time exactly as `sample_tokens` feeds its samples; logit j is the (guided, unfiltered)
    prediction of token j (concepts and concept_scale as in `sample_tokens`). Equal to the full forward's
    `image_logits` up to float rounding (tested).
    """
    graphdef, params = split_model(model)
    config = _config_of(graphdef, params)
    text = _check_text(text, config)
    image = np.asarray(image, np.int32).reshape(text.shape[0], config.image_len)
    prefix_len = prefix_tokens(image, prefix_rows, config, text.shape[0]).shape[1] if prefix_rows else 0
    concepts = _check_concepts(concepts, concept_scale, text.shape[0], config)
    guided = cfg_scale != 1.0 or concepts is not None
    pads = _pads(pad_ids, config, guided)
    static = _Static(top_k=0, nucleus=False, guided=guided, prefix_len=prefix_len,
                     concepts=0 if concepts is None else concepts.shape[1])
    cache = _Placement(None, ()).cache(config, text.shape[0] * static.branches,
                                       jnp.dtype(cache_dtype or config.compute_dtype))
    logits = _forced_logits(graphdef, static)(params, cache, jnp.asarray(text), jnp.asarray(pads), jnp.asarray(image),
                                              jnp.asarray([cfg_scale, concept_scale], jnp.float32),
                                              None if concepts is None else jnp.asarray(concepts))
    return np.asarray(logits)
