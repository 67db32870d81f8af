import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from dalle_jax import sharding
from dalle_jax.models.init import create_sharded
from dalle_jax.sharding import DEFAULT_RULES, MeshConfig, ShardingError


class TinyMLP(nnx.Module):
    """Two layers with logical names on every parameter, as the real models will have."""

    def __init__(self, d_model: int, d_mlp: int, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.5)
        self.w_in = nnx.Param(init(rngs.params(), (d_model, d_mlp)), out_sharding=("embed", "mlp"))
        self.b_in = nnx.Param(jax.random.normal(rngs.params(), (d_mlp,)), out_sharding=("mlp",))
        self.w_out = nnx.Param(init(rngs.params(), (d_mlp, d_model)), out_sharding=("mlp", "embed"))

    def __call__(self, x):  # (B, D)
        h = jax.nn.gelu(x @ self.w_in[...] + self.b_in[...])  # (B, F)
        h = sharding.constrain(h, ("batch", "mlp"))
        return h @ self.w_out[...]


def test_fill_and_product_checks():
    assert sharding.resolve_mesh_shape(MeshConfig(ici_parallelism=(-1, 2, 1)), 8) == ((4, 2, 1), (1, 1, 1))
    assert sharding.resolve_mesh_shape(MeshConfig((2, -1, 2), (2, 1, 1)), 16, num_slices=2) == ((2, 2, 2), (2, 1, 1))
    assert sharding.resolve_mesh_shape(MeshConfig((2, 2, 2), (-1, 1, 1)), 32, num_slices=4) == ((2, 2, 2), (4, 1, 1))
    with pytest.raises(ShardingError, match=r"product 12 but there are 8 devices"):
        sharding.make_mesh(MeshConfig(ici_parallelism=(3, 2, 2)))
    with pytest.raises(ShardingError, match=r"8 devices per slice are not divisible by .* 3"):
        sharding.make_mesh(MeshConfig(ici_parallelism=(-1, 3, 1)))
    with pytest.raises(ShardingError, match=r"dcn_parallelism=\(3, 1, 1\) has product 3 but there are 2 slices"):
        sharding.resolve_mesh_shape(MeshConfig((-1, 1, 1), (3, 1, 1)), 8, num_slices=2)


def test_mesh_uses_every_device_once():
    mesh = sharding.make_mesh(MeshConfig(ici_parallelism=(2, 2, 2)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_logical_to_spec_uses_each_mesh_axis_once():
    rules = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("length", None))
    assert sharding.logical_to_spec(("batch", "length", "embed"), rules) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_spec(("embed", "mlp"), rules) == P("fsdp", "tensor")
    with pytest.raises(ShardingError, match="logical axis 'hedas' has no rule"):
        sharding.logical_to_spec(("hedas",), rules)


@pytest.mark.parametrize("ici, expect_w_in", [
    ((8, 1, 1), P("fsdp", "tensor")),  # pure data parallel: fsdp/tensor have size 1
    ((2, 4, 1), P("fsdp", "tensor")),
    ((2, 2, 2), P("fsdp", "tensor")),
    ((1, 1, 8), P("fsdp", "tensor")),
])
def test_sharded_model_equals_unsharded(ici, expect_w_in):
    mesh = sharding.make_mesh(MeshConfig(ici_parallelism=ici))
    seed = int(np.random.default_rng().integers(1 << 30))
    model = create_sharded(lambda: TinyMLP(16, 32, nnx.Rngs(seed)), mesh, DEFAULT_RULES)
    with nnx.use_eager_sharding(False):
        reference = TinyMLP(16, 32, nnx.Rngs(seed))
    assert model.w_in[...].sharding.spec == expect_w_in
    np.testing.assert_array_equal(np.asarray(model.w_in[...]), np.asarray(reference.w_in[...]))
    # every device holds exactly its slice of the parameter
    shard_shape = model.w_in[...].addressable_shards[0].data.shape
    assert shard_shape == (16 // mesh.shape["fsdp"], 32 // mesh.shape["tensor"])

    x_host = np.random.default_rng(seed).normal(size=(8, 16)).astype(np.float32)
    x = sharding.shard_batch(x_host, mesh, DEFAULT_RULES)
    assert x.sharding.spec == P(("data", "fsdp"), None)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    with jax.set_mesh(mesh), sharding.axis_rules(DEFAULT_RULES):
        out = forward(state, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(reference(jnp.asarray(x_host))), rtol=1e-5, atol=1e-5)


def test_indivisible_parameter_is_reported_before_compiling():
    mesh = sharding.make_mesh(MeshConfig(ici_parallelism=(2, 1, 4)))
    with pytest.raises(ShardingError, match=r"parameter 'b_in': dimension 0 \(logical 'mlp'\) of size 30 is not "
                                            r"divisible by mesh axis tensor of size 4"):
        create_sharded(lambda: TinyMLP(16, 30, nnx.Rngs(0)), mesh, DEFAULT_RULES)


def test_batch_not_divisible_by_data_parallel_size():
    mesh = sharding.make_mesh(MeshConfig(ici_parallelism=(4, 2, 1)))
    assert sharding.data_parallel_size(mesh, DEFAULT_RULES) == 8
    with pytest.raises(ShardingError, match=r"global batch 12 is not divisible by the data-parallel size 8"):
        sharding.shard_batch(np.zeros((12, 3), np.float32), mesh, DEFAULT_RULES)
    with pytest.raises(ShardingError, match=r"global batch 6 is not divisible by the 4 hosts"):
        sharding.check_batch(6, sharding.make_mesh(MeshConfig(ici_parallelism=(1, 1, 8))), DEFAULT_RULES, 4)


def test_shard_batch_keeps_rows_in_order():
    mesh = sharding.make_mesh(MeshConfig(ici_parallelism=(4, 2, 1)))
    host = {"image": np.random.default_rng().integers(0, 255, (16, 4, 4, 3), dtype=np.uint8),
            "text": np.random.default_rng().integers(0, 99, (16, 5), dtype=np.int32)}
    batch = sharding.shard_batch(host, mesh, DEFAULT_RULES)
    for key in host:
        np.testing.assert_array_equal(np.asarray(batch[key]), host[key])
        assert len(batch[key].addressable_shards) == 8
        assert batch[key].addressable_shards[0].data.shape[0] == 2


def test_constrain_checks_rank_and_divisibility_and_is_noop_without_mesh():
    x = jnp.ones((6, 4))
    assert sharding.constrain(x, ("batch", None)) is x  # no mesh, no rules: unchanged
    mesh = sharding.make_mesh(MeshConfig(ici_parallelism=(4, 2, 1)))
    with jax.set_mesh(mesh), sharding.axis_rules(DEFAULT_RULES):
        with pytest.raises(ShardingError, match="rank 2"):
            jax.jit(lambda a: sharding.constrain(a, ("batch",)))(x)
        with pytest.raises(ShardingError, match="size 6 is not divisible"):
            jax.jit(lambda a: sharding.constrain(a, ("batch", None)))(x)
        y = jax.jit(lambda a: sharding.constrain(a * 2, ("batch", None)))(jnp.ones((8, 4)))
    assert y.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, P(("data", "fsdp"), None)), 2)
