"""`dalle-jax train-prior` end to end on a small token dataset: outputs, clear errors, and a SIGTERM'd run
that resumes (model, optimizer, EMA and data position) to exactly the uninterrupted result."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from tests.preemption import sigterm_after_step
from tests.token_data import TEXT_LEN, VOCAB, make_token_data

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


@pytest.fixture(scope="module")
def token_data(tmp_path_factory):
    """Shapes captions (incl. held-out pairs in validation) with random image tokens, and a tokenizer."""
    return make_token_data(tmp_path_factory.mktemp("prior_data"))


def _command(data, out, steps, *extra):
    return [sys.executable, "-m", "dalle_jax.cli", "train-prior", "--data", str(data / "tokens"),
            "--tokenizer", str(data / "tokenizer.json"), "--out", str(out), "--preset", "quick", "--quiet",
            "--set", f"text.text_len={TEXT_LEN}", "--set", f"prior_train.steps={steps}",
            "--set", "prior_train.save_every=4", "--set", "prior_train.log_every=1",
            "--set", "prior_train.eval_every=5", "--set", "prior_train.caption_dropout=0.2", *extra]


def _final_params(run_dir):
    from dalle_jax.train.checkpoint import Checkpointer

    ckpt = Checkpointer(run_dir / "prior" / "checkpoints", save_every=1)
    step = ckpt.latest_step()
    restored = ckpt.restore(step, None)
    ckpt.close()
    return step, jax.tree.leaves(restored.state)


def test_train_prior_writes_metrics_curve_and_resumes_exactly(token_data, tmp_path):
    steps = 10
    straight = subprocess.run(_command(token_data, tmp_path / "straight", steps), env=ENV, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert "prior: step 10" in straight.stdout
    rows = [json.loads(line) for line in (tmp_path / "straight" / "prior" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/image_loss" in r]
    assert [r["step"] for r in evals] == [5, 10]
    for r in evals:  # random tokens: the image loss stays near uniform, and both groups are reported
        assert abs(r["eval/image_loss"] - np.log(VOCAB)) < 1.0
        assert "eval/image_loss_heldout" in r and "eval/image_loss_in_distribution" in r
    assert all(r["tokens_per_s"] > 0 for r in rows if "tokens_per_s" in r)
    curve = Image.open(tmp_path / "straight" / "prior" / "loss_curve.png")
    assert curve.size[0] > 100
    assert (tmp_path / "straight" / "prior" / "tokenizer.json").is_file()

    interrupted = tmp_path / "interrupted"
    metrics = interrupted / "prior" / "metrics.jsonl"
    err = sigterm_after_step(_command(token_data, interrupted, steps), ENV, metrics)
    stopped_at, _ = _final_params(interrupted)
    assert 5 <= stopped_at < steps, f"expected a stop between 5 and {steps}, got {stopped_at}"
    assert "stop requested" in err

    resumed = subprocess.run(_command(token_data, interrupted, steps), env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {stopped_at}" in resumed.stderr
    step_a, state_a = _final_params(tmp_path / "straight")
    step_b, state_b = _final_params(interrupted)
    assert step_a == step_b == steps
    for a, b in zip(state_a, state_b, strict=True):
        np.testing.assert_array_equal(a, b)  # params, EMA, Adam moments, step, key: bitwise on CPU


def test_mismatched_token_grid_is_refused_before_compiling(token_data, tmp_path):
    result = subprocess.run(_command(token_data, tmp_path / "bad", 2, "--set", "data.image_size=64"), env=ENV,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "(8, 8) grids" in result.stderr and "16x16" in result.stderr


def test_init_from_starts_at_the_source_parameters_and_refuses_a_mismatch(token_data, tmp_path):
    """A fine-tuned prior starts from the source's latest parameters with a fresh optimizer: its first step runs at
    warm-up learning rate 0, so after it the parameters are still bitwise the source's (a fresh init would differ
    everywhere). A model that does not fit is one line, exit 2, before anything is written."""
    from dalle_jax.train.checkpoint import Checkpointer

    source = tmp_path / "source"
    done = subprocess.run(_command(token_data, source, 3), env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    tuned = tmp_path / "tuned"
    done = subprocess.run(_command(token_data, tuned, 1, "--set", f"prior_train.init_from={source}"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    def state(run):
        ckpt = Checkpointer(run / "prior" / "checkpoints", save_every=1, read_only=True)
        restored = ckpt.restore(ckpt.latest_step(), None)
        ckpt.close()
        return restored.state

    before, after = state(source), state(tuned)
    assert int(after["step"]) == 1 and int(before["step"]) == 3
    for a, b in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"]), strict=True):
        np.testing.assert_array_equal(a, b)
    counts = [leaf for leaf in jax.tree.leaves(after["opt_state"]) if np.ndim(leaf) == 0]
    assert counts and all(int(c) <= 1 for c in counts)  # Adam's count restarted: a fresh optimizer

    bad = tmp_path / "bad"
    done = subprocess.run(_command(token_data, bad, 1, "--set", f"prior_train.init_from={source}",
                                   "--set", "prior.d_model=32"), env=ENV, capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert "prior_train.init_from=" in lines[0] and "there and" in lines[0] and "prior_config.json" in lines[0]
    assert not (bad / "prior" / "checkpoints").exists() and not (bad / "prior" / "config.json").exists()
