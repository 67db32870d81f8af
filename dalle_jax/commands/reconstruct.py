"""`dalle-jax reconstruct`: encode + decode image files with a dVAE and draw them side by side."""

from __future__ import annotations

import argparse

from dalle_jax.encode import reconstruct_files


def register(subparsers: argparse._SubParsersAction) -> None:
    recon = subparsers.add_parser(
        "reconstruct", help="encode + decode image files with a dVAE and draw them side by side",
        description="Preprocesses each image like the datasets (short side resize + centre crop), encodes it to "
                    "tokens and decodes them; writes a grid of (original | reconstruction) pairs.",
        epilog="example: dalle-jax reconstruct --run runs/demo photo1.jpg photo2.png --out recon.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    recon.add_argument("images", nargs="+", help="image files")
    recon.add_argument("--run", required=True, help="run directory or dVAE directory")
    recon.add_argument("--out", required=True, help="PNG to write")
    recon.add_argument("--image-size", type=int, help="pixels (default: the dVAE run's data.image_size, or 256)")
    recon.add_argument("--params", choices=("ema", "raw"), default="ema")
    recon.set_defaults(func=_reconstruct)


def _reconstruct(args: argparse.Namespace) -> int:
    grid, problems = reconstruct_files(args.run, args.images, args.out, image_size=args.image_size,
                                       use_ema=args.params == "ema")
    for problem in problems:
        print(f"skipped {problem}")
    print(f"wrote {grid}")
    return 0 if not problems else 1
