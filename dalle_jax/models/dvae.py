"""The discrete VAE of DALL·E, as OpenAI released it, in Flax NNX (NHWC).

Encoder: 7x7 conv -> G groups of B bottleneck blocks (width n_hid * 2^g, max-pool x2 after every group but the
last) -> relu -> 1x1 conv to `vocab_size` logits. Decoder: 1x1 conv from (relaxed) one-hot codes -> G groups
(width n_hid * 2^(G-1-g), nearest upsample x2 after every group but the last) -> relu -> 1x1 conv to 6
channels: the logit-Laplace mu (0..2) and ln b (3..5). Residual blocks compute
`id_path(x) + post_gain * res_path(x)` with post_gain = 1 / (G*B)^2; no normalisation anywhere.

With the defaults (n_hid 256, 4 groups x 2 blocks, vocab 8192) the parameter tree matches the released
`encoder.pkl` / `decoder.pkl` one to one (see dalle_jax/convert/openai_dvae.py for the name mapping):
encoder 53,786,240 parameters, decoder 43,829,766.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from dalle_jax.errors import ConfigError
from dalle_jax.models.init import standard_normal
from dalle_jax.sharding import constrain

LOGIT_LAPLACE_EPS = 0.1
FACTOR_INPUTS = ("channels", "colour_shape")
# `colour_free_image` divides by a patch's range but by at least this (in map_pixels units, 1/4 of the full range):
# an anti-aliased sliver of object in an otherwise empty patch stays faint instead of being stretched to 1.
CONTRAST_FLOOR = 0.25 * (1 - 2 * LOGIT_LAPLACE_EPS)
ACTIVATION_AXES = ("batch", "height", "width", None)  # NHWC


@dataclasses.dataclass(frozen=True)
class DVAEConfig:
    """Architecture. Defaults are the released model; small presets shrink width, depth and vocab."""

    vocab_size: int = 8192
    n_hid: int = 256
    n_init: int = 128  # decoder input width
    group_count: int = 4  # downsampling factor 2^(group_count - 1): 4 groups -> 256 px to 32x32 tokens
    blocks_per_group: int = 2
    input_channels: int = 3
    # "max" is the paper's (reported to help); "avg" for the ablation.
    pooling: str = "max"
    compute_dtype: str = "float32"
    # Deviations for short runs on flat synthetic images (the released model is the default; see
    # README "Stage 1" for the measurements). "distance" logits are -||f - e_c||^2 (up to a per-token
    # constant) with the output conv's weight columns as code vectors e_c: a code can no longer win every token
    # through the shared positive ReLU features (at init the release's linear logits pick ~13 codes for all
    # 4096 tokens of a batch, and short runs collapse onto 1-3 codes).
    logits: str = "linear"
    # Std of the decoder's 1x1 input conv (the code embeddings); 0 = the release's 1/sqrt(vocab). At 1/sqrt(512)
    # one-hot codes barely differ at the decoder's input, so a short run cannot tell them apart.
    codebook_init_std: float = 0.0
    # Product codes (not in the paper; issue 17): 0 = one table of `vocab_size` codes, the release. A > 0: code
    # c is the pair (c // (vocab_size / A), c % (vocab_size / A)) of a code from a table of A and one from a table
    # of vocab_size / A. Each table quantises its half of the encoder's feature channels (product quantisation),
    # so a code's logit and its decoder embedding are sums of the two tables' entries. With 4 px tokens a code
    # of one table holds an object's colour and local shape together, and a held-out colour/shape pair needs
    # codes no training image uses; with two tables the pair can be a combination of entries that training did
    # use, if the tables split along colour and shape (measured in experiments/composition_tokens.py).
    factor_codes: int = 0
    # What each product-code table reads (issue 17; factor_codes > 0 only). "channels": each table quantises half
    # of the encoder's feature channels, an unsupervised split (measured in experiments/analysis/code_tables.py:
    # colour goes mostly to one table, shape to both). "colour_shape" forces the split, for flat-coloured objects
    # on a light background such as the shapes dataset draws: the first table (factor_codes entries) reads only
    # each token's patch colour range (per channel the min and max over its f x f pixels, through a 1x1 layer),
    # so it cannot see shape within the patch; the second reads the encoder run on a colour-free image (each
    # pixel's darkness below its patch's lightest value over the patch's range, `colour_free_image`), so it cannot
    # see colour. A held-out colour/shape pair is then a colour entry and a shape entry that training used.
    factor_inputs: str = "channels"

    def __post_init__(self):
        if self.pooling not in ("max", "avg"):
            raise ConfigError(f"dvae.pooling='{self.pooling}': choose 'max' or 'avg'")
        if self.logits not in ("linear", "distance"):
            raise ConfigError(f"dvae.logits='{self.logits}': choose 'linear' (released) or 'distance'")
        if self.codebook_init_std < 0:
            raise ConfigError(f"dvae.codebook_init_std={self.codebook_init_std} must be >= 0 (0 = released init)")
        if self.group_count < 1 or self.blocks_per_group < 1:
            raise ConfigError("dvae.group_count and dvae.blocks_per_group must be >= 1")
        if self.n_hid % 4 or self.n_init < 1:
            raise ConfigError(f"dvae.n_hid={self.n_hid} must be a multiple of 4 (blocks use n_out // 4)")
        if self.factor_codes and (self.factor_codes < 2 or self.vocab_size % self.factor_codes
                                  or self.vocab_size // self.factor_codes < 2):
            raise ConfigError(f"dvae.factor_codes={self.factor_codes} must divide dvae.vocab_size="
                              f"{self.vocab_size} into two tables of >= 2 codes each (0 = one table)")
        if self.factor_inputs not in FACTOR_INPUTS:
            raise ConfigError(f"dvae.factor_inputs='{self.factor_inputs}': choose one of {', '.join(FACTOR_INPUTS)}")
        if self.factor_inputs != "channels" and not self.factor_codes:
            raise ConfigError(f"dvae.factor_inputs='{self.factor_inputs}' splits product codes: set dvae.factor_codes")

    @property
    def tables(self) -> tuple[int, ...]:
        """Codes per table: (vocab_size,) for one table, (A, vocab_size / A) for product codes."""
        if self.factor_codes:
            return (self.factor_codes, self.vocab_size // self.factor_codes)
        return (self.vocab_size,)

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    def grid_size(self, image_size: int) -> int:
        if image_size % self.downsample:
            raise ConfigError(f"image size {image_size} is not divisible by the dVAE's downsampling factor "
                             f"{self.downsample} (2^(group_count-1))")
        return image_size // self.downsample


def pair_sums(first: jax.Array, second: jax.Array, axis: int = -1) -> jax.Array:
    """The sums of every pair of two tables' entries along `axis`: (.., A, ..) and (.., B, ..) -> (.., A * B, ..),
    entry a * B + b = first[a] + second[b] — the code ids of product codes (`DVAEConfig.factor_codes`)."""
    first, second = jnp.moveaxis(first, axis, -1), jnp.moveaxis(second, axis, -1)
    pairs = (first[..., :, None] + second[..., None, :]).reshape(*first.shape[:-1], -1)
    return jnp.moveaxis(pairs, -1, axis)


def patch_colour_range(x: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/patch, W/patch, 2C): per channel the min (first C) and the max over each patch."""
    return jnp.concatenate([-_max_pool(-x, patch), _max_pool(x, patch)], axis=-1)


def colour_free_image(x: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, H, W, 1): per pixel the largest over channels of (the patch's max - x) / max(the patch's
    range, CONTRAST_FLOOR). A flat-coloured object on a light background gives the same image in every colour:
    its coverage of each pixel in a patch it shares with the background, 0 in patches it fills or misses."""
    low, high = jnp.split(patch_colour_range(x, patch), 2, axis=-1)
    low, high = (jnp.repeat(jnp.repeat(v, patch, axis=1), patch, axis=2) for v in (low, high))
    return jnp.max((high - x) / jnp.maximum(high - low, CONTRAST_FLOOR), axis=-1, keepdims=True)


def map_pixels(x: jax.Array) -> jax.Array:
    """[0, 1] -> [eps, 1 - eps], the range the logit-Laplace likelihood lives on."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


def unmap_pixels(x: jax.Array) -> jax.Array:
    return jnp.clip((x - LOGIT_LAPLACE_EPS) / (1 - 2 * LOGIT_LAPLACE_EPS), 0, 1)


class Conv(nnx.Module):
    """Conv2d as in the release: weight ~ N(0, 1/sqrt(in * k^2)), bias 0, stride 1, 'same' padding.

    Weights are HWIO (k, k, in, out); the released OIHW tensors are transposed on import.
    """

    def __init__(self, n_in: int, n_out: int, kernel: int, *, rngs: nnx.Rngs, dtype: str = "float32",
                 std: float = 0.0):
        if kernel % 2 != 1:
            raise ValueError(f"kernel size {kernel} must be odd")
        std = std or 1.0 / math.sqrt(n_in * kernel**2)
        self.w = nnx.Param(std * standard_normal(rngs, (kernel, kernel, n_in, n_out)),
                           out_sharding=("height", "width", "conv_in", "conv_out"))
        self.b = nnx.Param(jnp.zeros((n_out,), jnp.float32), out_sharding=("conv_out",))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:  # (B, H, W, in) -> (B, H, W, out)
        dtype = jnp.dtype(self.dtype)
        w = self.w[...].astype(dtype)
        if w.shape[0] == 1:
            # A 1x1 conv is a matmul; XLA:CPU runs it ~3x faster as one (the 2048->8192 output conv: 22 vs
            # 63 GFLOP/s), with the same result. Equality with the reference is tested in test_convert_dvae.
            y = jnp.einsum("bhwc,co->bhwo", x.astype(dtype), w[0, 0], preferred_element_type=jnp.float32)
        else:
            y = jax.lax.conv_general_dilated(
                x.astype(dtype), w, window_strides=(1, 1), padding="SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"), preferred_element_type=jnp.float32)
        return y + self.b[...]


class Block(nnx.Module):
    """Bottleneck residual block; encoder kernels (3, 3, 3, 1), decoder kernels (1, 3, 3, 3)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, ...], *, rngs: nnx.Rngs,
                 dtype: str):
        n_hid = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path = Conv(n_in, n_out, 1, rngs=rngs, dtype=dtype) if n_in != n_out else None
        widths = (n_in, n_hid, n_hid, n_hid, n_out)
        self.res_path = nnx.List([Conv(widths[j], widths[j + 1], k, rngs=rngs, dtype=dtype)
                                  for j, k in enumerate(kernels)])

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        for conv in self.res_path:
            h = conv(jax.nn.relu(h))
        identity = x if self.id_path is None else self.id_path(x)
        return identity + self.post_gain * h


class Group(nnx.Module):
    def __init__(self, n_in: int, n_out: int, config: DVAEConfig, kernels: tuple[int, ...], *, rngs: nnx.Rngs):
        n_layers = config.group_count * config.blocks_per_group
        self.blocks = nnx.List([
            Block(n_in if i == 0 else n_out, n_out, n_layers, kernels, rngs=rngs, dtype=config.compute_dtype)
            for i in range(config.blocks_per_group)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            # Activations stay batch-sharded: without this XLA may follow the FSDP-sharded conv_out of the
            # weights into the channel dimension and re-gather around every conv.
            x = constrain(block(x), ACTIVATION_AXES)
        return x


class Encoder(nnx.Module):
    """Images (B, H, W, 3) in [0, 1] (already `map_pixels`-ed) -> logits (B, H/f, W/f, vocab) in fp32."""

    def __init__(self, config: DVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        widths = [config.n_hid * 2**g for g in range(config.group_count)]
        colour_shape = config.factor_inputs == "colour_shape"
        in_channels = 1 if colour_shape else config.input_channels  # colour_shape: the trunk sees no colour
        self.input = Conv(in_channels, config.n_hid, 7, rngs=rngs, dtype=config.compute_dtype)
        self.groups = nnx.List([
            Group(config.n_hid if g == 0 else widths[g - 1], widths[g], config, (3, 3, 3, 1), rngs=rngs)
            for g in range(config.group_count)])
        # The output conv stays fp32, as in the release: logits feed argmax and the KL. Product codes: one conv
        # per table, each reading its features (`table_features`).
        tables = config.tables
        width = widths[-1] // len(tables)
        if colour_shape:  # the colour table's features: a 1x1 layer on each patch's colour range
            self.colour = Conv(2 * config.input_channels, width, 1, rngs=rngs, dtype="float32")
        self.output = Conv(width, tables[0], 1, rngs=rngs, dtype="float32")
        if len(tables) == 2:
            self.output_second = Conv(widths[-1] if colour_shape else width, tables[1], 1, rngs=rngs,
                                      dtype="float32")

    def table_features(self, x: jax.Array) -> tuple[jax.Array, ...]:
        """The ReLU features each code table's output conv reads, (B, h, w, C_t) per table."""
        if not self.config.factor_codes:
            return (self.features(x),)
        if self.config.factor_inputs == "colour_shape":
            patch = self.config.downsample
            colour = jax.nn.relu(self.colour(patch_colour_range(x, patch)))
            return colour, self.features(colour_free_image(x, patch))
        return tuple(jnp.split(self.features(x), 2, axis=-1))

    def features(self, x: jax.Array) -> jax.Array:
        """The (B, h, w, C) ReLU features of the convolutional trunk."""
        x = self.input(x)
        for g, group in enumerate(self.groups):
            x = group(x)
            if g < len(self.groups) - 1:
                x = _pool(x, self.config.pooling)
        return jax.nn.relu(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        features = self.table_features(x)
        if len(features) == 1:
            return constrain(self._table_logits(self.output, features[0]), ACTIVATION_AXES)
        # Code (a, b) = a * |b table| + b scores the sum of its tables' logits: the posterior is the product of
        # one categorical per table.
        logits = pair_sums(self._table_logits(self.output, features[0]),
                           self._table_logits(self.output_second, features[1]))
        return constrain(logits, ACTIVATION_AXES)

    def _table_logits(self, conv: Conv, features: jax.Array) -> jax.Array:
        if self.config.logits == "distance":  # -||f - e_c||^2 + ||f||^2; the output bias is unused
            codes = conv.w[...][0, 0]  # (C, K): column c is code c's vector
            return 2 * jnp.einsum("bhwc,ck->bhwk", features, codes) - jnp.sum(jnp.square(codes), axis=0)
        return conv(features)


class Decoder(nnx.Module):
    """(Relaxed) one-hot codes (B, h, w, vocab) -> (B, h*f, w*f, 6): logit-Laplace mu (0..2), ln b (3..5)."""

    def __init__(self, config: DVAEConfig, *, rngs: nnx.Rngs, output_channels: int = 3):
        self.config = config
        widths = [config.n_hid * 2 ** (config.group_count - 1 - g) for g in range(config.group_count)]
        tables = config.tables
        self.input = Conv(tables[0], config.n_init, 1, rngs=rngs, dtype="float32", std=config.codebook_init_std)
        if len(tables) == 2:  # product codes: code (a, b) embeds as the sum of its tables' rows
            self.input_second = Conv(tables[1], config.n_init, 1, rngs=rngs, dtype="float32",
                                     std=config.codebook_init_std)
        self.groups = nnx.List([
            Group(config.n_init if g == 0 else widths[g - 1], widths[g], config, (1, 3, 3, 3), rngs=rngs)
            for g in range(config.group_count)])
        self.output = Conv(widths[-1], 2 * output_channels, 1, rngs=rngs, dtype=config.compute_dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        if not self.config.factor_codes:
            return self._body(self.input(z))
        w, b = self.code_embeddings()
        return self._body(jnp.einsum("bhwk,kn->bhwn", z, w, preferred_element_type=jnp.float32) + b)

    def decode_tokens(self, tokens: jax.Array) -> jax.Array:
        """Tokens (B, h, w) int -> decoder output; the 1x1 input conv of a one-hot is a row lookup."""
        w, b = self.code_embeddings()
        return self._body(w[tokens] + b)

    def code_embeddings(self) -> tuple[jax.Array, jax.Array]:
        """(vocab, n_init) rows and the (n_init,) bias the decoder's input conv gives each code's one-hot."""
        w, b = self.input.w[...][0, 0], self.input.b[...]
        if self.config.factor_codes:
            w = pair_sums(w, self.input_second.w[...][0, 0], axis=0)
            b = b + self.input_second.b[...]
        return w, b

    def _body(self, x: jax.Array) -> jax.Array:
        for g, group in enumerate(self.groups):
            x = group(x)
            if g < len(self.groups) - 1:
                x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest upsample x2
        return constrain(self.output(jax.nn.relu(x)).astype(jnp.float32), ACTIVATION_AXES)


class DVAE(nnx.Module):
    def __init__(self, config: DVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)

    def encode(self, images: jax.Array) -> jax.Array:
        """Images (B, H, W, 3) in [0, 1] -> tokens (B, H/f, W/f) int32: argmax of the logits, no noise."""
        return jnp.argmax(self.encoder(map_pixels(images)), axis=-1).astype(jnp.int32)

    def posterior_top_k(self, images: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
        """The encoder's k most likely codes per token and their logits, (B, h, w, k) each, most likely first
        (codes[..., 0] is `encode`'s argmax: ties go to the lower code in both)."""
        logits, codes = jax.lax.top_k(self.encoder(map_pixels(images)).astype(jnp.float32), k)
        return codes.astype(jnp.int32), logits

    def decode(self, tokens: jax.Array) -> jax.Array:
        """Tokens (B, h, w) -> images (B, h*f, w*f, 3) in [0, 1]: sigmoid(mu), unmapped."""
        return reconstruct(self.decoder.decode_tokens(tokens))


def reconstruct(decoder_output: jax.Array) -> jax.Array:
    """Decoder output (..., 6) -> image in [0, 1]: sigmoid of the logit-Laplace mean, unmapped."""
    return unmap_pixels(jax.nn.sigmoid(decoder_output[..., :3]))


def _pool(x: jax.Array, kind: str) -> jax.Array:
    if kind == "max":
        return _max_pool(x, 2)
    window = (1, 2, 2, 1)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, window, "VALID") / 4.0


def _max_pool(x: jax.Array, size: int) -> jax.Array:
    """(B, H, W, C) -> (B, H/size, W/size, C): the max over each size x size patch."""
    window = (1, size, size, 1)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, window, window, "VALID")


def count_params(module: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@functools.lru_cache(maxsize=4)
def abstract_params(config: DVAEConfig) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, pure dict of ShapeDtypeStructs) of a DVAE; tracing it takes a second, so it is cached."""
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: DVAE(config, rngs=nnx.Rngs(0))), nnx.Param)
    return graphdef, state.to_pure_dict()


def dvae_from_params(config: DVAEConfig, params: dict) -> DVAE:
    """A DVAE holding `params` (a pure dict as `nnx.state(dvae, nnx.Param).to_pure_dict()` gives)."""
    graphdef, abstract = abstract_params(config)
    expected = jax.tree.map(lambda a: a.shape, abstract)
    got = jax.tree.map(jnp.shape, dict(params))
    if got != expected:
        raise ConfigError(f"params do not fit the dVAE {config} (tree or shapes differ)")
    return nnx.merge(graphdef, nnx.State(jax.tree.map(jnp.asarray, params)))
