"""`dalle-jax tokenizer train`: byte-level BPE on a dataset's captions -> one tokenizer.json."""

from __future__ import annotations

import argparse

import numpy as np

from dalle_jax import runs
from dalle_jax.data.tokenizer import PAD_MODES, TextTokenizer, captions_from_dataset
from dalle_jax.errors import DatasetError, InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``tokenizer train`` to the ``dalle-jax`` command line."""
    parser = subparsers.add_parser(
        "tokenizer",
        help="train the BPE text tokenizer",
        description="Text tokenizer commands.",
    )
    commands = parser.add_subparsers(dest="tokenizer_command", required=True)
    train = commands.add_parser(
        "train",
        help="train byte-level BPE on a dataset's captions and write tokenizer.json",
        description=(
            "Train a byte-level BPE tokenizer (NFKC + lowercase) on the captions of a TFDS dataset split\n"
            "and write it, with text length, pad mode and BPE-dropout, to one JSON file (--out).\n"
            "Prints the vocab size, tokens per caption and how many captions text_len would truncate."
        ),
        epilog=(
            "example:\n  dalle-jax tokenizer train --data data/shapes/1.0.0 --out runs/shapes/tokenizer.json "
            "--vocab-size 1024 --text-len 32"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--data", required=True,
                       help="TFDS dataset version directory (has dataset_info.json), or a directory above exactly one")
    train.add_argument("--split", default="train", help="split to read captions from (default: train)")
    train.add_argument("--out", required=True, help="tokenizer file to write, e.g. RUN_DIR/tokenizer.json")
    train.add_argument(
        "--vocab-size", type=int, required=True, help="max BPE tokens incl. 256 byte symbols (paper: 16384)"
    )
    train.add_argument(
        "--text-len", type=int, required=True, help="tokens per caption after pad/truncate (paper: 256)"
    )
    train.add_argument(
        "--pad-mode",
        choices=PAD_MODES,
        default="per_position",
        help="per_position: one pad id per text position (paper); shared: one pad id (ablation)",
    )
    train.add_argument("--dropout", type=float, default=0.1, help="BPE-dropout in training (default: 0.1)")
    train.add_argument("--min-frequency", type=int, default=1, help="min pair count for a merge (default: 1)")
    train.add_argument("--no-lowercase", action="store_true", help="keep case (the paper lowercases)")
    train.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    if args.vocab_size < 256:
        raise InputError(f"--vocab-size {args.vocab_size} must be at least 256 (the byte alphabet); the paper's is "
                         "16384")
    if args.text_len < 1:
        raise InputError(f"--text-len {args.text_len} must be at least 1")
    if not 0 <= args.dropout < 1:
        raise InputError(f"--dropout {args.dropout} must be in [0, 1)")
    if args.min_frequency < 1:
        raise InputError(f"--min-frequency {args.min_frequency} must be at least 1")
    captions = captions_from_dataset(str(runs.find_dataset_dir(args.data)), args.split)
    if not captions:
        raise DatasetError(f"no captions in split {args.split!r} of {args.data}")
    tokenizer = TextTokenizer.train(
        captions,
        vocab_size=args.vocab_size,
        text_len=args.text_len,
        pad_mode=args.pad_mode,
        dropout=args.dropout,
        min_frequency=args.min_frequency,
        lowercase=not args.no_lowercase,
    )
    tokenizer.save(args.out)
    lengths = np.array([len(ids) for ids in tokenizer.encode_unpadded(captions)])
    num_truncated = int((lengths > tokenizer.text_len).sum())
    note = (
        "" if tokenizer.vocab_size == args.vocab_size else f" (requested {args.vocab_size}; corpus too small)"
    )
    print(f"wrote {args.out}")
    print(f"vocab size: {tokenizer.vocab_size}{note}; embedding rows: {tokenizer.embedding_size}")
    print(f"captions: {len(captions)}; tokens per caption: mean {lengths.mean():.2f}, max {lengths.max()}")
    fraction = num_truncated / len(lengths)
    print(f"would be truncated at text_len={tokenizer.text_len}: {num_truncated} ({fraction:.2%})")
    return 0


