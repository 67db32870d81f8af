"""`dalle-jax train`: your own captioned images through every stage into one run directory, then a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from dalle_jax import config as config_lib
from dalle_jax import runs
from dalle_jax.commands.common import add_distributed_args
from dalle_jax.commands.data import add_shard_build_args
from dalle_jax.demo import own_data
from dalle_jax.errors import InputError

EPILOG = """\
SRC is any of:
  a folder of images with name.txt captions beside them (or --manifest captions.jsonl / .tsv)
  web-dataset .tar shards as img2dataset writes them (KEY.jpg + KEY.txt [+ KEY.json]), or a folder of them
  .parquet files with image bytes and a caption column (img2dataset, HF datasets exports), or a folder of them
  a dataset built before (its version directory, or the --out of `dalle-jax data emoji|shapes|folder|shards`
  when that holds exactly one)

examples:
  dalle-jax train --data ~/photos --out runs/photos --preset small
  dalle-jax train --data ~/cc3m/shards/ --out runs/cc3m --preset small --workers 8
  dalle-jax train --data ~/photos --out runs/photos256 --dvae converted/openai --set data.image_size=256
  dalle-jax train --data ~/more_photos --out runs/tuned --init-from runs/photos
  dalle-jax data emoji --out runs/emoji_data && dalle-jax train --data runs/emoji_data --out runs/emoji
afterwards:
  dalle-jax sample --run runs/photos --prompt "a red bicycle"      dalle-jax serve --run runs/photos
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train every stage on your own captioned images (folder, tar shards, parquet) and report",
        description=own_data.__doc__.split("\n\n", 1)[1], epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, metavar="SRC", help="your images and captions (see below)")
    parser.add_argument("--out", required=True, metavar="RUN", help="run directory; rerun the command to resume")
    parser.add_argument("--preset", default="small", choices=sorted(config_lib.PRESETS),
                        help="model and training sizes (default small: this 2-core CPU; 1b / paper_12b: TPU slices)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config value of the preset (repeatable)")
    parser.add_argument("--dvae", metavar="DIR", help="use this dVAE instead of training one: a dVAE run, or the "
                        "OpenAI dVAE converted by `dalle-jax convert openai-dvae` (256 px -> 32x32 of 8192)")
    parser.add_argument("--init-from", metavar="RUN", help="fine-tune: start the prior and CLIP from RUN's weights "
                        "(fresh optimizer) with RUN's tokenizer and dVAE")
    parser.add_argument("--seed", type=int, default=0, help="seed of every training stage and of sampling")
    build = parser.add_argument_group("building the dataset from SRC")
    add_shard_build_args(build)
    build.add_argument("--manifest", metavar="FILE", help="folder SRC: JSONL/TSV captions instead of name.txt")
    parser.add_argument("--samples", type=int, default=16, metavar="N",
                        help="samples per validation caption in the report, CLIP-best kept (default 16)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_distributed_args(parser)
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    if args.workers < 1 or args.samples < 1:
        raise InputError(f"--workers {args.workers} and --samples {args.samples} must be at least 1")
    if args.init_from and args.dvae:
        raise InputError("--init-from brings its run's dVAE (the prior's tokens must keep their meaning); "
                         "drop --dvae, or drop --init-from to train a new prior on that dVAE")
    sets = [f"{section}.seed={args.seed}" for section in ("dvae_train", "prior_train", "clip_train")]
    config = config_lib.resolve(args.preset, sets + list(args.set))
    dvae = args.dvae
    if args.init_from:
        for stage in ("prior", "clip"):
            runs.find_model_dir(args.init_from, stage)  # FileNotFoundError names what is missing
        dvae = str(runs.find_model_dir(args.init_from, "dvae").resolve())
    options = own_data.BuildOptions(args.validation_fraction, args.workers, args.image_column, args.caption_column,
                                    args.manifest)
    run = own_data.OwnDataRun(config, Path(args.out), args.seed, progress=not args.quiet, num_samples=args.samples,
                              source=args.data, dvae_dir=dvae, init_from=args.init_from, build_options=options)
    report = run.run_all()
    print(f"train: done in {report['wall_s']['total']:.0f} s -> {Path(args.out) / 'report.md'}")
    return 0
