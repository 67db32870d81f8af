"""`dalle-jax train-prior`: stage 2, the sparse transformer prior on [caption | image tokens], into OUT/prior."""

from __future__ import annotations

import argparse

from dalle_jax.commands.common import add_trainer_parser, run_trainer
from dalle_jax.train.prior import train_prior

SUMMARY = ("loss", "eval/image_loss", "eval/image_loss_heldout", "eval/text_loss")  # printed at the end


def register(subparsers: argparse._SubParsersAction) -> None:
    add_trainer_parser(
        subparsers, "train-prior", help="train the transformer prior (stage 2)",
        description="Trains the sparse transformer on [caption BPE ids | dVAE image tokens] with the paper's "
                    "recipe (weighted CE 1/8 text, 7/8 image; AdamW 0.9/0.96, wd 4.5e-2; clip 4; warm-up then "
                    "lr halving on plateaus; EMA 0.99). Checkpoints, metrics.jsonl, TensorBoard events and "
                    "loss_curve.png go to OUT/prior; rerunning resumes from the last checkpoint.",
        epilog="example: dalle-jax train-prior --data runs/demo/tokens --tokenizer runs/demo/tokenizer.json "
               "--preset demo --out runs/demo",
        data_help="token dataset written by `dalle-jax encode` (or a dir above it)",
        out_help="run directory; the prior goes to OUT/prior",
        func=lambda args: run_trainer(args, train_prior, "prior", SUMMARY))
