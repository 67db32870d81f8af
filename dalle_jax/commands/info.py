"""`dalle-jax info`: parameter count, per-device memory and mask schedule of a preset's prior (nothing allocated)."""

from __future__ import annotations

import argparse

import jax

from dalle_jax.commands.common import add_config_args, resolve_config
from dalle_jax.info import describe


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "info", help="parameter count, per-device memory and mask schedule of a preset's prior",
        description="Computes the prior of a preset abstractly (nothing is allocated): parameter count, "
                    "per-device fp32 parameter and optimizer-state bytes under the config's mesh over --devices "
                    "devices, the sequence layout and the per-layer attention masks.",
        epilog="examples:\n  dalle-jax info --preset paper_12b --devices 256\n"
               "  dalle-jax info --preset paper_12b --devices 64 --set mesh.ici_parallelism=1,16,4",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser, default_preset="paper_12b")
    parser.add_argument("--devices", type=int, help="devices the mesh spans (default: this host's device count)")
    parser.set_defaults(func=_info)


def _info(args: argparse.Namespace) -> int:
    print(describe(resolve_config(args), args.devices or jax.device_count()))
    return 0
