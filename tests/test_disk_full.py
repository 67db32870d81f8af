"""A full disk during training: one `error:` line that names the last complete checkpoint, exit 2, no traceback, and
the same command resumes from that checkpoint to the same final loss as a run that never failed.

The disk is real: a tmpfs mounted for the test (root only: CI runs as root; elsewhere the test skips). A run trained
to step 10 on a roomy disk is copied onto a tmpfs with ~0.6 MiB to spare, then extended to step 20: the step-20
checkpoint (~1.2 MiB) cannot fit. (Orbax's space use while writing varies from run to run, so the run is not
started on the small disk: where step 10 would fail is not fixed.)"""

import os
import shutil
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from dalle_jax.train.metrics import read_metrics

SHORT = ["--preset", "quick", "--set", "dvae_train.save_every=10", "--set", "dvae_train.eval_every=10"]


def _dalle_jax(*args: str, patch_free_space_check: bool = False) -> subprocess.CompletedProcess:
    """The CLI in a fresh interpreter (interpreter shutdown is where Orbax's leftover coroutines used to print)."""
    prologue = ("from dalle_jax.train import checkpoint\n"
                "checkpoint.Checkpointer._check_free_space = lambda *a: None\n") if patch_free_space_check else ""
    code = prologue + "import sys\nfrom dalle_jax.cli import entry\nsys.exit(entry())\n"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    result = _dalle_jax("data", "shapes", "--out", str(out), "--num", "64", "--num-validation", "16", "--num-test",
                        "0", "--image-size", "32")
    assert result.returncode == 0, result.stderr
    return next(line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("dataset: "))


def _mount_tmpfs(path: Path, size_kib: int) -> None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")


def _du_kib(path: Path) -> int:
    return int(subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout.split()[0])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dataset):
    """(a run trained to step 10, the same run extended to 20 without trouble: the reference)."""
    root = tmp_path_factory.mktemp("runs")
    args = ["train-dvae", *SHORT, "--set", f"data.data_dir={dataset}"]
    ten = root / "ten"
    assert _dalle_jax(*args, "--set", "dvae_train.steps=10", "--run", str(ten)).returncode == 0
    reference = root / "reference"
    shutil.copytree(ten, reference, symlinks=True)
    assert _dalle_jax(*args, "--set", "dvae_train.steps=20", "--run", str(reference)).returncode == 0
    return ten, reference


@pytest.fixture
def small_disk(tmp_path, runs):
    """The step-10 run on a tmpfs with ~0.6 MiB free."""
    mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    _mount_tmpfs(mount_point, _du_kib(runs[0]) + 600)
    try:
        shutil.copytree(runs[0], mount_point / "run", symlinks=True)
        yield mount_point / "run"
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _final_loss(run: Path) -> float:
    return [row for row in read_metrics(run / "dvae") if "loss" in row][-1]["loss"]


def _assert_one_line_naming_step_10(result: subprocess.CompletedProcess, run: Path) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()
             and not line.startswith("dvae:")]  # the progress bar
    assert len(lines) == 1, "\n".join(line for line in lines if not line.startswith(" "))[:5000]
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("error: could not save checkpoint step 20")
    assert "disk full" in lines[0]
    assert f"the last complete checkpoint is step 10 ({run / 'dvae' / 'checkpoints' / '10'})" in lines[0]
    assert "rerun the same command to resume" in lines[0]


@pytest.mark.parametrize("failure", ["refused before writing", "failed while writing"])
def test_full_disk_is_one_line_and_the_same_command_resumes(tmp_path, dataset, runs, small_disk, failure):
    args = ["train-dvae", *SHORT, "--set", f"data.data_dir={dataset}", "--set", "dvae_train.steps=20"]
    # "failed while writing": the free-space check is switched off, so Orbax itself hits ENOSPC mid-write, in its
    # background threads (the path a disk filled by another process takes).
    result = _dalle_jax(*args, "--run", str(small_disk), patch_free_space_check=failure == "failed while writing")
    _assert_one_line_naming_step_10(result, small_disk)
    checkpoints = small_disk / "dvae" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["10"]

    # free space (here: move the run to a roomy disk) and rerun the same command
    moved = tmp_path / "moved"
    shutil.copytree(small_disk, moved, symlinks=True)
    resumed = _dalle_jax(*args, "--run", str(moved))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step 10" in resumed.stderr
    assert _final_loss(moved) == pytest.approx(_final_loss(runs[1]), rel=1e-5)
    steps = [row["step"] for row in read_metrics(moved / "dvae") if "loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == 20, steps


def test_the_free_space_check_uses_the_last_checkpoint_size(tmp_path):
    """The need is measured from the last checkpoint on disk, so a compressing format is not refused for its raw
    bytes; and the message says how much is free and needed."""
    code = textwrap.dedent(f"""
        import numpy as np, shutil
        from dalle_jax.train import checkpoint
        from dalle_jax.train.checkpoint import Checkpointer, CheckpointSaveError
        state = {{"w": np.zeros((256, 1024), np.float32)}}  # 1 MiB raw, compresses to almost nothing
        ckpt = Checkpointer({str(tmp_path / 'ckpt')!r}, save_every=1, keep=2, async_save=False)
        ckpt.save(1, state)
        ckpt.wait()
        on_disk = checkpoint._tree_size(ckpt.step_directory(1))
        free = shutil.disk_usage({str(tmp_path)!r}).free
        raw = state["w"].nbytes
        checkpoint.SAVE_HEADROOM_BYTES = free  # needs more than there is
        try:
            ckpt.save(2, state)
        except CheckpointSaveError as e:
            print("REFUSED", e)
        # between the two measures: fits if the need is the size on disk, would not if it were the raw bytes
        checkpoint.SAVE_HEADROOM_BYTES = free - (on_disk + raw) // 2
        print("SAVED", ckpt.save(3, state), on_disk < raw)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "REFUSED could not save checkpoint step 2" in out and "disk full:" in out
    assert "the last complete checkpoint is step 1" in out
    assert "SAVED True True" in out
