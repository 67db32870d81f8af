"""Metrics to JSONL and TensorBoard event files (tensorboardX: no TensorFlow), written by process 0 only."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np


class MetricWriter:
    """Appends `{"step", "time", **scalars}` lines to `run_dir/metrics.jsonl` and TensorBoard scalars/images.

    On hosts other than process 0 every method is a no-op, so callers need no `if`.
    """

    def __init__(self, run_dir: str | Path, *, prefix: str = "", tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.prefix = prefix
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def scalars(self, step: int, values: Mapping[str, Any]) -> dict[str, float]:
        clean = {f"{self.prefix}{k}": float(np.asarray(v)) for k, v in values.items()}
        if not self.enabled:
            return clean
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(),
                                **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}) + "\n")
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, int(step))
        return clean

    def drop_after(self, step: int) -> int:
        """Removes the metrics.jsonl rows of steps after `step` (a resumed run logs those steps again); returns
        how many were removed."""
        if not self.enabled or not self.path.is_file():
            return 0
        rows = self.path.read_text().splitlines(keepends=True)
        kept = [row for row in rows if not row.strip() or json.loads(row).get("step", 0) <= step]
        if len(kept) != len(rows):
            self.path.write_text("".join(kept))
        return len(rows) - len(kept)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """uint8 (H, W, 3) image, e.g. a reconstruction grid."""
        if self.enabled and self._tb is not None:
            self._tb.add_image(f"{self.prefix}{tag}", np.asarray(image), int(step), dataformats="HWC")

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
