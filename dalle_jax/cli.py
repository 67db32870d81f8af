"""`dalle-jax`: the entry point. One sub-command per stage (`dalle_jax.commands`); each writes into a directory
and can be rerun. Errors a user can fix (`dalle_jax.errors.DalleJaxError`, a missing file) print as one line, exit 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys

from dalle_jax import distributed, hostenv
from dalle_jax.commands import (
    aot,
    config,
    convert,
    data,
    demo,
    encode,
    experiment,
    info,
    reconstruct,
    sample,
    serve,
    tokenizer,
    train,
    train_clip,
    train_dvae,
    train_prior,
)
from dalle_jax.errors import DalleJaxError

DESCRIPTION = """\
DALL-E in JAX/Flax: a discrete VAE turns images into tokens, a sparse-attention transformer learns
[caption tokens | image tokens], samples are reranked by a CLIP-style model.

Stages (each reads a config preset, writes into a directory, and can be resumed):
  demo             the main job: every stage below on the built-in shapes data, then a report
  train            every stage on your own images (folder, tar shards, parquet), then a report
  experiment       the paper's ablations: declared sweeps of these stages, with intervals and verdicts
  data shapes      build the built-in captioned-shapes dataset (TFDS array_record)
  data folder      build a dataset from your own folder of images + captions
  data shards      build a dataset from web-dataset tar shards or parquet files (img2dataset, LAION)
  data show        draw a dataset split as a PNG grid with captions
  tokenizer train  train the BPE caption tokenizer on a dataset
  train-dvae       train the discrete VAE (stage 1); rerun to resume
  encode           encode a dataset into dVAE tokens (the prior's training data)
  train-prior      train the sparse transformer prior on [caption | image tokens] (stage 2)
  train-clip       train the CLIP-style reranker on images + captions
  sample           captions -> images: prior samples decoded by the dVAE, reranked by CLIP
  serve            a web page over a run: caption in, reranked images out (Gradio; the serve extra)
  info             parameter count, per-device memory and mask schedule of a preset's prior
  aot              compile the prior's train step / sampler for a TPU slice on this host (memory vs HBM)
  reconstruct      encode + decode image files with a dVAE, side by side
  convert openai-dvae  import OpenAI's released dVAE without executing its pickles
  config           print a preset's resolved config (with --set overrides)
"""

EPILOG = """\
examples:
  dalle-jax data shapes --out runs/data --num 2000
  dalle-jax data show runs/data --split validation --out runs/shapes.png
  dalle-jax tokenizer train --data runs/data --out runs/tokenizer.json --vocab-size 512 --text-len 24
  dalle-jax train-dvae --run runs/demo --preset demo
  dalle-jax encode --run runs/demo
  dalle-jax train-prior --data runs/demo/tokens --tokenizer runs/demo/tokenizer.json --out runs/demo
  dalle-jax info --preset paper_12b --devices 256
  dalle-jax config --preset demo --set dvae_train.batch_size=64

`dalle-jax <stage> --help` explains each stage.
"""

# In the order `--help` lists them.
COMMANDS = (data, demo, train, experiment, tokenizer, train_dvae, encode, train_prior, train_clip, sample, serve, info,
            aot, reconstruct, convert, config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle-jax", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", metavar="<stage>")
    for command in COMMANDS:
        command.register(stages)
    return parser


def _setup_logging() -> None:
    """Our INFO lines (resume, fallbacks, summaries) to stderr, whatever absl did to the root logger."""
    logger = logging.getLogger("dalle_jax")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class _StderrHandler(logging.StreamHandler):
    """Writes each record to `sys.stderr` as it is when the record is emitted, not as it was when the handler was
    made: `main` may run several times in one process (tests, notebooks), each time with another stderr."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the current stderr is used instead
        pass


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        # A stage group without its command: show that group's help.
        parser.parse_args((argv or sys.argv[1:]) + ["--help"])
        return 2
    try:  # before any JAX call (building the parser makes none, so backends stay uninitialised)
        joined = distributed.initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                                        getattr(args, "process_id", None))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if joined and not distributed.is_main():  # hosts other than 0 print warnings only
        logging.getLogger("dalle_jax").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (DalleJaxError, FileNotFoundError) as e:  # the message names the field or file and the fix
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        # Outside a checkpoint save (which says more, see train.checkpoint): metrics, images, samples, datasets.
        print(f"error: disk full writing {e.filename or 'output'}: free space and rerun the same command (a "
              "training command resumes from its last checkpoint)", file=sys.stderr)
        return 2


def entry() -> int:
    """The `dalle-jax` console script: `main` in a process whose large buffers use huge pages (see hostenv)."""
    hostenv.reexec_with_hugepages()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
