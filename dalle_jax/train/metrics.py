"""Metrics to JSONL and TensorBoard event files (tensorboardX's protos: no TensorFlow), written by process 0 only.

Events are written synchronously (tensorboardX's `EventsWriter`, not its `SummaryWriter`, whose background thread and
exit hook turn a full disk into tracebacks after the run has already reported it). A resumed run starts a new event
file with a `SessionLog.START` at the step after its checkpoint, TensorBoard's signal to discard the previous
session's points from that step on, so a resumed curve shows each step once (as metrics.jsonl does).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tensorboardX import summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2


class MetricWriter:
    """Appends `{"step", "time", **scalars}` lines to `run_dir/metrics.jsonl` and TensorBoard scalars.

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
                events = Path(run_dir) / "tensorboard"
                events.mkdir(exist_ok=True)
                # The file name's timestamp is in seconds; the suffix orders two sessions started in one second.
                self._tb = EventsWriter(str(events / "events"), filename_suffix=f".{time.time_ns()}")

    def scalars(self, step: int, values: Mapping[str, Any]) -> dict[str, float]:
        clean = {f"{self.prefix}{k}": float(np.asarray(v)) for k, v in values.items()}
        if not self.enabled:
            return clean
        with self.path.open("a") as f:
            f.write(json.dumps({"step": int(step), "time": time.time(),
                                **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}}) + "\n")
        if self._tb is not None:
            values = [value for k, v in clean.items() for value in summary.scalar(k, v).value]
            self._tb.write_event(event_pb2.Event(wall_time=time.time(), step=int(step),
                                                 summary=summary_pb2.Summary(value=values)))
        return clean

    def drop_after(self, step: int) -> int:
        """A run resumed from `step` logs the later steps again: removes their metrics.jsonl rows (returns how many)
        and tells TensorBoard to discard their events."""
        if not self.enabled:
            return 0
        if self._tb is not None and step > 0:
            self._tb.write_event(event_pb2.Event(wall_time=time.time(), step=int(step) + 1,
                                                 session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
        if not self.path.is_file():
            return 0
        rows = self.path.read_text().splitlines(keepends=True)
        kept = [row for row in rows if not row.strip() or json.loads(row).get("step", 0) <= step]
        if len(kept) != len(rows):
            self.path.write_text("".join(kept))
        return len(rows) - len(kept)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            tb, self._tb = self._tb, None
            tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
