"""Divergence is never saved: non-finite steps are skipped, a streak of them stops the run with one error line,
every checkpoint on disk stays finite, non-finite weights are refused on load, and config rejects non-finite
or out-of-range hyperparameters."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle_jax import config as config_lib
from dalle_jax import runs, sharding
from dalle_jax.cli import main
from dalle_jax.models.dvae import DVAE
from dalle_jax.sharding import MeshConfig
from dalle_jax.train import loop, optim
from dalle_jax.train.checkpoint import Checkpointer


class Linear(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 3)), out_sharding=(None, None))


def _loss(model, batch, key, step):
    # batch["scale"] turns a step's loss (and gradient) into NaN on demand
    return jnp.mean(jnp.square(batch["x"] @ model.w[...] - batch["y"])) * batch["scale"][0], {}


def _restore(run, step):
    """One dVAE checkpoint of `run`, restored into the trainer's own abstract state."""
    cfg = config_lib.load_config(run / "dvae" / "config.json")
    mesh = sharding.make_mesh(cfg.mesh)
    spec = loop.state_spec(lambda: DVAE(cfg.dvae, rngs=nnx.Rngs(0)), optim.make_optimizer(cfg.dvae_train), mesh,
                           cfg.mesh.rules)
    with Checkpointer(run / "dvae" / "checkpoints", save_every=1) as checkpointer:
        return checkpointer.restore(step, spec.abstract)


def test_a_non_finite_step_leaves_params_ema_and_optimizer_state_unchanged():
    mesh = sharding.make_mesh(MeshConfig(ici_parallelism=(1, 1, 1)), devices=jax.devices()[:1])
    rules = MeshConfig().rules
    train = config_lib.get_preset("quick").prior_train
    optimizer = optim.make_optimizer(train)
    state, spec = loop.init_state(lambda: Linear(nnx.Rngs(0)), optimizer, mesh, rules, 0)
    batch_sharding = {k: sharding.named_sharding(mesh, sharding.batch_axes(len(s)), rules, s)
                      for k, s in {"x": (2, 4), "y": (2, 3), "scale": (2,)}.items()}
    step = loop.make_train_step(_loss, optimizer, spec, mesh, rules, batch_sharding, 0.9)
    rng = np.random.default_rng()
    batch = {"x": rng.normal(size=(2, 4)).astype(np.float32), "y": rng.normal(size=(2, 3)).astype(np.float32)}
    state, metrics = step(state, sharding.shard_batch({**batch, "scale": np.ones(2, np.float32)}, mesh, rules))
    assert float(metrics["nonfinite"]) == 0.0
    before = jax.device_get({k: state[k] for k in ("params", "ema_params", "opt_state")})
    for bad in (np.nan, np.inf):
        state, metrics = step(state, sharding.shard_batch({**batch, "scale": np.full(2, bad, np.float32)}, mesh,
                                                           rules))
        assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(float(metrics["loss"]))
        after = jax.device_get({k: state[k] for k in ("params", "ema_params", "opt_state")})
        for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before), strict=True):
            np.testing.assert_array_equal(a, b)  # bitwise: the step was skipped
    assert int(state["step"]) == 3  # the batches were consumed
    state, metrics = step(state, sharding.shard_batch({**batch, "scale": np.ones(2, np.float32)}, mesh, rules))
    assert float(metrics["nonfinite"]) == 0.0
    assert not np.array_equal(jax.device_get(state["params"]["w"]), before["params"]["w"])  # finite steps train


def test_a_diverging_run_stops_with_one_line_and_keeps_only_finite_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train-dvae", "--run", str(run), "--preset", "quick", "--set", "dvae_train.learning_rate=1e8",
                 "--set", "dvae_train.learning_rate_end=1e7", "--set", "dvae_train.max_nonfinite_steps=4",
                 "--set", "dvae_train.save_every=2"])
    err = capsys.readouterr().err
    assert code == 2
    line = [entry for entry in err.splitlines() if entry.startswith("error:")]
    assert len(line) == 1 and "non-finite" in line[0] and "Lower the learning rate" in line[0]
    assert "Traceback" not in err
    steps = sorted(int(p.name) for p in (run / "dvae" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < 20  # stopped early, before the last step was saved
    for step in steps:  # every checkpoint on disk is finite
        restored = _restore(run, step)
        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.state)
                   if np.issubdtype(np.asarray(x).dtype, np.floating))
    dvae = runs.load_dvae(run)  # the last finite checkpoint loads
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(dvae, nnx.Param)))
    logged = [json.loads(row) for row in (run / "dvae" / "metrics.jsonl").read_text().splitlines()]
    assert max(row.get("nonfinite_steps", 0) for row in logged) >= 4


def test_non_finite_weights_are_refused_on_load(tmp_path):
    run = tmp_path / "run"
    assert main(["train-dvae", "--run", str(run), "--preset", "quick", "--set", "dvae_train.steps=2",
                 "--set", "dvae_train.save_every=2", "--set", "dvae_train.eval_every=2"]) == 0
    restored = _restore(run, 2)
    poisoned = jax.tree.map(lambda x: jnp.full_like(x, np.nan) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                            restored.state)
    with Checkpointer(run / "dvae" / "checkpoints", save_every=1) as checkpointer:  # as an older version saved
        checkpointer.save(3, poisoned, force=True)
    with pytest.raises(loop.DivergenceError, match="non-finite weights"):
        runs.load_dvae(run)


@pytest.mark.parametrize("override, fragment", [
    ("dvae_train.learning_rate=nan", "must be a finite number"),
    ("prior_train.learning_rate=inf", "must be a finite number"),
    ("clip_train.learning_rate=-1", "must be > 0"),
    ("prior_train.learning_rate=0", "must be > 0"),
    ("dvae_train.ema_decay=2", "must be in [0, 1)"),
    ("prior_train.ema_decay=1", "must be in [0, 1)"),
    ("clip_train.weight_decay=-0.1", "must be >= 0"),
    ("prior.dropout=1.5", "must be in [0, 1)"),
    ("prior_train.max_nonfinite_steps=0", "max_nonfinite_steps must be >= 1"),
])
def test_config_rejects_non_finite_and_out_of_range_hyperparameters(override, fragment):
    with pytest.raises(config_lib.ConfigError) as raised:
        config_lib.resolve("quick", [override])
    assert fragment in str(raised.value) and override.split("=")[0].split(".")[-1] in str(raised.value)
