"""`dalle-jax`: one command, one sub-command per stage. Each stage writes into a directory and can be rerun."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = """\
DALL-E in JAX/Flax: a discrete VAE turns images into tokens, a sparse-attention transformer learns
[caption tokens | image tokens], samples are reranked by a CLIP-style model.

Stages (each reads a config preset, writes into a directory, and can be resumed):
  demo             the main job: every stage below on the built-in shapes data, then a report
  data shapes      build the built-in captioned-shapes dataset (TFDS array_record)
  data folder      build a dataset from your own folder of images + captions
  data show        draw a dataset split as a PNG grid with captions
  tokenizer train  train the BPE caption tokenizer on a dataset
  train-dvae       train the discrete VAE (stage 1); rerun to resume
  encode           encode a dataset into dVAE tokens (the prior's training data)
  train-prior      train the sparse transformer prior on [caption | image tokens] (stage 2)
  train-clip       train the CLIP-style reranker on images + captions
  sample           captions -> images: prior samples decoded by the dVAE, reranked by CLIP
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


def find_dataset_dir(path: str | Path) -> Path:
    """Accepts a dataset version dir or any directory above exactly one prepared dataset."""
    path = Path(path)
    if (path / "dataset_info.json").is_file():
        return path
    found = sorted(p.parent for p in path.rglob("dataset_info.json")) if path.is_dir() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise SystemExit(f"error: no prepared dataset under {path} (no dataset_info.json); build one with "
                         f"`dalle-jax data shapes --out {path}`")
    listing = "\n  ".join(str(p) for p in found)
    raise SystemExit(f"error: several datasets under {path}; pass one of:\n  {listing}")


def _show(args: argparse.Namespace) -> int:
    from dalle_jax.data.pipeline import caption_text, open_split
    from dalle_jax.images import save_grid

    source = open_split(find_dataset_dir(args.dataset), args.split)
    count = min(args.num, len(source))
    examples = [source[i] for i in range(count)]
    examples.sort(key=lambda e: int(e["id"]))
    captions = [caption_text(e["caption"]) for e in examples]
    out = save_grid(args.out, [e["image"] for e in examples], captions, columns=args.columns, scale=args.scale)
    print(f"wrote {out} ({count} of {len(source)} {args.split} examples)")
    return 0


def _config(args: argparse.Namespace) -> int:
    from dalle_jax import config as config_lib

    cfg = config_lib.resolve(args.preset, args.set)
    if args.out:
        config_lib.save_config(cfg, args.out)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(config_lib.to_dict(cfg), indent=2))
    return 0


def add_config_args(parser: argparse.ArgumentParser, default_preset: str = "demo") -> None:
    """--preset / --set, shared by every stage that reads a config."""
    from dalle_jax.config import PRESETS

    parser.add_argument("--preset", default=default_preset, choices=sorted(PRESETS),
                        help=f"named config (default {default_preset})")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config value, e.g. --set dvae_train.batch_size=64 (repeatable)")
    from dalle_jax.distributed import add_distributed_args

    add_distributed_args(parser)


def add_trainer_parser(subparsers: Any, name: str, *, data_help: str, out_help: str, func: Any,
                       **parser_kwargs: Any) -> argparse.ArgumentParser:
    """A stage that trains on a dataset with the run's tokenizer: --data, --out, --tokenizer, --quiet, config."""
    parser = subparsers.add_parser(name, formatter_class=argparse.RawDescriptionHelpFormatter, **parser_kwargs)
    parser.add_argument("--data", required=True, help=data_help)
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("--tokenizer", help="tokenizer JSON (default OUT/tokenizer.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_args(parser)
    parser.set_defaults(func=func)
    return parser


def run_trainer(args: argparse.Namespace, train: Any, label: str, summary_keys: tuple[str, ...]) -> int:
    """Runs `train(config, dataset_dir, tokenizer_path, out, progress=)` from the parsed arguments and prints
    its final step and metrics. A preempted run saved its checkpoint (rerun to resume), so it also returns 0."""
    from dalle_jax import config as config_lib

    config = config_lib.resolve(args.preset, args.set)
    tokenizer = args.tokenizer or str(Path(args.out) / "tokenizer.json")
    result = train(config, find_dataset_dir(args.data), tokenizer, args.out, progress=not args.quiet)
    m = result["metrics"]
    summary = ", ".join(f"{k} {m[k]:.4f}" for k in summary_keys if k in m)
    print(f"{label}: step {result['step']} -> {result['run_dir']}" + (f" ({summary})" if summary else ""))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from dalle_jax import aot, demo, encode, generate, info
    from dalle_jax.convert import openai_dvae
    from dalle_jax.data import folder, shapes, tokenizer
    from dalle_jax.train import clip as train_clip
    from dalle_jax.train import dvae as train_dvae
    from dalle_jax.train import prior as train_prior

    parser = argparse.ArgumentParser(prog="dalle-jax", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    stages = parser.add_subparsers(dest="stage", metavar="<stage>")

    data = stages.add_parser("data", help="build or look at datasets",
                             description="Build TFDS datasets (array_record, no TensorFlow) or draw them.")
    data_commands = data.add_subparsers(dest="data_command", metavar="<command>")
    shapes.register_cli(data_commands)
    folder.register_cli(data_commands)
    show = data_commands.add_parser(
        "show", help="draw a split as a PNG grid with captions",
        description="Draws the first N examples of a split (in id order) with their captions into a PNG.",
        epilog="example: dalle-jax data show runs/data --split validation --num 32 --out runs/shapes.png")
    show.add_argument("dataset", help="dataset version dir, or a directory holding exactly one dataset")
    show.add_argument("--split", default="train")
    show.add_argument("--num", type=int, default=32, help="examples to draw (default 32)")
    show.add_argument("--columns", type=int, default=8)
    show.add_argument("--scale", type=int, default=2, help="pixel upscaling for readability (default 2)")
    show.add_argument("--out", required=True, help="PNG file to write")
    show.set_defaults(func=_show)

    demo.register_cli(stages)
    tokenizer.register_cli(stages)
    train_dvae.register_cli(stages)
    encode.register_cli(stages)
    train_prior.register_cli(stages)
    train_clip.register_cli(stages)
    generate.register_cli(stages)
    info.register_cli(stages)
    aot.register_cli(stages)
    convert = stages.add_parser("convert", help="import released weights (OpenAI's dVAE)",
                                description="Import released weights into dalle-jax checkpoints, safely.")
    openai_dvae.register_cli(convert.add_subparsers(dest="convert_command", metavar="<source>"))

    config = stages.add_parser("config", help="print or save a preset's resolved config",
                               description="Resolves a preset plus --set overrides, validates it, prints JSON.",
                               epilog="example: dalle-jax config --preset demo --set mesh.ici_parallelism=2,2,2")
    add_config_args(config)
    config.add_argument("--out", help="write config.json here instead of printing")
    config.set_defaults(func=_config)
    return parser


def _setup_logging() -> None:
    """Our INFO lines (resume, fallbacks, summaries) to stderr, whatever absl did to the root logger."""
    import logging

    logger = logging.getLogger("dalle_jax")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    _setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        # A stage group without its command: show that group's help.
        parser.parse_args((argv or sys.argv[1:]) + ["--help"])
        return 2
    from dalle_jax import distributed
    from dalle_jax.errors import DalleJaxError

    try:  # before any JAX call (building the parser makes none, so backends stay uninitialised)
        joined = distributed.initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                                        getattr(args, "process_id", None))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if joined and not distributed.is_main():  # hosts other than 0 print warnings only
        import logging

        logging.getLogger("dalle_jax").setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except DalleJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def entry() -> int:
    """The `dalle-jax` console script: `main` in a process whose large buffers use huge pages (see hostenv)."""
    from dalle_jax import hostenv

    hostenv.reexec_with_hugepages()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
