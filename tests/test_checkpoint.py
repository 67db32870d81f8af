import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dalle_jax.train.checkpoint import (
    Checkpointer,
    CheckpointRestoreError,
    PreemptionGuard,
    abstract_like,
    fingerprints,
)

AXES = ("data", "fsdp", "tensor")
# Reading a damaged checkpoint makes Orbax abandon its other pending reads; their coroutines complain when
# garbage-collected. That noise is Orbax's, not a failure of ours.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def random_state(seed: int, mesh=None) -> dict:
    """Fresh random leaves of several dtypes; with a mesh, the matrices are sharded over fsdp/tensor."""
    keys = jax.random.split(jax.random.key(seed), 5)
    state = {
        "params": {"kernel": jax.random.normal(keys[0], (128, 64)),
                   "embed": jax.random.normal(keys[1], (64, 32), dtype=jnp.bfloat16)},
        "counts": jax.random.randint(keys[2], (8,), -1000, 1000, dtype=jnp.int32),
        "rng": jax.random.key_data(keys[3]),
        "step": jnp.asarray(seed, jnp.int32),
    }
    if mesh is not None:
        specs = {"params": {"kernel": P("fsdp", "tensor"), "embed": P("fsdp", None)}, "counts": P("tensor"),
                 "rng": P(), "step": P()}
        state = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), state, specs)
    return state


def assert_bitwise_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, e = np.asarray(a), np.asarray(e)
        assert a.dtype == e.dtype and a.shape == e.shape
        assert a.tobytes() == e.tobytes()


def save_steps(directory, states: dict[int, dict], **kwargs) -> None:
    with Checkpointer(directory, save_every=5, **kwargs) as ckpt:
        for step, state in states.items():
            assert ckpt.save(step, state, data_iterator={"next_index": step * 4}, meta={"step": step})


def test_exact_resume_of_random_arrays(tmp_path):
    state = random_state(1)
    with Checkpointer(tmp_path, save_every=5) as ckpt:
        assert ckpt.restore_latest(abstract_like(state)) is None
        assert ckpt.save(5, state, data_iterator={"next_index": 21}, meta={"wall": 12.5})
        ckpt.wait()
    with Checkpointer(tmp_path, save_every=5) as ckpt:  # a fresh process would see the same directory
        step, restored, it_state, meta = ckpt.restore_latest(abstract_like(state))
    assert (step, it_state, meta) == (5, {"next_index": 21}, {"wall": 12.5})
    assert_bitwise_equal(restored, state)
    assert isinstance(restored["params"]["embed"], jax.Array) and restored["params"]["embed"].dtype == jnp.bfloat16


def test_fingerprint_sees_any_single_changed_element_and_ignores_sharding():
    state = random_state(2)
    mesh = jax.make_mesh((2, 2, 2), AXES)
    assert fingerprints(random_state(2, mesh)) == fingerprints(state)
    for name, index in [("kernel", (3, 5)), ("embed", (31, 0))]:
        leaf = state["params"][name]
        bumped = leaf.at[index].set(jnp.nextafter(leaf[index], jnp.asarray(np.inf, leaf.dtype)))
        changed = {**state, "params": {**state["params"], name: bumped}}
        assert fingerprints(changed)[f"params.{name}"] != fingerprints(state)[f"params.{name}"]
    swapped = {**state, "counts": state["counts"][::-1]}
    assert fingerprints(swapped)["counts"] != fingerprints(state)["counts"]


class TinyNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(jax.nn.relu(self.hidden(x)))


def test_exact_resume_of_nnx_params_ema_and_adamw_state(tmp_path):
    graphdef, params = nnx.split(TinyNet(nnx.Rngs(0)), nnx.Param)
    tx = optax.adamw(1e-2, weight_decay=0.1)
    inputs, targets = jax.random.normal(jax.random.key(1), (2, 16, 4)), jax.random.normal(jax.random.key(2), (16, 2))

    @jax.jit
    def train_step(state, x):
        def loss_fn(p):
            return jnp.mean((nnx.merge(graphdef, p)(x) - targets) ** 2)

        grads = jax.grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ema = jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state["ema"], params)
        return {"params": params, "ema": ema, "opt_state": opt_state, "step": state["step"] + 1}

    state = {"params": params, "ema": params, "opt_state": tx.init(params), "step": jnp.asarray(0, jnp.int32)}
    for i in range(3):
        state = train_step(state, inputs[i % 2])
    with Checkpointer(tmp_path, save_every=3) as ckpt:
        assert ckpt.save(3, state)
    with Checkpointer(tmp_path, save_every=3) as ckpt:
        restored = ckpt.restore_latest(abstract_like(state))
    assert restored.step == 3 and restored.data_iterator is None
    assert_bitwise_equal(restored.state, state)
    assert isinstance(restored.state["params"], nnx.State)
    # The restored optimizer state must carry on exactly like the original.
    assert_bitwise_equal(train_step(restored.state, inputs[1]), train_step(state, inputs[1]))


@pytest.mark.parametrize("new_shape, kernel_spec", [((1, 8, 1), P("fsdp", None)), ((8, 1, 1), P(None, "data"))])
def test_restore_onto_a_different_mesh(tmp_path, new_shape, kernel_spec):
    state = random_state(3, jax.make_mesh((2, 2, 2), AXES))
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        assert ckpt.save(1, state)
    new_mesh = jax.make_mesh(new_shape, AXES)
    new_shardings = {"params": {"kernel": NamedSharding(new_mesh, kernel_spec),
                                "embed": NamedSharding(new_mesh, P(None, None))},
                     "counts": NamedSharding(new_mesh, P(kernel_spec[0] or kernel_spec[1])),
                     "rng": NamedSharding(new_mesh, P()), "step": NamedSharding(new_mesh, P())}
    with Checkpointer(tmp_path, save_every=1) as ckpt:
        restored = ckpt.restore(1, abstract_like(state, new_shardings)).state
    assert_bitwise_equal(restored, state)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(new_shardings), strict=True):
        assert leaf.sharding == sharding
    assert len(restored["params"]["kernel"].addressable_shards) == 8


def test_interval_keep_and_force(tmp_path):
    with Checkpointer(tmp_path, save_every=5, keep=2, async_save=True) as ckpt:
        decisions = [ckpt.should_save(step) for step in range(1, 11)]
        assert decisions == [False] * 4 + [True] + [False] * 4 + [True]
        saved = [step for step in range(1, 18) if ckpt.save(step, random_state(step))]
        assert saved == [5, 10, 15]
        assert ckpt.save(17, random_state(17), force=True)
        assert not ckpt.save(16, random_state(16), force=True)  # never behind the latest
        ckpt.wait()
        assert ckpt.all_steps() == [15, 17] and ckpt.latest_step() == 17
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["15", "17"]


def biggest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def truncate(step_dir: Path) -> None:
    target = biggest_data_file(step_dir)
    os.truncate(target, target.stat().st_size // 2)


def flip_bytes(step_dir: Path) -> None:
    target = biggest_data_file(step_dir)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(b ^ 0x5A for b in data[middle:middle + 16])
    target.write_bytes(bytes(data))


def delete_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").unlink()


@pytest.mark.parametrize("damage", [truncate, flip_bytes, delete_metadata])
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, damage):
    states = {5: random_state(5), 10: random_state(10)}
    save_steps(tmp_path, states)
    bad_dir = tmp_path / "10"
    damage(bad_dir)
    with Checkpointer(tmp_path, save_every=5) as ckpt:
        with pytest.raises(CheckpointRestoreError, match=str(bad_dir)):
            ckpt.restore(10, abstract_like(states[10]))
        with caplog.at_level(logging.WARNING, logger="dalle_jax.train.checkpoint"):
            step, state, it_state, meta = ckpt.restore_latest(abstract_like(states[10]))
        assert (step, it_state, meta) == (5, {"next_index": 20}, {"step": 5})
        assert_bitwise_equal(state, states[5])
        fallback = [r for r in caplog.records if r.name == "dalle_jax.train.checkpoint" and r.levelno == logging.WARNING
                    and "fell back to step 5" in r.getMessage()]
        assert len(fallback) == 1 and str(bad_dir) in fallback[0].getMessage()
        # The bad one is moved aside, so the resumed run can write step 10 again.
        assert ckpt.all_steps() == [5] and (tmp_path / "10.corrupt").is_dir()
        assert ckpt.save(10, states[10])
        ckpt.wait()
        assert_bitwise_equal(ckpt.restore(10, abstract_like(states[10])).state, states[10])


def test_partially_written_latest_is_ignored(tmp_path, caplog):
    states = {5: random_state(5), 10: random_state(10)}
    save_steps(tmp_path, states)
    partial = tmp_path / "15.orbax-checkpoint-tmp-1234567"  # what a save killed mid-write leaves behind
    shutil.copytree(tmp_path / "10", partial)
    truncate(partial)
    with caplog.at_level(logging.WARNING, logger="dalle_jax.train.checkpoint"):
        with Checkpointer(tmp_path, save_every=5) as ckpt:
            restored = ckpt.restore_latest(abstract_like(states[10]))
            ckpt.save(15, states[5])
    assert restored.step == 10
    assert_bitwise_equal(restored.state, states[10])
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(partial) in m and "fell back to step 10" in m for m in messages)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["10", "15", "5"]


def test_every_checkpoint_bad_raises_naming_all_and_moves_nothing(tmp_path):
    states = {5: random_state(5), 10: random_state(10)}
    save_steps(tmp_path, states)
    truncate(tmp_path / "10")
    delete_metadata(tmp_path / "5")
    with Checkpointer(tmp_path, save_every=5) as ckpt:
        with pytest.raises(CheckpointRestoreError) as raised:
            ckpt.restore_latest(abstract_like(states[10]))
        assert str(tmp_path / "10") in str(raised.value) and str(tmp_path / "5") in str(raised.value)
        assert ckpt.all_steps() == [5, 10]


def test_target_that_does_not_fit_is_an_error_not_a_fallback(tmp_path):
    states = {5: random_state(5), 10: random_state(10)}
    save_steps(tmp_path, states)
    wrong = abstract_like({**states[10], "params": {**states[10]["params"], "kernel": jnp.zeros((16, 9))}})
    with Checkpointer(tmp_path, save_every=5) as ckpt:
        with pytest.raises(CheckpointRestoreError, match="none of the 2 checkpoints"):
            ckpt.restore_latest(wrong)
        assert ckpt.all_steps() == [5, 10]


def test_preemption_guard_sets_flag_and_restores_handlers():
    before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        assert not guard.requested and not guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not guard.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guard.requested and guard.should_stop(1)
        os.kill(os.getpid(), signal.SIGTERM)  # repeated SIGTERM: still alive, still requested
        time.sleep(0.05)
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C means "stop now"
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert signal.getsignal(signal.SIGTERM) is before_term and signal.getsignal(signal.SIGINT) is before_int


TRAIN_SCRIPT = textwrap.dedent("""
    import sys, time
    import jax, jax.numpy as jnp, numpy as np
    from dalle_jax.train.checkpoint import Checkpointer, PreemptionGuard, abstract_like

    run_dir, total, out, pause_at = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    seed = jax.random.key(7)
    state = {"w": jax.random.normal(seed, (64,)), "rng": jax.random.key_data(jax.random.fold_in(seed, 1)),
             "step": jnp.asarray(0, jnp.int32)}

    @jax.jit
    def train_step(state):
        rng, noise_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
        w = state["w"] * 0.9 + jax.random.normal(noise_key, state["w"].shape, dtype=jnp.float32)
        return {"w": w, "rng": jax.random.key_data(rng), "step": state["step"] + 1}

    start = 0
    with Checkpointer(run_dir, save_every=5, keep=2) as ckpt, PreemptionGuard() as guard:
        restored = ckpt.restore_latest(abstract_like(state))
        if restored is not None:
            start, state = restored.step, restored.state
            assert restored.data_iterator == {"next_index": start}, restored.data_iterator
            print("resumed", start, flush=True)
        for step in range(start + 1, total + 1):
            state = train_step(state)
            print("step", step, flush=True)
            deadline = time.monotonic() + 30
            while step == pause_at and not guard.requested and time.monotonic() < deadline:
                time.sleep(0.01)  # wait for the test's SIGTERM, so the stop step is deterministic
            stop = guard.should_stop(step)
            ckpt.save(step, state, data_iterator={"next_index": step}, meta={"time": time.time()}, force=stop)
            if stop:
                print("preempted", step, flush=True)
                break
        else:
            np.savez(out, **jax.device_get(state))
            print("done", flush=True)
""")


def test_sigterm_saves_and_rerun_resumes_bitwise(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    python, total = "/work/venv/bin/python" if os.path.exists("/work/venv/bin/python") else sys.executable, 12

    def launch(run_dir, out, pause_at=-1):
        return subprocess.Popen([python, str(script), str(run_dir), str(total), str(out), str(pause_at)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    reference = launch(tmp_path / "reference", tmp_path / "reference.npz")  # uninterrupted, in parallel
    interrupted = launch(tmp_path / "run", tmp_path / "unused.npz", pause_at=7)
    started = [reference, interrupted]
    watchdog = threading.Timer(60, lambda: [p.kill() for p in started if p.poll() is None])  # bounds the reads
    watchdog.start()
    try:
        for line in interrupted.stdout:
            if line.strip() == "step 7":
                interrupted.send_signal(signal.SIGTERM)
                break
        out, err = interrupted.communicate(timeout=60)
        assert interrupted.returncode == 0, err[-3000:]
        assert "preempted 7" in out and "done" not in out
        with Checkpointer(tmp_path / "run", save_every=5) as ckpt:
            assert ckpt.all_steps() == [5, 7]

        resumed = launch(tmp_path / "run", tmp_path / "resumed.npz")
        started.append(resumed)
        out, err = resumed.communicate(timeout=60)
        assert resumed.returncode == 0, err[-3000:]
        assert out.startswith("resumed 7\nstep 8\n") and "done" in out
        ref_out, ref_err = reference.communicate(timeout=60)
        assert reference.returncode == 0, ref_err[-3000:]
    finally:
        watchdog.cancel()
        for process in started:
            if process.poll() is None:
                process.kill()
    expected, actual = np.load(tmp_path / "reference.npz"), np.load(tmp_path / "resumed.npz")
    assert int(actual["step"]) == total
    for name in ("w", "rng", "step"):
        assert actual[name].tobytes() == expected[name].tobytes()


def test_a_read_only_reader_falls_back_without_moving_anything(tmp_path):
    """sample / encode / reconstruct only read: a corrupt latest checkpoint is skipped but left where it is."""
    states = {5: random_state(5), 10: random_state(10)}
    save_steps(tmp_path, states)
    truncate(tmp_path / "10")
    before = sorted(p.name for p in tmp_path.iterdir())
    with Checkpointer(tmp_path, save_every=1, keep=1, read_only=True) as reader:
        step, state, _, _ = reader.restore_latest(abstract_like(states[10]))
    assert step == 5
    assert_bitwise_equal(state, states[5])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing renamed, created or deleted


def test_an_error_mid_run_finishes_the_save_in_flight_and_stops_orbax(tmp_path):
    """Bad data (or any error) right after an async save: the error propagates, the save it overlapped is complete
    on disk, and Orbax's threads are stopped (they used to print after the CLI's error line)."""
    from dalle_jax.errors import DatasetError
    from dalle_jax.train.loop import Loop, StateSpec

    class BatchesThatBreak:
        def __init__(self, fail_at: int):
            self.position, self.fail_at = 0, fail_at

        def __next__(self) -> dict:
            self.position += 1
            if self.position == self.fail_at:
                raise DatasetError(f"record {self.position} is corrupt")
            return {"x": np.full((4,), self.position, np.float32)}

        def get_state(self) -> dict:
            return {"position": self.position}

        def set_state(self, state: dict) -> None:
            self.position = state["position"]

    state = random_state(0)

    def add_one(state):
        return jax.tree.map(lambda leaf: leaf + 1 if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf, state)

    @jax.jit
    def train_step(state, batch):
        return add_one(state), {"loss": jnp.mean(batch["x"]), "nonfinite": jnp.zeros((), jnp.int32)}

    threads_before = set(threading.enumerate())
    loop = Loop(tmp_path / "run", tmp_path / "ckpt", steps=10, save_every=3, log_every=1, eval_every=100)
    with pytest.raises(DatasetError, match="record 4 is corrupt"):
        loop.run(state, StateSpec(None, None, abstract_like(state)), train_step, BatchesThatBreak(fail_at=4),
                 to_device=lambda batch: batch, batch_size=4, progress=False)
    assert not [t for t in set(threading.enumerate()) - threads_before if t.is_alive() and not t.daemon]
    reader = Checkpointer(tmp_path / "ckpt", save_every=1, read_only=True)
    restored = reader.restore_latest(abstract_like(state))
    reader.close()
    assert restored.step == 3 and restored.data_iterator == {"position": 3}
    expected = add_one(add_one(add_one(state)))  # the state after step 3, the last saved
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored.state, expected)
