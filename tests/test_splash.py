"""Splash attention (dalle_jax.models.splash) against the dense reference `attend`, in Pallas interpret mode.

The kernel itself only compiles for TPU; here it runs interpreted on the CPU, which executes the same kernel
body (block skipping, in-tile masks, online softmax, the dq and dkv backward kernels) with XLA:CPU arithmetic.
That it compiles for TPU and appears in the program is checked in tests/test_aot.py.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax import sharding
from dalle_jax.models import splash
from dalle_jax.models.init import build_pooled
from dalle_jax.models.prior import Prior, PriorConfig, attend
from dalle_jax.sharding import MeshConfig
from tests.numerics import assert_same, probe_value_and_grads

# 16 text + 24 x 24 image = 592 positions, padded to 640 = 5 blocks of 128: blocks are skipped, partly shown
# and fully shown, and the last one holds the padding.
PADDED = PriorConfig(text_vocab_size=40, text_len=16, image_vocab_size=24, grid_size=24, d_model=32, n_layers=4,
                     n_heads=2, head_dim=16, conv_kernel=3, attention_impl="splash", splash_interpret=True)
EXACT = dataclasses.replace(PADDED, text_len=64)  # 640 positions: no padding


def _random(shape, rng, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _close(actual, expected, rtol=1e-5):
    # fp32 sums in another order (blockwise online softmax): tolerance relative to the array's scale.
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * float(np.max(np.abs(expected))))


@pytest.mark.parametrize("config", [dataclasses.replace(PADDED, attention="dense"), PADDED, EXACT],
                         ids=["dense-padded", "sparse-padded", "sparse-exact"])
def test_splash_equals_dense_attention_values_and_gradients(config):
    masks, _, types = config.masks()
    rng = np.random.default_rng()
    q, k, v, weights = (_random((2, config.seq_len, 2, 16), rng) for _ in range(4))

    def loss(impl, q, k, v, index):
        out = impl(q, k, v, index)
        return jnp.sum(out * weights), out

    splash_fn = jax.jit(jax.value_and_grad(
        lambda *a: loss(lambda q, k, v, i: splash.splash_attention(q, k, v, i, config), *a), (0, 1, 2), True))
    dense_fn = jax.jit(jax.value_and_grad(
        lambda *a: loss(lambda q, k, v, i: attend(q, k, v, jnp.asarray(masks)[i], 0), *a), (0, 1, 2), True))
    for index in range(len(types)):  # one compiled program: lax.switch picks the kernel by the traced index
        (_, out), grads = splash_fn(q, k, v, index)
        (_, out_ref), grads_ref = dense_fn(q, k, v, index)
        _close(out, out_ref)
        for grad, grad_ref in zip(grads, grads_ref, strict=True):  # dq, dk, dv
            _close(grad, grad_ref)


def test_padded_rows_are_finite_and_invisible():
    length = splash.padded_length(PADDED.seq_len, PADDED.splash_block)
    assert (PADDED.seq_len, length) == (592, 640)
    masks = splash.padded_masks(PADDED, length)
    assert not masks[:, :PADDED.seq_len, PADDED.seq_len:].any()  # real queries never see a padded key
    assert (masks[:, PADDED.seq_len:].sum(axis=2) == 1).all()  # a padded query sees only itself
    rng = np.random.default_rng()
    q, k, v, weights = (_random((2, length, 16), rng) for _ in range(4))
    noise = jnp.zeros_like(q).at[:, PADDED.seq_len:].set(100.0)
    kernel = splash.kernels(PADDED, True)[0]  # the padding is the same for every mask
    out, grads = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(kernel(q, k, v) * weights), (0, 1, 2)))(q, k, v)
    assert all(np.isfinite(x).all() for x in (out, *grads))
    outputs = jax.jit(lambda q, k, v: (kernel(q, k, v), kernel(q + noise, k + noise, v + noise)))(q, k, v)
    np.testing.assert_array_equal(*(o[:, :PADDED.seq_len] for o in outputs))


def test_bfloat16_is_close_to_the_dense_bfloat16_reference():
    masks, _, types = PADDED.masks()
    rng = np.random.default_rng()
    q, k, v = (_random((2, PADDED.seq_len, 2, 16), rng, jnp.bfloat16) for _ in range(3))
    run = jax.jit(lambda q, k, v, i: splash.splash_attention(q, k, v, i, PADDED))
    for index in range(len(types)):
        out = run(q, k, v, index)
        assert out.dtype == jnp.bfloat16
        # attend rounds the probabilities to bf16 before p @ v, the kernel keeps them fp32: a few bf16 ulps apart
        expected = np.asarray(attend(q, k, v, jnp.asarray(masks[index]), 0), np.float32)
        np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=0, atol=3e-2)


# ------------------------------------------------------------------------------------------------ the prior

MODEL = dataclasses.replace(PADDED, grid_size=16, text_len=12)  # 268 positions, 3 blocks; row, column, row, conv


def _split(config, seed):
    return nnx.split(build_pooled(lambda: Prior(config, rngs=nnx.Rngs(0)), jax.random.key(seed)))


def _inputs(config, batch, rng):
    text = jnp.asarray(rng.integers(0, config.text_rows, (batch, config.text_len)), jnp.int32)
    image = jnp.asarray(rng.integers(0, config.image_vocab_size, (batch, config.image_len)), jnp.int32)
    weights = _random((batch, config.image_len, config.image_vocab_size), rng)
    return text, image, weights


def test_prior_with_splash_equals_dense_logits_and_gradients():
    assert MODEL.masks()[2] == ("row", "column", "conv")
    rng = np.random.default_rng()
    inputs = _inputs(MODEL, 2, rng)
    expected = probe_value_and_grads(*_split(dataclasses.replace(MODEL, attention_impl="dense"), 1)[::-1], *inputs)
    assert_same(probe_value_and_grads(*_split(MODEL, 1)[::-1], *inputs), expected)


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 2, 2)])
def test_sharded_splash_equals_single_device_dense(mesh_shape):
    config = dataclasses.replace(MODEL, n_heads=4, n_layers=2)  # row, conv; 2 heads per device at tensor = 2
    mesh = sharding.make_mesh(MeshConfig(ici_parallelism=mesh_shape), jax.devices()[: math.prod(mesh_shape)])
    rules = MeshConfig().rules
    rng = np.random.default_rng()
    graphdef, params = _split(config, 2)
    inputs = _inputs(config, 4, rng)
    expected = probe_value_and_grads(*_split(dataclasses.replace(config, attention_impl="dense"), 2)[::-1], *inputs)
    sharded = sharding.shard_state(params, mesh, rules)
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        placed = [jax.device_put(x, sharding.named_sharding(mesh, sharding.batch_axes(x.ndim), rules))
                  for x in inputs]
        actual = probe_value_and_grads(sharded, graphdef, *placed)
        jaxpr = str(jax.make_jaxpr(lambda p, t, i: nnx.merge(graphdef, p)(t, i))(sharded, *placed[:2]))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr  # the kernel ran per device
    assert_same(actual, expected)


def test_cached_prefill_and_decode_stay_dense():
    # Not interpretable here and not needed: only the full cache-free forward takes the kernel.
    config = dataclasses.replace(MODEL, splash_interpret=False)
    model = build_pooled(lambda: Prior(config, rngs=nnx.Rngs(0)), jax.random.key(0))
    text, image, _ = _inputs(config, 1, np.random.default_rng())
    tokens = model.input_tokens(text, image)
    prefix = config.text_len + 1

    @jax.jit
    def prefill_and_step(tokens):
        hidden, cache = model.forward(tokens[:, :prefix], 0, model.init_cache(1))
        return hidden, model.forward(tokens[:, prefix:prefix + 1], prefix, cache)[0]

    assert all(np.isfinite(x).all() for x in prefill_and_step(tokens))
    with pytest.raises(ValueError, match="splash_interpret=true"):
        model(text, image)  # the full forward on the CPU without interpret mode names the fix


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="prior.splash_block=64 must be a positive multiple of 128"):
        PriorConfig(splash_block=64)
    with pytest.raises(ValueError, match="'splash'"):
        PriorConfig(attention_impl="flash")


# ------------------------------------------------------------------------------------------------ block stats

def _visible(layer_type, config, q, keys):
    """Brute force, from the layout in models/masks.py: may query position q see key positions `keys`?"""
    side, w, r = config.text_len + 1, config.grid_size, config.conv_kernel // 2
    if q < side:
        return keys <= q
    k, m = q - side, keys - side
    image = {"dense": m <= k, "row": (m <= k) & (m >= k - w), "column": (m <= k) & (m % w == k % w),
             "conv": (m <= k) & (np.abs(m // w - k // w) <= r) & (np.abs(m % w - k % w) <= r)}[layer_type]
    return np.where(keys < side, True, image)


@pytest.mark.parametrize("blocks", [(128, 128), (128, 256)])
def test_block_stats_match_a_brute_force_count(blocks):
    config = dataclasses.replace(PADDED, n_layers=6)  # row, column, row, row, row, conv
    block_q, block_kv = blocks
    stats = splash.block_stats(config, block_q, block_kv)
    length, padded = config.seq_len, splash.padded_length(config.seq_len, block_q, block_kv)
    assert padded == (640 if block_kv == 128 else 768)
    schedule = config.masks()[1]
    keys = np.arange(padded)
    totals = {"visible": 0, "blocks": 0}
    for index, layer_type in enumerate(config.masks()[2]):
        full = np.zeros((padded, padded), bool)
        for q in range(length):
            full[q, :length] = _visible(layer_type, config, q, keys[:length])
        visible = int(full.sum())
        full[length:, length:] = np.eye(padded - length, dtype=bool)  # the padded diagonal
        computed = partial = 0
        for i in range(0, padded, block_q):
            for j in range(0, padded, block_kv):
                tile = full[i:i + block_q, j:j + block_kv]
                computed += bool(tile.any())
                partial += bool(tile.any() and not tile.all())
        row = stats[layer_type]
        assert (row["visible"], row["blocks"], row["partial_blocks"]) == (visible, computed, partial)
        assert row["dense_fraction"] == pytest.approx(visible / length**2)
        assert row["causal_fraction"] == pytest.approx(visible / (length * (length + 1) / 2))
        assert row["block_fraction"] == pytest.approx(computed / ((padded // block_q) * (padded // block_kv)))
        layers = int((schedule == index).sum())
        totals["visible"] += layers * visible
        totals["blocks"] += layers * computed
    assert {k: stats["schedule"][k] for k in totals} == totals
    if block_q == block_kv:  # the kernel's own block map computes exactly these tiles
        assert stats["row"]["blocks"] < stats["column"]["blocks"]  # rows skip old image rows; columns see them
        for layer_type, kernel in zip(config.masks()[2], splash.kernels(config, True), strict=True):
            assert int(np.count_nonzero(kernel.fwd_mask_info.block_mask)) == stats[layer_type]["blocks"]


def test_paper_layout_block_counts():
    # The numbers quoted in docs/aot.md ("Splash attention"): 1280 tokens, 128 x 128 tiles, 64 layers.
    from dalle_jax import config as config_lib

    stats = splash.block_stats(config_lib.get_preset("paper_12b").prior)
    assert {name: row["blocks"] for name, row in stats.items()} == {"row": 40, "column": 55, "conv": 45,
                                                                    "schedule": 2805}
    assert stats["schedule"]["block_fraction"] == pytest.approx(0.4383, abs=1e-4)
    assert stats["schedule"]["dense_fraction"] == pytest.approx(0.1987, abs=1e-4)
