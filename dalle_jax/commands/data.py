"""`dalle-jax data shapes | folder | show`: build a dataset (the built-in shapes or your own folder), or draw one."""

from __future__ import annotations

import argparse
import sys

from dalle_jax import runs
from dalle_jax.commands.common import add_distributed_args
from dalle_jax.data import folder, shards
from dalle_jax.data.shapes import SPLITS, TEMPLATES, ShapesSpec, build_shapes, parse_holdout
from dalle_jax.errors import InputError

SHAPES_EPILOG = """\
The `dataset:` directory printed at the end is what `tfds.builder_from_directory` (and the training configs' data
path) accept. Rebuilding with the same options reuses the existing files.

example:
  dalle-jax data shapes --out ~/data --num 20000 --image-size 64 --holdout "red triangle,blue circle"
"""


def register(stages: argparse._SubParsersAction) -> None:
    data = stages.add_parser("data", help="build or look at datasets",
                             description="Build TFDS datasets (array_record, no TensorFlow) or draw them.")
    commands = data.add_subparsers(dest="data_command", metavar="<command>")
    register_shapes(commands)
    register_folder(commands)
    register_shards(commands)
    register_emoji(commands)
    register_show(commands)


# ------------------------------------------------------------------------------------------------ shapes

def register_shapes(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shapes",
        help="build the built-in captioned-shapes dataset (TFDS array_record)",
        description=(
            "Render the captioned-shapes dataset (one or two coloured shapes on white, with captions such as "
            "'a small red circle in the top left' or 'a blue square above an orange cross') and write it as a "
            "TFDS array_record dataset with train/validation/test splits under --out. Held-out colour/shape "
            "pairs never appear in train but do in validation and test."
        ),
        epilog=SHAPES_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = ShapesSpec()
    parser.add_argument("--out", required=True, help="TFDS data directory to write into")
    parser.add_argument("--num", type=int, default=defaults.num_train, help="train examples (%(default)s)")
    parser.add_argument("--num-validation", type=int, default=defaults.num_validation,
                        help="validation examples (%(default)s)")
    parser.add_argument("--num-test", type=int, default=defaults.num_test, help="test examples (%(default)s)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size,
                        help="image side in pixels, >= 16 (%(default)s)")
    parser.add_argument("--holdout", default=",".join(f"{c} {s}" for c, s in defaults.holdout),
                        help="comma-separated '<colour> <shape>' pairs kept out of train, or 'none' "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="example i of a split depends only on it (%(default)s)")
    parser.add_argument("--template-weights", default=",".join(str(w) for w in defaults.template_weights),
                        help=f"weights of the caption templates {', '.join(TEMPLATES)} (default: %(default)s)")
    parser.add_argument("--grid", type=int, default=defaults.grid,
                        help="object corners snap to multiples of this many pixels; set it to the dVAE's "
                             "downsampling factor for one token pattern per object (default: %(default)s = any "
                             "pixel)")
    parser.set_defaults(func=_shapes)


def _shapes(args: argparse.Namespace) -> int:
    import tensorflow_datasets as tfds

    try:
        spec = ShapesSpec(
            image_size=args.image_size,
            num_train=args.num,
            num_validation=args.num_validation,
            num_test=args.num_test,
            holdout=parse_holdout(args.holdout),
            seed=args.seed,
            template_weights=tuple(float(w) for w in args.template_weights.split(",")),
            grid=args.grid,
        )
    except ValueError as error:
        print(f"error: {error}")
        return 2
    path = build_shapes(args.out, spec)
    info = tfds.builder_from_directory(path).info
    print(f"dataset: {path}")
    for split in SPLITS:
        if split in info.splits:
            print(f"  {split}: {info.splits[split].num_examples} examples")
    return 0


# ------------------------------------------------------------------------------------------------ folder

def register_folder(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "folder",
        help="turn a folder of captioned images into a TFDS dataset",
        description=(
            "Turn a folder of images with captions into a TFDS dataset (array_record): SxS RGB uint8\n"
            "images, captions, ids and source paths, split into train/validation by a stable hash of each\n"
            "path. Captions come from name.txt beside name.jpg, or from --manifest. Images are converted\n"
            "to RGB, short side resized to S (LANCZOS), centre cropped. Unusable files are skipped and\n"
            "listed with the reason; the full list goes to build_report.json in the dataset directory\n"
            "OUT/captioned_folder/<config>/1.0.0, which the command prints."
        ),
        epilog=(
            "examples:\n"
            "  dalle-jax data folder ~/photos --out ~/tensorflow_datasets --image-size 64\n"
            "  dalle-jax data folder ~/photos --out data --manifest ~/photos/captions.jsonl\n"
            "\nmanifest formats (paths relative to the manifest's folder, or absolute):\n"
            '  JSONL: {"path": "cats/1.jpg", "caption": "a cat on a mat"}\n'
            "  TSV:   cats/1.jpg<TAB>a cat on a mat"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SRC", help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, metavar="DIR", help="TFDS data dir to write into")
    parser.add_argument("--image-size", type=int, default=64, metavar="S", help="output side (default 64)")
    parser.add_argument("--manifest", metavar="FILE", help="JSONL or TSV captions file instead of name.txt sidecars")
    parser.add_argument("--validation-fraction", type=float, default=0.05, metavar="F",
                        help="held-out share (default 0.05)")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="salt of the split hash (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="rebuild if this folder was built before with other files")
    parser.set_defaults(func=_folder)


def _folder(args: argparse.Namespace) -> int:
    try:
        spec = folder.FolderSpec(args.source, args.image_size, args.manifest, args.validation_fraction, args.seed)
        folder.build_folder(args.out, spec, overwrite=args.overwrite, verbose=True)
    except (FileNotFoundError, NotADirectoryError, FileExistsError, folder.FolderInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------------------ shards

def register_shards(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "shards",
        help="turn web-dataset tar shards or parquet files (img2dataset, LAION, CC3M) into a TFDS dataset",
        description=shards.__doc__.split("\n\n", 1)[0].replace("\n", " ") + "\n\n" + (
            "Tar shards hold KEY.jpg|png|webp + KEY.txt (+ KEY.json); parquet files hold image bytes and a caption\n"
            "per row. Every bad record is skipped and named (shard:key) with its reason in build_report.json. Shard i\n"
            "is converted by a local worker (--workers) on host i %% hosts; host 0 then writes the dataset\n"
            "OUT/captioned_shards/<config>/1.0.0, which the command prints. An interrupted build resumes."),
        epilog=(
            "examples:\n"
            "  dalle-jax data shards ~/cc3m/ --out ~/tensorflow_datasets --image-size 64 --workers 8\n"
            "  dalle-jax data shards train-*.parquet --out data --image-column image --caption-column text\n"
            "  on every host of a pod:  DALLE_JAX_DISTRIBUTED=1 dalle-jax data shards gs://... --out gs://..."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sources", nargs="+", metavar="SRC", help=".tar / .parquet files, or folders holding them")
    parser.add_argument("--out", required=True, metavar="DIR", help="TFDS data dir to write into")
    parser.add_argument("--image-size", type=int, default=64, metavar="S", help="output side (default 64)")
    add_shard_build_args(parser)
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="salt of the split hash (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild if the shards changed since the last build")
    add_distributed_args(parser)
    parser.set_defaults(func=_shards)


def add_shard_build_args(group: argparse._ActionsContainer) -> None:
    """--image-column, --caption-column, --validation-fraction, --workers (`data shards` and `train`)."""
    group.add_argument("--image-column", metavar="NAME",
                       help=f"parquet image column (default: the first of {', '.join(shards.IMAGE_COLUMNS)})")
    group.add_argument("--caption-column", metavar="NAME",
                       help=f"parquet caption column (default: the first of {', '.join(shards.CAPTION_COLUMNS)})")
    group.add_argument("--validation-fraction", type=float, default=0.05, metavar="F",
                       help="held-out share, also the report's captions in `train` (default 0.05)")
    group.add_argument("--workers", type=int, default=1, metavar="N",
                       help="local processes converting tar/parquet shards in parallel (default 1)")


def _shards(args: argparse.Namespace) -> int:
    import jax

    from dalle_jax import distributed

    if args.workers < 1:
        raise InputError(f"--workers {args.workers} must be at least 1")
    try:
        spec = shards.ShardsSpec(tuple(args.sources), args.image_size, args.image_column, args.caption_column,
                                 args.validation_fraction, args.seed)
        shards.build_shards(args.out, spec, workers=args.workers, overwrite=args.overwrite,
                            process_index=jax.process_index(), process_count=jax.process_count(),
                            verbose=distributed.is_main(), barrier=distributed.barrier)
    except (FileNotFoundError, FileExistsError, folder.FolderInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------------------ emoji

def register_emoji(subparsers: argparse._SubParsersAction) -> None:
    from dalle_jax.data import emoji

    defaults = emoji.EmojiSpec()
    parser = subparsers.add_parser(
        "emoji", help="build the captioned-emoji dataset from the Noto Color Emoji font (real drawings, held-out "
                      "emoji/colour pairs)",
        description=emoji.__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  dalle-jax data emoji --out runs/emoji_data --num 10000\n"
               "  dalle-jax train --data runs/emoji_data/captioned_emoji/<config>/1.0.0 --out runs/emoji")
    parser.add_argument("--out", required=True, help="TFDS data directory to write into")
    parser.add_argument("--num", type=int, default=defaults.num_train, help="train examples (%(default)s)")
    parser.add_argument("--num-validation", type=int, default=defaults.num_validation,
                        help="validation examples (%(default)s)")
    parser.add_argument("--num-test", type=int, default=defaults.num_test, help="test examples (%(default)s)")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help="side in pixels, >= 32 "
                                                                                    "(%(default)s)")
    parser.add_argument("--holdout", default=",".join(f"{e} {c}" for e, c in defaults.holdout),
                        help="comma-separated '<emoji> <colour>' pairs kept out of train, or 'none' "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="example i depends only on it")
    parser.add_argument("--font", help=f"NotoColorEmoji.ttf (default: where Debian's {emoji.FONT_PACKAGE} puts it)")
    parser.set_defaults(func=_emoji)


def _emoji(args: argparse.Namespace) -> int:
    from dalle_jax.data import emoji

    try:
        spec = emoji.EmojiSpec(image_size=args.image_size, num_train=args.num, num_validation=args.num_validation,
                               num_test=args.num_test, holdout=emoji.parse_holdout(args.holdout), seed=args.seed)
    except ValueError as error:
        raise InputError(str(error)) from error
    path = emoji.build_emoji(args.out, spec, args.font)
    print(f"dataset: {path}")
    return 0


# ------------------------------------------------------------------------------------------------ show

def register_show(subparsers: argparse._SubParsersAction) -> None:
    show = subparsers.add_parser(
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


def _show(args: argparse.Namespace) -> int:
    from dalle_jax.data.pipeline import caption_text, open_split
    from dalle_jax.images import save_grid

    for flag, value in (("--num", args.num), ("--columns", args.columns), ("--scale", args.scale)):
        if value < 1:
            raise InputError(f"{flag} {value} must be at least 1")

    source = open_split(runs.find_dataset_dir(args.dataset), args.split)
    count = min(args.num, len(source))
    examples = [source[i] for i in range(count)]
    examples.sort(key=lambda e: int(e["id"]))
    captions = [caption_text(e["caption"]) for e in examples]
    out = save_grid(args.out, [e["image"] for e in examples], captions, columns=args.columns, scale=args.scale)
    print(f"wrote {out} ({count} of {len(source)} {args.split} examples)")
    return 0
