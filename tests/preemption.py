"""Preempting a training command the way a TPU VM does: SIGTERM once its metrics show a given step."""

import json
import signal
import subprocess
import time
from pathlib import Path


def sigterm_after_step(command: list[str], env: dict, metrics: Path, step: int = 5, wait_s: float = 240) -> str:
    """Runs `command`, sends SIGTERM as soon as `metrics` (a metrics.jsonl) logs `step`, waits for a clean exit
    (return code 0, the checkpoint written) and returns its stderr."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + wait_s
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines()):
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return err
