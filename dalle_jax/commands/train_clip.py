"""`dalle-jax train-clip`: the CLIP-style reranker on images + captions, into OUT/clip."""

from __future__ import annotations

import argparse

from dalle_jax.commands.common import add_trainer_parser, run_trainer
from dalle_jax.train.clip import train_clip

SUMMARY = ("loss", "eval/retrieval_top1", "eval/retrieval_top1_heldout", "eval/image_to_text_top1")


def register(subparsers: argparse._SubParsersAction) -> None:
    add_trainer_parser(
        subparsers, "train-clip", help="train the CLIP-style reranker on images + captions",
        description="Trains a small dual encoder (ViT image tower, transformer text tower over the run's BPE ids) "
                    "with a symmetric InfoNCE loss and a learned temperature; the sampler uses it to rerank. "
                    "Evaluates zero-shot caption -> image retrieval among clip_train.retrieval_batch validation "
                    "pairs, in-distribution and on held-out shapes combinations. Checkpoints, metrics.jsonl, "
                    "TensorBoard events, loss/retrieval curves go to OUT/clip; rerunning resumes.",
        epilog="example: dalle-jax train-clip --data runs/data --tokenizer runs/tokenizer.json --out runs/demo "
               "--preset demo",
        data_help="image dataset (`dalle-jax data shapes` / `data folder`) or a dir above it",
        out_help="run directory; the reranker goes to OUT/clip",
        func=lambda args: run_trainer(args, train_clip, "clip", SUMMARY))
