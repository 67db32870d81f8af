"""Parameter initialisation that compiles fast.

XLA:CPU (jax 0.10) spends about a second compiling each random-number op, so a model that draws every
parameter separately (the dVAE has ~100 of them) takes minutes to initialise under `jit`. Model code calls
`standard_normal(rngs, shape)` instead of `jax.random.normal`; inside `pooled_normals(...)` those draws become
consecutive slices of one buffer drawn by a single op. Outside it they are ordinary per-parameter draws, so
modules still work on their own (tests, notebooks). Same distribution either way; the values differ.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dalle_jax import sharding


@dataclasses.dataclass
class _Pool:
    buffer: jax.Array | None  # None while counting
    offset: int = 0


_POOL: contextvars.ContextVar[_Pool | None] = contextvars.ContextVar("dalle_jax_normal_pool", default=None)


def standard_normal(rngs: nnx.Rngs, shape: tuple[int, ...]) -> jax.Array:
    """N(0, 1) float32 of `shape`: from the active pool if there is one, else from `rngs.params()`."""
    pool = _POOL.get()
    if pool is None:
        return jax.random.normal(rngs.params(), shape, jnp.float32)
    size = math.prod(shape)
    start, pool.offset = pool.offset, pool.offset + size
    if pool.buffer is None:
        return jnp.zeros(shape, jnp.float32)  # counting pass (run under eval_shape)
    return jax.lax.dynamic_slice_in_dim(pool.buffer, start, size).reshape(shape)


@contextlib.contextmanager
def count_normals() -> Iterator[_Pool]:
    """Counts how many pooled normals a construction asks for (use under `eval_shape`): `pool.offset`."""
    pool = _Pool(buffer=None)
    token = _POOL.set(pool)
    try:
        yield pool
    finally:
        _POOL.reset(token)


@contextlib.contextmanager
def pooled_normals(key: jax.Array, total: int) -> Iterator[None]:
    """Within this block `standard_normal` slices one buffer of `total` draws from `key`."""
    pool = _Pool(buffer=jax.random.normal(key, (max(total, 1),), jnp.float32))
    token = _POOL.set(pool)
    try:
        yield
    finally:
        _POOL.reset(token)
        if pool.offset != total:
            raise RuntimeError(f"model asked for {pool.offset} pooled normals, expected {total}: is its "
                               f"construction deterministic?")


def build_pooled(model_fn, key: jax.Array) -> nnx.Module:
    """Constructs `model_fn()` with all its `standard_normal` draws taken from one pooled buffer.

    Counts the draws with an abstract pass first; works eagerly and under `jit` alike. Flax's eager sharding
    is off: our parameters carry logical axis names, which `dalle_jax.sharding` maps to the mesh.
    """
    with nnx.use_eager_sharding(False):
        with count_normals() as count:
            jax.eval_shape(lambda: (model_fn(), None)[1])  # trace only; nothing is allocated
        with pooled_normals(key, count.offset):
            return model_fn()


def param(rngs: nnx.Rngs, shape: tuple[int, ...], std: float, axes: tuple) -> nnx.Param:
    """A parameter with logical `axes`: N(0, std^2) through `standard_normal`, or zeros when std is 0."""
    value = std * standard_normal(rngs, shape) if std else jnp.zeros(shape, jnp.float32)
    return nnx.Param(value, out_sharding=axes)


def ones(shape: tuple[int, ...], axes: tuple) -> nnx.Param:
    """A parameter of ones (LayerNorm gains) with logical `axes`."""
    return nnx.Param(jnp.ones(shape, jnp.float32), out_sharding=axes)


def create_sharded(model_fn: Any, mesh: jax.sharding.Mesh, rules: sharding.Rules, seed: int = 0) -> Any:
    """Builds an NNX model with every parameter born sharded on `mesh` (never whole on one device).

    The model is traced abstractly first (nothing allocated) to learn shapes and logical axes; the real
    initialisation then runs under `jax.jit` with those output shardings, drawing its normals from one pooled
    buffer keyed by `seed` (`build_pooled`). Flax's eager sharding is off while doing so because our
    logical names are mapped by `rules`, not by Flax's global context.
    """
    with nnx.use_eager_sharding(False):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(model_fn))
    shardings = sharding.state_shardings(abstract_state, mesh, rules)

    def init():
        with nnx.use_eager_sharding(False):
            return nnx.split(build_pooled(model_fn, jax.random.key(seed)))[1]

    state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
