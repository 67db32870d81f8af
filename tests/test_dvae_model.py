"""The dVAE model, its loss terms and schedules (the reference comparison lives in test_convert_dvae.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax.config import DVAETrainConfig
from dalle_jax.data import shapes
from dalle_jax.models import dvae as dvae_model
from dalle_jax.models.dvae import DVAE, Decoder, DVAEConfig, Encoder, count_params, map_pixels, unmap_pixels
from dalle_jax.models.init import build_pooled

TINY = DVAEConfig(vocab_size=64, n_hid=16, n_init=8, group_count=3, blocks_per_group=1)


def _model(config=TINY, seed=0):
    with nnx.use_eager_sharding(False):
        return build_pooled(lambda: DVAE(config, rngs=nnx.Rngs(seed)), jax.random.key(seed))


def test_default_architecture_has_the_released_parameter_counts():
    with nnx.use_eager_sharding(False):
        encoder = nnx.eval_shape(lambda: Encoder(DVAEConfig(), rngs=nnx.Rngs(0)))
        decoder = nnx.eval_shape(lambda: Decoder(DVAEConfig(), rngs=nnx.Rngs(0)))
    assert count_params(encoder) == 53_786_240
    assert count_params(decoder) == 43_829_766


def test_shapes_and_token_lookup_equals_one_hot_conv():
    rng = np.random.default_rng()
    model = _model(seed=int(rng.integers(1 << 30)))
    images = jnp.asarray(rng.uniform(size=(2, 32, 32, 3)), jnp.float32)

    @nnx.jit
    def run(model, images):
        tokens = model.encode(images)
        return (model.encoder(map_pixels(images)), tokens, model.decoder.decode_tokens(tokens),
                model.decoder(jax.nn.one_hot(tokens, 64)), model.decode(tokens))

    logits, tokens, via_lookup, via_conv, decoded = run(model, images)
    assert logits.shape == (2, 8, 8, 64) and logits.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), -1))
    assert via_lookup.shape == (2, 32, 32, 6)
    np.testing.assert_allclose(np.asarray(via_lookup), np.asarray(via_conv), rtol=1e-5, atol=1e-5)
    assert float(decoded.min()) >= 0 and float(decoded.max()) <= 1


def test_pooling_option_changes_the_encoder():
    rng = np.random.default_rng()
    images = jnp.asarray(rng.uniform(size=(1, 16, 16, 3)), jnp.float32)
    max_model = _model(TINY)
    avg_model = _model(DVAEConfig(**{**TINY.__dict__, "pooling": "avg"}))
    encode = nnx.jit(lambda model, x: model.encoder(x))
    a, b = encode(max_model, images), encode(avg_model, images)  # same seed: same weights
    assert not np.allclose(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="pooling"):
        DVAEConfig(pooling="min")
    with pytest.raises(ValueError, match="not divisible by the dVAE's downsampling factor 4"):
        TINY.grid_size(30)


def test_pixel_mapping_round_trips():
    x = jnp.asarray(np.random.default_rng().uniform(size=(3, 5)), jnp.float32)
    mapped = map_pixels(x)
    assert float(mapped.min()) >= 0.1 - 1e-6 and float(mapped.max()) <= 0.9 + 1e-6
    np.testing.assert_allclose(np.asarray(unmap_pixels(mapped)), np.asarray(x), atol=1e-6)


def test_logit_laplace_density_integrates_to_one():
    from dalle_jax.train.dvae import logit_laplace_nll

    rng = np.random.default_rng()
    mu, log_b = rng.normal(size=2) * np.array([1.0, 0.3])
    x = np.linspace(1e-6, 1 - 1e-6, 400_001)
    out = np.zeros(x.shape + (6,), np.float64)
    out[:, :3], out[:, 3:] = mu, log_b
    nll = np.asarray(jax.jit(logit_laplace_nll)(jnp.asarray(np.repeat(x[:, None], 3, 1), jnp.float32),
                                                jnp.asarray(out, jnp.float32)))[:, 0].astype(np.float64)
    density = np.exp(-nll)
    assert abs(np.trapezoid(density, x) - 1.0) < 1e-3
    # and it is the closed form at one point
    i = 123_456
    logit = np.log(x[i] / (1 - x[i]))
    b = np.exp(log_b)
    assert nll[i] == pytest.approx(np.abs(logit - mu) / b + np.log(2 * b * x[i] * (1 - x[i])), rel=1e-4, abs=1e-4)


def test_schedules_follow_the_paper():
    from dalle_jax.train.dvae import kl_weight_at, temperature_at
    from dalle_jax.train.optim import learning_rate_schedule

    cfg = DVAETrainConfig()
    at = lambda f, s: float(f(jnp.asarray(s), cfg))
    assert at(kl_weight_at, 0) == 0 and at(kl_weight_at, 5000) == pytest.approx(6.6)
    assert at(kl_weight_at, 2500) == pytest.approx(3.3, rel=1e-5) and at(kl_weight_at, 10**6) == pytest.approx(6.6)
    assert at(temperature_at, 0) == pytest.approx(1.0) and at(temperature_at, 150_000) == pytest.approx(1 / 16)
    assert at(temperature_at, 75_000) == pytest.approx((1 + 1 / 16) / 2, rel=1e-5)
    lr = learning_rate_schedule(cfg)
    assert float(lr(0)) == pytest.approx(1e-4) and float(lr(1_200_000)) == pytest.approx(1.25e-6, rel=1e-4)
    linear = DVAETrainConfig(temperature_schedule="linear")
    assert float(temperature_at(jnp.asarray(37_500), linear)) == pytest.approx(1 - 0.25 * (1 - 1 / 16), rel=1e-5)
    short = cfg.scaled_to(12_000)
    assert (short.kl_warmup_steps, short.temperature_steps, short.lr_decay_steps) == (50, 1500, 12_000)


def test_codebook_usage():
    from dalle_jax.train.dvae import codebook_usage

    k = 16
    uniform = codebook_usage(np.tile(np.arange(k), 10), k)
    assert uniform["codebook_perplexity"] == pytest.approx(k) and uniform["codebook_used"] == 1.0
    tokens = np.random.default_rng().integers(0, 4, size=1000)
    counts = np.bincount(tokens, minlength=k) / 1000
    expected = np.exp(-sum(p * np.log(p) for p in counts if p > 0))
    usage = codebook_usage(tokens, k)
    assert usage["codebook_perplexity"] == pytest.approx(expected) and usage["codebook_used"] == 4 / k


def test_pooled_init_draws_each_conv_at_its_fan_in_scale():
    model = _model(DVAEConfig(vocab_size=512, n_hid=64, n_init=32, group_count=2, blocks_per_group=1),
                   seed=int(np.random.default_rng().integers(1 << 30)))
    convs = [model.encoder.input, model.encoder.output, model.decoder.input,
             *model.decoder.groups[0].blocks[0].res_path]
    for conv in convs:
        w = np.asarray(conv.w[...])
        k, _, n_in, _ = w.shape
        assert abs(w.mean()) < 4 * (1 / np.sqrt(n_in * k * k)) / np.sqrt(w.size)
        assert w.std() == pytest.approx(1 / np.sqrt(n_in * k * k), rel=0.1)
        np.testing.assert_array_equal(np.asarray(conv.b[...]), 0)
    # each parameter gets its own slice of the pool: standardised draws differ between parameters
    standardised = [np.asarray(c.w[...]).ravel()[:64] / np.asarray(c.w[...]).std() for c in convs]
    assert all(not np.allclose(a, b) for i, a in enumerate(standardised) for b in standardised[i + 1:])


def test_distance_logits_pick_the_nearest_code_vector():
    import dataclasses

    rng = np.random.default_rng()
    config = dataclasses.replace(TINY, logits="distance", codebook_init_std=1.0)
    model = _model(config, seed=int(rng.integers(1 << 30)))
    images = jnp.asarray(rng.uniform(size=(2, 16, 16, 3)), jnp.float32)

    @nnx.jit
    def run(model, images):  # the encoder's features before its output layer, and its logits
        x = model.encoder.input(map_pixels(images))
        for g, group in enumerate(model.encoder.groups):
            x = group(x)
            if g < len(model.encoder.groups) - 1:
                x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return jax.nn.relu(x), model.encoder(map_pixels(images))

    features, logits = (np.asarray(a, np.float64) for a in run(model, images))
    codes = np.asarray(model.encoder.output.w[...][0, 0], np.float64)  # (C, K)
    distances = ((features[..., :, None] - codes[None, None, None]) ** 2).sum(-2)  # (B, h, w, K)
    # logits = -distance + ||f||^2: equal softmax, equal argmax (nearest code), equal KL
    np.testing.assert_allclose(logits + distances, np.broadcast_to((features ** 2).sum(-1, keepdims=True),
                                                                   logits.shape), rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(model.encode(images)), distances.argmin(-1))
    # codebook_init_std sets the decoder's code embeddings (released: 1/sqrt(vocab))
    assert abs(float(np.std(np.asarray(model.decoder.input.w[...]))) - 1.0) < 0.1
    released = _model(TINY)
    assert abs(float(np.std(np.asarray(released.decoder.input.w[...]))) - 1 / np.sqrt(64)) < 0.02
    with pytest.raises(ValueError, match="dvae.logits"):
        DVAEConfig(logits="cosine")


@pytest.mark.parametrize("logits", ["distance", "linear"])
def test_product_codes_score_and_embed_as_sums_of_their_tables(logits):
    """dvae.factor_codes = 8 over 64 codes: code a * 8 + b scores table 1's logit of a on the first half of the
    features plus table 2's of b on the second half (float64 reference), and decodes from the sum of the two
    tables' rows; the one-hot path and the token lookup agree."""
    rng = np.random.default_rng()
    config = DVAEConfig(**{**TINY.__dict__, "factor_codes": 8, "logits": logits})
    model = _model(config, seed=int(rng.integers(1 << 30)))
    images = jnp.asarray(rng.uniform(size=(2, 16, 16, 3)), jnp.float32)
    features = np.asarray(model.encoder.features(map_pixels(images)), np.float64)
    half = features.shape[-1] // 2

    def table(conv, f):
        w = np.asarray(conv.w[...][0, 0], np.float64)
        return 2 * f @ w - np.sum(w**2, axis=0) if logits == "distance" else f @ w + np.asarray(conv.b[...])

    first = table(model.encoder.output, features[..., :half])
    second = table(model.encoder.output_second, features[..., half:])
    want = (first[..., :, None] + second[..., None, :]).reshape(*first.shape[:-1], 64)
    got = np.asarray(model.encoder(map_pixels(images)), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))

    rows, bias = model.decoder.code_embeddings()
    w1, w2 = np.asarray(model.decoder.input.w[...][0, 0]), np.asarray(model.decoder.input_second.w[...][0, 0])
    codes = rng.integers(0, 64, 10)
    np.testing.assert_allclose(np.asarray(rows)[codes], w1[codes // 8] + w2[codes % 8], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(bias), np.asarray(model.decoder.input.b[...])
                               + np.asarray(model.decoder.input_second.b[...]), rtol=1e-6)
    tokens = model.encode(images)
    via_lookup = model.decoder.decode_tokens(tokens)
    via_one_hot = model.decoder(jax.nn.one_hot(tokens, 64))
    np.testing.assert_allclose(np.asarray(via_lookup), np.asarray(via_one_hot), rtol=1e-5, atol=1e-5)


def test_product_codes_must_split_the_vocabulary():
    assert DVAEConfig(vocab_size=512, factor_codes=16).tables == (16, 32)
    assert DVAEConfig(vocab_size=512).tables == (512,)
    for bad in (5, 1, 512):
        with pytest.raises(ValueError, match="factor_codes"):
            DVAEConfig(vocab_size=512, factor_codes=bad)


def test_colour_free_image_is_the_objects_coverage_in_every_colour():
    """dvae.factor_inputs=colour_shape's shape input, on the shapes renderer: one object drawn in each of the eight
    colours gives one image (up to the renderer's uint8 rounding), equal to the object's anti-aliased coverage in
    the patches it shares with the background and 0 in the patches it fills or misses."""
    rng = np.random.default_rng()
    patch, size = 4, 32
    shape = str(rng.choice(shapes.SHAPES))
    x0, y0 = (int(v) for v in rng.integers(0, size - 14, 2))
    images = np.stack([shapes.render_objects([{"color": c, "shape": shape, "box": [x0, y0, x0 + 14, y0 + 14]}], size)
                       for c in shapes.COLORS])
    free = np.asarray(dvae_model.colour_free_image(map_pixels(jnp.asarray(images, jnp.float32) / 255.0), patch))[..., 0]
    coverage = np.zeros((size, size))
    coverage[y0:y0 + 14, x0:x0 + 14] = shapes.shape_coverage(shape, 14)
    by_patch = coverage.reshape(size // patch, patch, size // patch, patch)
    shared = (by_patch.min(axis=(1, 3)) < 1 - 1e-3) & (by_patch.max(axis=(1, 3)) > 1e-3)  # object and background
    mixed = np.repeat(np.repeat(shared, patch, 0), patch, 1)
    for image in free:
        np.testing.assert_allclose(image, free[0], atol=0.02)
        np.testing.assert_allclose(image[~mixed], 0.0, atol=1e-6)
    # The patch's lightest and darkest pixels set the scale: in a patch holding pure background and a fully covered
    # pixel, the image is the coverage.
    both = (by_patch.max(axis=(1, 3)) > 1 - 1e-3) & (by_patch.min(axis=(1, 3)) < 1e-3)
    full = np.repeat(np.repeat(both, patch, 0), patch, 1)
    assert full.any()
    np.testing.assert_allclose(free[:, full], np.broadcast_to(coverage[full], free[:, full].shape), atol=0.02)


def test_colour_shape_codes_read_colour_and_shape_apart():
    """dvae.factor_inputs=colour_shape: the logits are pair sums of the colour table's (a 1x1 layer, ReLU and
    distance logits on each patch's per-channel min and max; float64 reference) and the shape table's (the trunk on
    the colour-free image). Recolouring an object leaves the shape table's logits unchanged; shuffling the pixels
    inside every patch leaves the colour table's unchanged."""
    rng = np.random.default_rng()
    config = DVAEConfig(**{**TINY.__dict__, "factor_codes": 8, "logits": "distance", "factor_inputs": "colour_shape"})
    model = _model(config, seed=int(rng.integers(1 << 30)))
    patch = config.downsample
    images = map_pixels(jnp.asarray(rng.uniform(size=(2, 16, 16, 3)), jnp.float32))
    x = np.asarray(images, np.float64).reshape(2, 4, patch, 4, patch, 3)
    stats = np.concatenate([x.min(axis=(2, 4)), x.max(axis=(2, 4))], axis=-1)  # (2, 4, 4, 6)
    hidden = np.maximum(stats @ np.asarray(model.encoder.colour.w[...][0, 0], np.float64)
                        + np.asarray(model.encoder.colour.b[...], np.float64), 0)
    codes = np.asarray(model.encoder.output.w[...][0, 0], np.float64)
    want_colour = 2 * hidden @ codes - np.sum(codes**2, axis=0)
    colour, trunk = model.encoder.table_features(images)
    np.testing.assert_allclose(np.asarray(colour, np.float64), hidden, rtol=1e-4, atol=1e-5)
    free = dvae_model.colour_free_image(images, patch)
    np.testing.assert_allclose(np.asarray(trunk), np.asarray(model.encoder.features(free)))
    logits = np.asarray(model.encoder(images), np.float64)
    first = logits.reshape(*logits.shape[:-1], 8, 8)[..., :, 0] - logits.reshape(*logits.shape[:-1], 8, 8)[..., 0, 0:1]
    np.testing.assert_allclose(first, want_colour - want_colour[..., :1], rtol=1e-4, atol=1e-4)

    box = [4, 4, 14, 14]
    red, blue = (shapes.render_objects([{"color": c, "shape": "triangle", "box": box}], 16) for c in ("red", "blue"))
    pair = map_pixels(jnp.asarray(np.stack([red, blue]), jnp.float32) / 255.0)
    shape_logits = np.asarray(model.encoder(pair)).reshape(2, 4, 4, 8, 8)[..., 0, :]  # table 2 at colour entry 0
    np.testing.assert_allclose(shape_logits[0] - shape_logits[0, ..., :1], shape_logits[1] - shape_logits[1, ..., :1],
                               atol=0.005 * np.abs(shape_logits).max())
    perm = rng.permutation(patch * patch)
    blocks = np.asarray(images).reshape(2, 4, patch, 4, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 4, -1, 3)
    shuffled = blocks[:, :, :, perm].reshape(2, 4, 4, patch, patch, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 16, 3)
    colour_shuffled, _ = model.encoder.table_features(jnp.asarray(shuffled))
    np.testing.assert_array_equal(np.asarray(colour_shuffled), np.asarray(colour))


def test_colour_shape_inputs_need_product_codes():
    with pytest.raises(ValueError, match="set dvae.factor_codes"):
        DVAEConfig(vocab_size=64, factor_inputs="colour_shape")
    with pytest.raises(ValueError, match="factor_inputs"):
        DVAEConfig(vocab_size=64, factor_codes=8, factor_inputs="colour")
