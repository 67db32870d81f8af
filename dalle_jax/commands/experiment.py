"""`dalle-jax experiment`: the paper's ablations as declared sweeps (experiments/<name>.py) of the real trainers."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dalle_jax.errors import InputError

EPILOG = """\
Each experiment file under experiments/ names a base preset, the variants (only the ablated keys differ), >= 3
seeds, the metrics and the paper's claims. `run` trains every (variant, seed) cell, sharing the stages cells agree
on (one dVAE for every prior ablation), skips finished cells and resumes an interrupted one from its checkpoints;
then it writes results.json, results.md (mean and 95% interval per variant and metric, each claim with a verdict:
reproduced / contradicted / inconclusive at this scale) and plot.png into OUT.

scales: cpu (default; each experiment sized to finish in ~45 min on a 2-core machine), tpu (sizes for a v4-8 /
v5e-8 slice), quick (seconds; the tests use it).

examples:
  dalle-jax experiment list
  dalle-jax experiment run dvae_kl_weight                 # -> runs/experiments/dvae_kl_weight/cpu
  dalle-jax experiment run prior_attention --quick --seeds 0,1
  dalle-jax experiment run composition_compute --resume-published   # continue a sweep published elsewhere
  dalle-jax experiment run composition_preset --adopt-from composition_dvae   # its demo cells ran there
  dalle-jax experiment report dvae_kl_weight --publish    # also -> experiments/results/dvae_kl_weight.*
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("experiment", help="run the paper's ablations: list | run NAME | report NAME",
                                   description=__doc__, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    listing = actions.add_parser("list", help="the experiments, their variants, seeds and claims")
    listing.set_defaults(func=_list)
    for name, func, help_text in (("run", _run, "run (or resume) every cell, then write the report"),
                                  ("report", _report, "write the report from the cells finished so far")):
        sub = actions.add_parser(name, help=help_text, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.add_argument("name", help="an experiment in experiments/ (see `dalle-jax experiment list`)")
        sub.add_argument("--scale", default="cpu", choices=("cpu", "tpu", "quick"), help="sizes (default cpu)")
        sub.add_argument("--quick", action="store_true", help="same as --scale quick")
        sub.add_argument("--out", help="directory of the cells (default runs/experiments/NAME/SCALE, with the stages "
                                       "cells share in runs/experiments/shared/SCALE, common to all experiments; "
                                       "with --out they go to OUT/shared)")
        sub.add_argument("--seeds", help="comma-separated subset of the experiment's seeds (default: all)")
        sub.add_argument("--variants", help="comma-separated subset of the experiment's variants (default: all)")
        sub.add_argument("--publish", action="store_true",
                         help="also copy the report to experiments/results/NAME.{md,json,png}")
        sub.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "run":
            sub.add_argument("--resume-published", action="store_true",
                             help="count the cells of experiments/results/NAME.json whose variant, seed, scale and "
                                  "config equal this run's as finished (each keeps its date and commit): a sweep "
                                  "longer than one machine's session continues on another")
            sub.add_argument("--adopt-from", metavar="NAMES",
                             help="comma-separated other experiments: count their published cells whose seed, scale, "
                                  "sampling and config equal one of this run's cells as finished (a baseline two "
                                  "experiments share is trained once; both must run the same stages and evaluation)")
        sub.set_defaults(func=func)


def _list(args: argparse.Namespace) -> int:
    from dalle_jax.experiments import spec

    for name in spec.available():
        experiment = spec.load(name)
        print(f"{name}: base preset {experiment.base}, stages {'+'.join(experiment.stages)}, "
              f"seeds {list(experiment.seeds)}, {len(experiment.cells())} cells")
        for variant, overrides in experiment.variants.items():
            print(f"  {variant:<22} {' '.join(overrides) or '(base)'}")
        for claim in experiment.claims:
            print(f"  claim: {claim.text}")
    return 0


def _subset(flag: str, text: str | None, allowed: tuple, what: str, name: str, parse=str) -> tuple | None:
    """`--seeds 0,1` / `--variants a,b`: the chosen subset of `allowed` (None = all), or a one-line error naming
    what is not among them."""
    if not text:
        return None
    try:
        chosen = tuple(parse(v.strip()) for v in text.split(","))
    except ValueError:
        raise InputError(f"{flag} {text!r}: give comma-separated integers, e.g. {flag} 0,1") from None
    unknown = [v for v in chosen if v not in allowed]
    if unknown:
        raise InputError(f"{flag} {text}: {', '.join(map(str, unknown))} not among {name}'s {what} "
                         f"{', '.join(map(str, allowed))}")
    return chosen


def _setup(args: argparse.Namespace):
    from dalle_jax.experiments import spec
    from dalle_jax.experiments.runner import Runner

    experiment = spec.load(args.name)
    scale = "quick" if args.quick else args.scale
    seeds = _subset("--seeds", args.seeds, experiment.seeds, "seeds", experiment.name, int)
    variants = _subset("--variants", args.variants, tuple(experiment.variants), "variants", experiment.name)
    root = Path("runs") / "experiments"
    out = Path(args.out or root / experiment.name / scale)
    # Without --out, every experiment of a scale shares one stage cache (the demo dVAE is trained once for all).
    shared = None if args.out else root / "shared" / scale
    experiment.config(next(iter(experiment.variants)), experiment.seeds[0], scale)  # unknown scale -> one line
    command = (f"dalle-jax experiment run {experiment.name} --scale {scale}"
               + (f" --seeds {args.seeds}" if args.seeds else "")
               + (f" --variants {args.variants}" if variants else ""))
    return Runner(experiment, scale, out, seeds, progress=not args.quiet, shared_root=shared,
                  variants=variants), command


def _run(args: argparse.Namespace) -> int:
    from dalle_jax.experiments import spec
    from dalle_jax.experiments.runner import Preempted

    runner, command = _setup(args)
    if args.resume_published:
        published = spec.default_directory() / "results" / f"{runner.experiment.name}.json"
        if not published.is_file():
            raise InputError(f"--resume-published: {published} does not exist; publish a report first "
                             f"(`dalle-jax experiment report {runner.experiment.name} --publish`) or drop the flag")
        adopted = runner.adopt(published)
        print(f"{runner.experiment.name}: {len(adopted)} cells taken from {published}", file=sys.stderr)
    for name in filter(None, (args.adopt_from or "").split(",")):
        published = spec.default_directory() / "results" / f"{name}.json"
        if not published.is_file():
            raise InputError(f"--adopt-from {name}: {published} does not exist (see `dalle-jax experiment list`)")
        try:
            adopted = runner.adopt(published, spec.load(name))
        except ValueError as error:
            raise InputError(f"--adopt-from {name}: {error}") from None
        print(f"{runner.experiment.name}: {len(adopted)} cells taken from {published}", file=sys.stderr)
    try:
        runner.run()
    except Preempted as stopped:  # like the trainers: a SIGTERM saves, says how to resume and exits 0
        print(stopped, file=sys.stderr)
        return 0
    # The report covers every finished cell, not only this run's subset: publishing a run of --variants or --seeds
    # keeps the cells published before (adopted by --resume-published) in results/NAME.json.
    return _write(runner, runner.finished(selected_only=False), command, args.publish)


def _report(args: argparse.Namespace) -> int:
    runner, command = _setup(args)
    results = runner.finished()
    if not results:
        raise InputError(f"{runner.out} holds no finished cell of {runner.experiment.name}: run `dalle-jax "
                         f"experiment run {runner.experiment.name} --scale {runner.scale}` first")
    return _write(runner, results, command, args.publish)


def _write(runner, results: list[dict], command: str, publish: bool) -> int:
    from dalle_jax.experiments import report, spec

    wall_s = sum(r["wall_s"] for r in results)
    summary = report.write_report(runner.experiment, results, runner.out, scale=runner.scale, command=command,
                                  wall_s=wall_s)
    name = runner.experiment.name
    for claim in summary["claims"]:
        print(f"{name}: {claim['verdict']:<12} {claim['text']}")
    print(f"{name}: {len(results)} cells, {wall_s / 60:.1f} min -> {runner.out / 'results.md'}")
    if publish:
        target = spec.default_directory() / "results"
        target.mkdir(parents=True, exist_ok=True)
        markdown = (runner.out / "results.md").read_text().replace("](plot.png)", f"]({name}.png)")
        (target / f"{name}.md").write_text(markdown)
        shutil.copyfile(runner.out / "results.json", target / f"{name}.json")
        if (runner.out / "plot.png").is_file():
            shutil.copyfile(runner.out / "plot.png", target / f"{name}.png")
        readme = report.update_index(spec.default_directory())
        print(f"{name}: published to {target}/{name}.{{md,json,png}}; table in {readme}")
    return 0
