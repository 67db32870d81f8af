"""One process of a simulated multi-host `train_prior` run (tests/test_multihost.py starts two of these).

    python tests/multihost_worker.py --data DIR --out DIR [--coordinator H:P --num-processes N --process-id I]
        [--set key=value ...]

Joins the job first (before any other JAX call), then trains the quick preset and prints one JSON line.
"""

import argparse
import json
import logging
import sys

from dalle_jax import distributed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="directory with tokens/ and tokenizer.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[])
    from dalle_jax.commands.common import add_distributed_args

    add_distributed_args(parser)
    args = parser.parse_args()
    distributed.initialize(args.coordinator, args.num_processes, args.process_id)
    logger = logging.getLogger("dalle_jax")  # as the CLI does: INFO lines ("resumed from step ...") to stderr
    logger.addHandler(logging.StreamHandler())
    logger.setLevel(logging.INFO)

    import jax

    from dalle_jax import config as config_lib
    from dalle_jax.runs import find_dataset_dir
    from dalle_jax.train.prior import train_prior

    config = config_lib.resolve("quick", args.set)
    result = train_prior(config, find_dataset_dir(f"{args.data}/tokens"), f"{args.data}/tokenizer.json", args.out,
                         progress=False)
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "step": result["step"], "preempted": result["preempted"]}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
