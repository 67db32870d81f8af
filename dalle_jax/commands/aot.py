"""`dalle-jax aot`: compile the prior's train step or sampler for a TPU slice on this host; memory vs HBM."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax

from dalle_jax import config as config_lib
from dalle_jax.aot import AOTError, compile_sample_step, compile_train_step, parse_topology
from dalle_jax.commands.common import add_config_args
from dalle_jax.errors import ShardingError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "aot", help="compile the prior's train step (or sampler) for a TPU slice on this host; memory vs HBM",
        description="Ahead-of-time compiles the prior's real train step (--mode train) or one prefill and one "
                    "cached decode step (--mode sample) for a TPU topology, on a CPU host with libtpu installed "
                    "(pip install -e '.[tpu]'; run with JAX_PLATFORMS=cpu). Prints per-chip memory against the "
                    "chip's HBM, FLOPs and bytes per step, a roofline step time and the MFU it implies. Exits 1 "
                    "when the program does not fit.",
        epilog="examples:\n"
               "  dalle-jax aot --preset paper_12b --topology v4-256 --mesh 1,-1,1\n"
               "  dalle-jax aot --preset paper_12b --topology v5p-256 --mesh 1,-1,2 --batch 1024\n"
               "  dalle-jax aot --preset paper_12b --topology v5e-8 --mode sample --batch 8\n"
               "topologies: v4-N and v5p-N count TensorCores (v4-256 = 128 chips), v5e-N (v5litepod-N) and v6e-N "
               "count chips; or an explicit shape such as v4:4x4x8",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    add_config_args(parser, default_preset="paper_12b")
    parser.set_defaults(func=_aot)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--topology", required=True, help="TPU slice, e.g. v4-256, v5p-256, v5e-256, v4:4x4x8")
    parser.add_argument("--slices", type=int, default=1, help="number of such slices joined over DCN (default 1)")
    parser.add_argument("--mesh", help="shorthand for --set mesh.ici_parallelism=D,F,T (data, fsdp, tensor)")
    parser.add_argument("--batch", type=int, help="global batch (train; default prior_train.batch_size) or "
                                                  "sequences decoded together (sample; default one per shard)")
    parser.add_argument("--mode", choices=("train", "sample"), default="train")
    parser.add_argument("--no-count", action="store_true", help="skip the 1- and 2-layer compiles that count "
                                                                 "every layer's FLOPs (raw XLA counts instead)")
    parser.add_argument("--json", help="also write the report as JSON here")


def _use_cpu_backend() -> None:
    """Compile-only TPU devices need no attached TPU; keep JAX off one (a CPU host, or a busy TPU VM)."""
    from jax._src import xla_bridge

    if not os.environ.get("JAX_PLATFORMS") and not xla_bridge.backends_are_initialized():
        jax.config.update("jax_platforms", "cpu")


def _aot(args: argparse.Namespace) -> int:
    _use_cpu_backend()
    overrides = list(args.set) + ([f"mesh.ici_parallelism={args.mesh}"] if args.mesh else [])
    config = config_lib.resolve(args.preset, overrides)
    try:
        topology = parse_topology(args.topology, args.slices)
        compile_fn = compile_train_step if args.mode == "train" else compile_sample_step
        report = compile_fn(config, topology, args.batch, count_layers=not args.no_count)
    except (AOTError, ShardingError) as error:
        print(f"error: {error}")
        return 2
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if not report.fits:
        print(f"error: the {args.mode} step of {config.name} does not fit {report.chip.hbm_gib:g} GiB per chip on "
              f"{args.topology} with mesh {report.mesh}: try more chips, another mesh, a smaller --batch, "
              f"--set prior_train.microbatches=N or --set prior.remat=full")
        return 1
    return 0
