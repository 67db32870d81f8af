"""`dalle-jax config`: print or save a preset's resolved config (with --set overrides), validated."""

from __future__ import annotations

import argparse
import json

from dalle_jax import config as config_lib
from dalle_jax.commands.common import add_config_args, resolve_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("config", help="print or save a preset's resolved config",
                                   description="Resolves a preset plus --set overrides, validates it, prints JSON.",
                                   epilog="example: dalle-jax config --preset demo --set mesh.ici_parallelism=2,2,2")
    add_config_args(parser)
    parser.add_argument("--out", help="write config.json here instead of printing")
    parser.set_defaults(func=_config)


def _config(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    if args.out:
        config_lib.save_config(config, args.out)
        print(f"wrote {args.out}")
    else:
        print(json.dumps(config_lib.to_dict(config), indent=2))
    return 0
