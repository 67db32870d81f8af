"""`dalle-jax encode`: every split of a dataset -> dVAE tokens, the prior's training data (RUN/tokens)."""

from __future__ import annotations

import argparse

from dalle_jax import runs
from dalle_jax.commands.common import add_distributed_args
from dalle_jax.encode import encode_dataset
from dalle_jax.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    encode = subparsers.add_parser(
        "encode", help="encode a dataset into dVAE tokens for the prior",
        description="Runs the dVAE encoder (EMA weights by default) over every split of a dataset in sharded "
                    "batches and writes a TFDS token dataset (uint16 token grid + caption + source id). "
                    "Rerunning with the same checkpoint reuses the result.",
        epilog="examples:\n  dalle-jax encode --run runs/demo              (RUN/dvae on the run's dataset -> "
               "RUN/tokens)\n  dalle-jax encode --dvae converted/ --data DATASET_DIR --out tokens/",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    encode.add_argument("--run", help="run directory: dVAE from RUN/dvae, data from its config, output RUN/tokens")
    encode.add_argument("--dvae", help="dVAE directory (train-dvae run or converted weights)")
    encode.add_argument("--data", help="dataset version dir (default: the one the dVAE was trained on)")
    encode.add_argument("--out", help="where to write the token dataset (default RUN/tokens)")
    encode.add_argument("--batch-size", type=int, default=64)
    encode.add_argument("--params", choices=("ema", "raw"), default="ema", help="EMA (default) or raw weights")
    encode.add_argument("--posterior-topk", type=int, default=0, metavar="K",
                        help="also keep each token's K most likely codes and their logits, for a prior trained with "
                             "prior_train.input_tokens=sampled or soft_targets=true (default 0: argmax tokens only, "
                             "as the paper trains on)")
    add_distributed_args(encode)  # every host encodes its share of each batch; process 0 writes the dataset
    encode.set_defaults(func=_encode)


def _encode(args: argparse.Namespace) -> int:
    if not args.run and not (args.dvae and args.data and args.out):
        raise InputError("pass --run RUN, or all of --dvae, --data and --out")
    dvae_dir = runs.find_model_dir(args.dvae or args.run, "dvae")
    config = runs.load_run_config(dvae_dir) if (dvae_dir / runs.CONFIG).is_file() else None
    data = args.data or (runs.dataset_dir_for(config.data, args.run) if config and args.run else None)
    if data is None:
        raise InputError(f"{dvae_dir} has no training config to find its dataset; pass --data")
    out = args.out or str(runs.tokens_dir(args.run))
    if args.posterior_topk < 0:
        raise InputError(f"--posterior-topk {args.posterior_topk}: use 0 (argmax tokens only) or a positive K")
    path = encode_dataset(dvae_dir, data, out, batch_size=args.batch_size, use_ema=args.params == "ema",
                          mesh_config=config.mesh if config else None, posterior_topk=args.posterior_topk)
    print(f"tokens: {path}")
    return 0
