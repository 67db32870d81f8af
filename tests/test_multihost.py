"""Multi-host training on simulated hosts: 2 processes x 4 CPU devices on localhost (gloo collectives), one
(data=2, fsdp=2, tensor=2) mesh over all 8 devices, a SIGTERM on one host, and a restart of both.

The proof is equality with a single process on 8 devices: the same per-step losses (including the steps
after the restart, so the data position was restored), the same eval losses (rows on both hosts), and the
same final parameters, EMA and optimizer state.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import portpicker
import pytest

from tests.token_data import TEXT_LEN, make_token_data

WORKER = str(Path(__file__).with_name("multihost_worker.py"))
STEPS, SAVE_EVERY, EVAL_EVERY = 10, 3, 5
OVERRIDES = [f"text.text_len={TEXT_LEN}", f"prior_train.steps={STEPS}", f"prior_train.save_every={SAVE_EVERY}",
             "prior_train.log_every=1", f"prior_train.eval_every={EVAL_EVERY}", "prior_train.eval_batches=2",
             "prior_train.caption_dropout=0.2", "mesh.ici_parallelism=2,2,2"]
TIMEOUT = 240  # seconds per launch (a launch takes 30-70 s on 2 cores shared with other jobs)
COMPARED = ("loss", "text_loss", "image_loss", "grad_norm", "lr_scale", "eval/text_loss", "eval/image_loss",
            "eval/image_loss_heldout", "eval/image_loss_in_distribution")


def _env(devices: int, cache: Path) -> dict:
    # A compilation cache shared by the launches of this test: the restarted hosts reuse the first launch's
    # executables (about a third of the CPU time on 2 cores); it changes nothing that is compared.
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo", "TF_CPP_MIN_LOG_LEVEL": "2",
            "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _command(data: Path, out: Path, *multihost: str) -> list[str]:
    sets = [arg for o in OVERRIDES for arg in ("--set", o)]
    return [sys.executable, WORKER, "--data", str(data), "--out", str(out), *sets, *multihost]


def _launch_hosts(data: Path, out: Path, cache: Path, processes: int = 2) -> list[subprocess.Popen]:
    coordinator = f"localhost:{portpicker.pick_unused_port()}"
    return [subprocess.Popen(_command(data, out, "--coordinator", coordinator, "--num-processes", str(processes),
                                      "--process-id", str(i)),
                             env=_env(8 // processes, cache), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]


def _finish(procs: list[subprocess.Popen], deadline: float) -> list[tuple[dict, str]]:
    """Waits for every process (killing all on a timeout); returns each one's JSON result and stderr."""
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(deadline - time.time(), 1))
            outputs.append((out, err))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"a simulated host did not finish within {TIMEOUT} s")
    for i, (proc, (_, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"process {i} exited {proc.returncode}:\n{err[-4000:]}"
    return [(json.loads(out.strip().splitlines()[-1]), err) for out, err in outputs]


def _rows(run_dir: Path) -> dict[tuple[int, str], float]:
    """{(step, metric): value} of the compared metrics in metrics.jsonl (each step logged exactly once)."""
    values: dict[tuple[int, str], float] = {}
    for line in (run_dir / "prior" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key in COMPARED:
            if key in row:
                assert (row["step"], key) not in values, f"step {row['step']} {key} logged twice"
                values[row["step"], key] = row[key]
    return values


def _final_params(run_dir: Path) -> tuple[int, dict[str, np.ndarray]]:
    """The latest checkpoint's step and {leaf path: array}, restored onto one device of this single process (a target is
    needed: Orbax refuses to restore a 2-process checkpoint into its own recorded topology here)."""
    import orbax.checkpoint as ocp

    from dalle_jax.train.checkpoint import Checkpointer

    checkpoints = Checkpointer(run_dir / "prior" / "checkpoints", save_every=1)
    step = checkpoints.latest_step()
    with ocp.StandardCheckpointer() as reader:
        metadata = reader.metadata(checkpoints.step_directory(step) / "state").item_metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
    restored = checkpoints.restore(step, target)  # content fingerprints checked too
    checkpoints.close()
    leaves = jax.tree_util.tree_flatten_with_path(restored.state)[0]
    return step, {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    return make_token_data(tmp_path_factory.mktemp("multihost_data"))


def test_two_hosts_with_sigterm_and_restart_equal_one_process(token_data, tmp_path):
    # Reference: one process, 8 devices, uninterrupted.
    started, cache = time.time(), tmp_path / "compilation_cache"
    single = tmp_path / "single"
    reference = subprocess.run(_command(token_data, single), env=_env(8, cache), capture_output=True, text=True,
                               timeout=TIMEOUT)
    assert reference.returncode == 0, reference.stderr[-4000:]
    assert json.loads(reference.stdout.strip().splitlines()[-1])["step"] == STEPS
    print(f"single process: {time.time() - started:.0f} s")

    # Two hosts; SIGTERM to process 1 (which writes no metrics) once step 3 is logged: both must save the same
    # agreed step and exit 0.
    multi = tmp_path / "multi"
    procs = _launch_hosts(token_data, multi, cache)
    metrics, deadline = multi / "prior" / "metrics.jsonl", time.time() + TIMEOUT
    while time.time() < deadline and all(p.poll() is None for p in procs):
        if metrics.exists() and any(json.loads(line)["step"] >= 3 for line in metrics.read_text().splitlines()):
            procs[1].send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    first = _finish(procs, deadline)
    stopped = {result["step"] for result, _ in first}
    assert len(stopped) == 1, f"the hosts stopped at different steps: {stopped}"
    stopped_at = stopped.pop()
    assert 3 <= stopped_at < STEPS, f"expected a stop between 3 and {STEPS}, got {stopped_at}"
    assert all(r["preempted"] and r["processes"] == 2 and r["devices"] == 8 for r, _ in first), first
    assert _final_params(multi)[0] == stopped_at  # the agreed step was saved (by both hosts' shards)
    print(f"2 hosts, SIGTERM, stopped at step {stopped_at}: {time.time() - started:.0f} s")

    # Restart both: resume from the checkpoint (parameters, optimizer, EMA, data position) to the end.
    second = _finish(_launch_hosts(token_data, multi, cache), time.time() + TIMEOUT)
    for result, err in second:
        assert result["step"] == STEPS and not result["preempted"]
        assert f"resumed from step {stopped_at}" in err
    print(f"2 hosts resumed to step {STEPS}: {time.time() - started:.0f} s")

    expected, actual = _rows(single), _rows(multi)
    assert set(actual) == set(expected)
    assert {step for step, key in expected if key == "eval/image_loss"} == {5, 10}
    for key in sorted(expected):
        np.testing.assert_allclose(actual[key], expected[key], rtol=1e-5, err_msg=f"step {key[0]} {key[1]}")

    step_a, state_a = _final_params(single)
    step_b, state_b = _final_params(multi)
    assert step_a == step_b == STEPS
    assert state_a.keys() == state_b.keys()
    for name, a in state_a.items():  # params, EMA, Adam moments, step, key
        if name.endswith("['layers']['bk']"):
            # The key bias adds the same q.bk to every logit of a query, so softmax makes its gradient exactly 0;
            # what it gets is rounding noise (~1e-13, normalised by Adam to ~1e-6 steps), different under any
            # change of reduction order. Checked to stay noise instead of compared.
            assert np.abs(a).max() < 1e-5 and np.abs(state_b[name]).max() < 1e-5, name
            continue
        # rtol 1e-5, and an atol of 1e-5 of the leaf's largest value for elements that cross zero (the largest
        # deviation seen is 4e-7 of that scale; a wrong batch or a missed step would be O(1) of it).
        scale = float(np.abs(a).max())
        np.testing.assert_allclose(state_b[name], a, rtol=1e-5, atol=1e-5 * scale, err_msg=name)


def test_distributed_flags_all_or_none(monkeypatch):
    import argparse

    from dalle_jax import distributed
    from dalle_jax.commands.common import add_distributed_args

    parser = argparse.ArgumentParser()
    add_distributed_args(parser)
    args = parser.parse_args(["--coordinator", "10.0.0.1:1234", "--num-processes", "4", "--process-id", "3"])
    assert (args.coordinator, args.num_processes, args.process_id) == ("10.0.0.1:1234", 4, 3)
    with pytest.raises(ValueError, match="--coordinator given without --num-processes, --process-id"):
        distributed.initialize("localhost:1234")
    with pytest.raises(ValueError, match="--process-id 2 must be in 0 .. --num-processes - 1"):
        distributed.initialize("localhost:1234", 2, 2)
    monkeypatch.delenv(distributed.ENV_VAR, raising=False)
    assert distributed.initialize() is False  # a single process: nothing to join
    assert distributed.is_main()
    distributed.barrier("single_process_noop")
    distributed.check_same_on_all_hosts({"next_index": 3}, "state")
