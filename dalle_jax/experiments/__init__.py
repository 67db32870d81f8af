"""Declared, resumable ablation sweeps over the real trainers (`dalle-jax experiment`): spec (what an experiment file
declares), runner (cells sharing upstream stages), evaluate + metrics (what a cell measures), report (intervals,
verdicts, plots)."""

from dalle_jax.experiments.spec import Claim, Experiment

__all__ = ["Claim", "Experiment"]
