"""Device mesh, logical-axis rules, and the helpers that place arrays on the mesh.

Models name the axes of every parameter and activation logically ("embed", "heads", "batch"...). One table
of rules (`MeshConfig.rules`) maps logical names to mesh axes ("data", "fsdp", "tensor"), so the same
model runs data parallel, FSDP or tensor parallel by changing only the mesh shape and the rules.

Everything here checks shapes *before* anything is compiled and names the numbers when they do not fit.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dalle_jax.errors import ConfigError, ShardingError

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, Sequence[str] | str | None]]
LogicalAxes = Sequence[str | None]

# Logical axis name -> mesh axes. One table for every model; change it (or the mesh) to move between
# data parallel, FSDP and tensor parallel without touching model code.
DEFAULT_RULES: tuple[tuple[str, tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", ("fsdp",)),
    ("heads", ("tensor",)),
    ("kv", None),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("conv_in", None),
    ("conv_out", ("fsdp",)),
    ("height", None),
    ("width", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh over axes (data, fsdp, tensor); the `mesh` section of a config.

    `ici_parallelism` is the shape within a slice (one -1 fills the remaining devices);
    `dcn_parallelism` is the shape across slices (multi-slice pods; all ones on a single slice).
    """

    ici_parallelism: tuple[int, ...] = (-1, 1, 1)
    dcn_parallelism: tuple[int, ...] = (1, 1, 1)
    rules: tuple[tuple[str, tuple[str, ...] | None], ...] = DEFAULT_RULES

    def __post_init__(self):
        for name in ("ici_parallelism", "dcn_parallelism"):
            shape = getattr(self, name)
            if len(shape) != len(MESH_AXES):
                raise ConfigError(f"mesh.{name}={shape} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
            if any(s == 0 or s < -1 for s in shape):
                raise ConfigError(f"mesh.{name}={shape}: entries must be positive or -1 (fill)")
        if sum(s == -1 for s in self.ici_parallelism + self.dcn_parallelism) > 1:
            raise ConfigError("mesh: at most one -1 (fill) entry across ici_parallelism and dcn_parallelism")
        for logical, axes in self.rules:
            for axis in axes or ():
                if axis not in MESH_AXES:
                    raise ConfigError(f"mesh.rules: '{logical}' maps to unknown mesh axis '{axis}' "
                                      f"(mesh axes are {MESH_AXES})")


# --------------------------------------------------------------------------------------------------
# Mesh

def _fill(shape: Sequence[int], total: int, name: str, unit: str, hint: str = "") -> tuple[int, ...]:
    """Replaces a -1 entry so the product is `total`; raises with the numbers when it cannot be."""
    shape = list(shape)
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if total % known:
            raise ShardingError(f"mesh.{name}={tuple(shape)}: {total} {unit} are not divisible by the fixed "
                                f"entries' product {known}")
        shape[shape.index(-1)] = total // known
    if math.prod(shape) != total:
        raise ShardingError(f"mesh.{name}={tuple(shape)} has product {math.prod(shape)} but there are {total} "
                            f"{unit}{hint}")
    return tuple(shape)


def resolve_mesh_shape(config: MeshConfig, num_devices: int, num_slices: int = 1) -> tuple[tuple[int, ...], ...]:
    """Fills the -1 entry and checks that the mesh covers exactly `num_devices` devices.

    Returns (ici_shape, dcn_shape); the full mesh shape is their element-wise product.
    """
    if num_devices % num_slices:
        raise ShardingError(f"{num_devices} devices cannot form {num_slices} equal slices")
    dcn = _fill(config.dcn_parallelism, num_slices, "dcn_parallelism", "slices")
    ici = _fill(config.ici_parallelism, num_devices // num_slices, "ici_parallelism", "devices per slice",
                f" ({num_devices} devices in all); use -1 in one entry to fill, e.g. "
                f"--set mesh.ici_parallelism=-1,1,1")
    return ici, dcn


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh; multi-slice meshes put the DCN axes outermost."""
    devices = list(jax.devices() if devices is None else devices)
    slice_ids = {getattr(d, "slice_index", 0) for d in devices}
    ici, dcn = resolve_mesh_shape(config, len(devices), num_slices=len(slice_ids))
    if len(slice_ids) > 1:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    else:
        shape = tuple(i * d for i, d in zip(ici, dcn, strict=True))
        try:
            from jax.experimental import mesh_utils

            grid = mesh_utils.create_device_mesh(shape, devices=devices)
        except (AssertionError, NotImplementedError, ValueError):
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES)


# --------------------------------------------------------------------------------------------------
# Logical axes -> PartitionSpec

def _rules_dict(rules: Rules) -> dict[str, tuple[str, ...]]:
    out = {}
    for logical, axes in rules:
        if axes is None:
            out[logical] = ()
        elif isinstance(axes, str):
            out[logical] = (axes,)
        else:
            out[logical] = tuple(axes)
    return out


def logical_to_spec(logical_axes: LogicalAxes | None, rules: Rules) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once (first dim wins).

    Unknown logical names raise, so a typo in a model cannot silently replicate a 12B parameter.
    """
    if logical_axes is None:
        return PartitionSpec()
    table = _rules_dict(rules)
    used: set[str] = set()
    entries = []
    for name in logical_axes:
        if name is None:
            entries.append(None)
            continue
        if name not in table:
            raise ShardingError(f"logical axis '{name}' has no rule; add it to mesh.rules "
                                f"(known: {sorted(table)})")
        axes = tuple(a for a in table[name] if a not in used)
        used.update(axes)
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*entries)


def _axis_size(mesh: Mesh, entry: Any) -> int:
    if entry is None:
        return 1
    names = (entry,) if isinstance(entry, str) else entry
    return math.prod(mesh.shape[n] for n in names)


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, what: str,
                    logical_axes: LogicalAxes | None = None) -> None:
    """Raises ShardingError naming `what`, the dimension and the mesh axes if a dim does not divide."""
    for dim, (size, entry) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)),
                                            strict=False)):
        parts = _axis_size(mesh, entry)
        if size % parts:
            logical = f" (logical '{logical_axes[dim]}')" if logical_axes else ""
            raise ShardingError(f"{what}: dimension {dim}{logical} of size {size} is not divisible by mesh "
                                f"axis {entry} of size {parts} (mesh {dict(mesh.shape)}); change the mesh or the "
                                f"rule for that logical axis")


def named_sharding(mesh: Mesh, logical_axes: LogicalAxes | None, rules: Rules,
                   shape: Sequence[int] | None = None, what: str = "array") -> NamedSharding:
    spec = logical_to_spec(logical_axes, rules)
    if shape is not None:
        check_divisible(shape, spec, mesh, what, logical_axes)
    return NamedSharding(mesh, spec)


# --------------------------------------------------------------------------------------------------
# Parameters (Flax NNX state with `out_sharding` metadata holding logical names)

def _path_str(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """A tree of NamedSharding matching an NNX state (abstract or concrete), checked for divisibility."""
    from flax import nnx

    def one(path, v):
        if isinstance(v, nnx.Variable):
            axes = v.get_metadata().get("out_sharding")
            return v.replace(named_sharding(mesh, axes, rules, v.shape, what=f"parameter '{_path_str(path)}'"))
        return named_sharding(mesh, None, rules)

    return jax.tree.map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: Any, mesh: Mesh, rules: Rules) -> Any:
    """Places a concrete NNX state (or any tree with Variables) on the mesh according to its logical axes."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


# --------------------------------------------------------------------------------------------------
# Batches

def data_parallel_size(mesh: Mesh, rules: Rules) -> int:
    return _axis_size(mesh, logical_to_spec(("batch",), rules)[0])


def check_batch(global_batch: int, mesh: Mesh, rules: Rules, process_count: int = 1) -> int:
    """Checks the global batch against the data-parallel size and hosts; returns the per-host batch."""
    dp = data_parallel_size(mesh, rules)
    if global_batch % dp:
        raise ShardingError(f"global batch {global_batch} is not divisible by the data-parallel size {dp} "
                            f"(mesh {dict(mesh.shape)}, batch -> {logical_to_spec(('batch',), rules)[0]}); "
                            f"use a multiple of {dp}")
    if global_batch % process_count:
        raise ShardingError(f"global batch {global_batch} is not divisible by the {process_count} hosts")
    return global_batch // process_count


def batch_axes(ndim: int) -> tuple[str | None, ...]:
    return ("batch",) + (None,) * (ndim - 1)


def shard_batch(host_batch: Mapping[str, np.ndarray] | np.ndarray, mesh: Mesh, rules: Rules) -> Any:
    """Turns this host's part of a batch into global `jax.Array`s sharded along the batch axis.

    Each host passes its own rows (global_batch / process_count of them); the global array is their
    concatenation in process order.
    """
    def one(x):
        x = np.asarray(x)
        global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
        check_batch(global_shape[0], mesh, rules, jax.process_count())
        sharding = named_sharding(mesh, batch_axes(x.ndim), rules, global_shape, what="batch")
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(one, host_batch)


# --------------------------------------------------------------------------------------------------
# Activations

_ACTIVE_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("dalle_jax_rules", default=None)


@contextlib.contextmanager
def axis_rules(rules: Rules) -> Iterator[None]:
    """Makes `rules` the ones `constrain` uses (set around tracing of the model's step)."""
    token = _ACTIVE_RULES.set(tuple(rules))
    try:
        yield
    finally:
        _ACTIVE_RULES.reset(token)


def active_rules() -> Rules | None:
    """The rules set by the enclosing `axis_rules`, or None (then models run unsharded)."""
    return _ACTIVE_RULES.get()


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """`with_sharding_constraint` by logical names, under the mesh set with `jax.set_mesh`.

    A no-op outside `axis_rules` or without a mesh, so models also run unsharded (tests, notebooks).
    """
    rules = _ACTIVE_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh is None or mesh.empty:
        return x
    if len(logical_axes) != x.ndim:
        raise ShardingError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} for an array of "
                            f"rank {x.ndim} (shape {x.shape})")
    spec = logical_to_spec(logical_axes, rules)
    check_divisible(x.shape, spec, mesh, "activation", logical_axes)
    return jax.lax.with_sharding_constraint(x, spec)
