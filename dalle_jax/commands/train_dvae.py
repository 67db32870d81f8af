"""`dalle-jax train-dvae`: stage 1, the discrete VAE, into RUN/dvae (rerun to resume)."""

from __future__ import annotations

import argparse

from dalle_jax.commands.common import add_config_args, resolve_config
from dalle_jax.train.dvae import train_dvae


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-dvae", help="train the discrete VAE (stage 1)",
        description="Trains the dVAE with the paper's recipe (Gumbel-softmax relaxation, KL to a uniform prior "
                    "with beta cosine-annealed to 6.6, tau annealed 1 -> 1/16, logit-Laplace likelihood, AdamW, "
                    "EMA) into RUN/dvae: checkpoints, metrics.jsonl, TensorBoard events, reconstruction grids. "
                    "Rerunning the same command resumes from the latest checkpoint; SIGTERM/Ctrl-C saves first.",
        epilog="examples:\n  dalle-jax train-dvae --run runs/demo --preset demo\n"
               "  dalle-jax train-dvae --run runs/quick --preset quick --set dvae_train.steps=50\n"
               "  dalle-jax train-dvae --run runs/mine --set data.dataset=folder --set data.data_dir=DIR",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="run directory (created; reused to resume)")
    add_config_args(parser)
    parser.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    summary = train_dvae(resolve_config(args), args.run)
    shown = {k: round(v, 4) for k, v in summary["metrics"].items() if isinstance(v, float)}
    print(f"dvae: step {summary['step']} -> {summary['run_dir']}  {shown}")
    return 0
