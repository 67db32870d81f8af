"""What several sub-commands share: --preset/--set, the multi-host flags, and the trainers' parser and summary."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from dalle_jax import config as config_lib
from dalle_jax import runs
from dalle_jax.distributed import ENV_VAR


def add_distributed_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Adds the multi-host flags (all three or none) as an argument group "multi-host"."""
    group = parser.add_argument_group(
        "multi-host", f"one process per host; give all three flags, or set {ENV_VAR}=1 to let JAX read them from "
                      "the cluster (TPU VM pods, Slurm, Open MPI); neither: a single process")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator service")
    group.add_argument("--num-processes", type=int, metavar="N", help="number of processes in the job")
    group.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    return group


def add_config_args(parser: argparse.ArgumentParser, default_preset: str = "demo") -> None:
    """--preset / --set (and the multi-host flags), shared by every stage that reads a config."""
    parser.add_argument("--preset", default=default_preset, choices=sorted(config_lib.PRESETS),
                        help=f"named config (default {default_preset})")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override one config value, e.g. --set dvae_train.batch_size=64 (repeatable)")
    add_distributed_args(parser)


def resolve_config(args: argparse.Namespace) -> config_lib.Config:
    return config_lib.resolve(args.preset, args.set)


def add_trainer_parser(subparsers: Any, name: str, *, data_help: str, out_help: str, func: Callable,
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


def print_summary(label: str, result: dict, keys: tuple[str, ...]) -> None:
    """One line: the stage's final step, where it wrote, and the named metrics it ended with."""
    metrics = result["metrics"]
    summary = ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
    print(f"{label}: step {result['step']} -> {result['run_dir']}" + (f" ({summary})" if summary else ""))


def run_trainer(args: argparse.Namespace, train: Callable, label: str, summary_keys: tuple[str, ...]) -> int:
    """Runs `train(config, dataset_dir, tokenizer_path, out, progress=)` from the parsed arguments and prints its
    final step and metrics. A preempted run saved its checkpoint (rerun to resume), so it also returns 0."""
    config = resolve_config(args)
    tokenizer = args.tokenizer or str(runs.tokenizer_path(args.out))
    result = train(config, runs.find_dataset_dir(args.data), tokenizer, args.out, progress=not args.quiet)
    print_summary(label, result, summary_keys)
    return 0

