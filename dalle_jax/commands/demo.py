"""`dalle-jax demo`: the main job, every stage on the built-in shapes data into one run directory, then a report."""

from __future__ import annotations

import argparse
from pathlib import Path

from dalle_jax import config as config_lib
from dalle_jax import demo as demo_package
from dalle_jax import runs
from dalle_jax.demo.runner import DEMO_PRESETS, Demo, demo_config
from dalle_jax.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="train the whole pipeline on the built-in shapes data and report (the main job)",
        description=demo_package.__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  dalle-jax demo --out runs/demo\n  dalle-jax demo --quick --out runs/quick\n"
               "  dalle-jax demo --out runs/demo2 --holdout 'red triangle,blue circle' --seed 1\n"
               "  dalle-jax demo --preset compose --out runs/compose")
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo); rerun to resume")
    parser.add_argument("--preset", default="demo", choices=DEMO_PRESETS,
                        help="demo (default; ~15 min on 2 cores; colour/shape codes, which draw held-out pairs), "
                             "compose (4x the prior's updates, ~30 min: more relations right; "
                             "experiments/composition_preset) or ablation (the one-table dVAE every experiment "
                             "starts from)")
    parser.add_argument("--quick", action="store_true", help="the same stages at minimal sizes (the quick preset)")
    parser.add_argument("--holdout", help="comma-separated '<colour> <shape>' pairs kept out of train "
                                          "(default: red triangle,blue circle,yellow cross,green square)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every training stage and of sampling")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config value of the preset (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    config = demo_config(args.quick, args.holdout, args.seed, args.set, args.preset)
    run = Path(args.out)
    saved = run / runs.CONFIG
    if saved.is_file() and config_lib.load_config(saved) != config:
        raise ConfigError(f"{run} holds a demo run with a different config ({saved}); use another "
                          "--out or the same options")
    demo = Demo(config, run, args.seed, progress=not args.quiet,
                num_samples=4 if args.quick else 16, prompts_per_set=2 if args.quick else 32)
    report = demo.run_all()
    print(f"demo: done in {report['wall_s']['total']:.0f} s -> {run / 'report.md'}")
    return 0
