"""metrics.jsonl: a resumed run drops the rows past its checkpoint, so no step is logged twice."""

import json

import numpy as np
import pytest

from dalle_jax.train.metrics import MetricWriter, read_metrics


def test_drop_after_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    rng = np.random.default_rng()
    writer = MetricWriter(tmp_path, tensorboard=False)
    logged = {step: float(rng.normal()) for step in (5, 10, 15, 20)}
    for step, loss in logged.items():
        writer.scalars(step, {"loss": loss})
    writer.scalars(10, {"eval/loss": 1.5})  # an eval row of a kept step
    assert writer.drop_after(10) == 2  # steps 15 and 20: a crash after logging them, before saving
    rows = read_metrics(tmp_path)
    assert [(r["step"], r.get("loss")) for r in rows] == [(5, logged[5]), (10, logged[10]), (10, None)]
    assert writer.drop_after(10) == 0 and len(read_metrics(tmp_path)) == 3
    writer.scalars(15, {"loss": 0.25})  # the resumed run logs step 15 once
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 10, 15]
    assert MetricWriter(tmp_path / "new", tensorboard=False).drop_after(0) == 0  # no file yet


def _tensorboard_scalars(run_dir, tag: str) -> dict[int, float]:
    """What the TensorBoard server shows: its own event reader, restart purging included."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir / "tensorboard"), purge_orphaned_data=True)
    accumulator.Reload()
    return {event.step: event.value for event in accumulator.Scalars(tag)}


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path):
    rng = np.random.default_rng()
    first = MetricWriter(tmp_path)
    crashed = {step: float(rng.normal()) for step in (5, 10, 15, 20)}
    for step, loss in crashed.items():
        first.scalars(step, {"loss": loss, "lr": 0.1})
    first.close()  # the process dies after logging 15 and 20; its last checkpoint is step 10
    assert _tensorboard_scalars(tmp_path, "loss") == pytest.approx(crashed)

    resumed = MetricWriter(tmp_path)
    resumed.drop_after(10)
    redone = {step: float(rng.normal()) for step in (15, 20, 25)}
    for step, loss in redone.items():
        resumed.scalars(step, {"loss": loss})
    resumed.close()
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2  # one event file per session
    assert _tensorboard_scalars(tmp_path, "loss") == pytest.approx({5: crashed[5], 10: crashed[10], **redone})
    assert sorted(_tensorboard_scalars(tmp_path, "lr")) == [5, 10]
