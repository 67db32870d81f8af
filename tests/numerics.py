"""Comparing fp32 results that were summed in another order (blocked/splash attention, sharded programs)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def probe_loss(text_logits, image_logits, weights):
    """A scalar whose gradient reaches every logit: the image logits against random weights, plus a small text term.

    Returns (loss, scale). The loss sums ~10^4 terms of both signs and can cancel to near 0, so its rounding error
    is relative to the terms, not to itself: scale is their L2 norm, the loss's error if each term is off by 1.
    """
    terms = image_logits * weights
    return jnp.sum(terms) + jnp.sum(text_logits**2) * 1e-3, jnp.sqrt(jnp.sum(terms**2))


def probe_value_and_grads(params, graphdef, text, image, weights):
    """((loss, (text_logits, image_logits, scale)), grads) of `probe_loss` for a prior split into graphdef/params."""
    def loss(p):
        text_logits, image_logits = nnx.merge(graphdef, p)(text, image)
        value, scale = probe_loss(text_logits, image_logits, weights)
        return value, (text_logits, image_logits, scale)

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def assert_same(actual, expected, rtol=1e-5):
    """actual/expected: what `probe_value_and_grads` returns."""
    (loss, (*outputs, _)), grads = actual
    (loss_ref, (*outputs_ref, scale)), grads_ref = expected
    np.testing.assert_allclose(loss, loss_ref, rtol=0, atol=rtol * float(scale))
    for a, b in zip(jax.tree.leaves((outputs, grads)), jax.tree.leaves((outputs_ref, grads_ref)), strict=True):
        # Tolerance relative to the leaf's scale; the key-bias gradient is ~0 (a per-query constant shift of the
        # scores), hence the absolute floor.
        np.testing.assert_allclose(a, b, rtol=rtol, atol=max(rtol * float(np.max(np.abs(b))), 1e-7))
