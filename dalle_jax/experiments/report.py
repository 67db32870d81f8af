"""An experiment's report from its cells' results: per variant and metric the mean over seeds with a 95% Student-t
interval; per claim the seed-paired difference with its interval and a verdict; results.json, results.md, plot.png.

Verdicts ("at this scale"): a "higher"/"lower" claim is *reproduced* when the whole interval of the paired
difference lies on the claimed side of zero, *contradicted* when it lies wholly on the other side, else
*inconclusive*. A "same" claim is reproduced when the interval lies within ±tolerance, contradicted when it lies
wholly outside, else inconclusive. A cell that diverged has no metrics: its seed drops out of the pairs (the
report counts diverged cells per variant; a claim left with fewer than two pairs is inconclusive).
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import numpy as np

from dalle_jax.experiments.spec import Claim, Experiment

CONFIDENCE = 0.95
FILES = ("results.json", "results.md", "plot.png")


def interval(values: list[float], confidence: float = CONFIDENCE) -> dict:
    """Mean and two-sided Student-t interval of the finite values (low/high NaN with fewer than two)."""
    from scipy import stats

    xs = np.asarray([v for v in values if isinstance(v, (int, float)) and math.isfinite(v)], np.float64)
    if len(xs) == 0:
        return {"n": 0, "mean": math.nan, "low": math.nan, "high": math.nan}
    mean = float(xs.mean())
    if len(xs) < 2:
        return {"n": 1, "mean": mean, "low": math.nan, "high": math.nan}
    half = float(stats.t.ppf(0.5 + confidence / 2, len(xs) - 1) * xs.std(ddof=1) / math.sqrt(len(xs)))
    return {"n": int(len(xs)), "mean": mean, "low": mean - half, "high": mean + half}


def verdict(claim: Claim, low: float, high: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if claim.expect == "same":
        if -claim.tolerance <= low and high <= claim.tolerance:
            return "reproduced"
        return "contradicted" if high < -claim.tolerance or low > claim.tolerance else "inconclusive"
    sign = 1 if claim.expect == "higher" else -1
    low, high = sorted((sign * low, sign * high))
    return "reproduced" if low > 0 else "contradicted" if high < 0 else "inconclusive"


def _value(result: dict, metric: str) -> float:
    value = result["metrics"].get(metric, math.nan)
    return float(value) if isinstance(value, (int, float)) else math.nan


def summarize(experiment: Experiment, results: list[dict]) -> dict:
    """{"variants": {variant: {"diverged_cells": k, metric: interval + values}}, "claims": [...]} from cell results
    (a metric may itself be named "diverged": the 0/1 per cell a claim can compare)."""
    by_cell = {(r["variant"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results})
    variants = {}
    for variant in experiment.variants:
        cells = [by_cell[(variant, s)] for s in seeds if (variant, s) in by_cell]
        variants[variant] = {"diverged_cells": sum(1 for c in cells if c.get("diverged"))}
        for metric in experiment.metrics:
            values = [_value(c, metric) for c in cells]
            variants[variant][metric] = {**interval(values), "values": values}
    claims = []
    for claim in experiment.claims:
        diffs = [_value(by_cell[(claim.a[0], s)], claim.a[1]) - _value(by_cell[(claim.b[0], s)], claim.b[1])
                 for s in seeds if (claim.a[0], s) in by_cell and (claim.b[0], s) in by_cell]
        stats = interval(diffs)
        claims.append({"text": claim.text, "a": list(claim.a), "b": list(claim.b), "expect": claim.expect,
                       "tolerance": claim.tolerance, "differences": diffs, **stats,
                       "verdict": verdict(claim, stats["low"], stats["high"])})
    return {"variants": variants, "claims": claims}


def _fmt(stats: dict) -> str:
    if stats["n"] == 0:
        return "—"
    if stats["n"] == 1:
        return f"{stats['mean']:.4g} (1 seed)"
    return f"{stats['mean']:.4g} [{stats['low']:.4g}, {stats['high']:.4g}]"


def write_report(experiment: Experiment, results: list[dict], out: Path, *, scale: str, command: str,
                 wall_s: float) -> dict:
    """results.json, results.md and plot.png in `out`; returns the summary."""
    from dalle_jax.demo.report import machine as machine_name
    from dalle_jax.images import plot_intervals

    summary = summarize(experiment, results)
    machine = machine_name()
    date = datetime.date.today().isoformat()
    document = {"experiment": experiment.name, "scale": scale, "command": command, "machine": machine, "date": date,
                "wall_s": wall_s, "confidence": CONFIDENCE, **summary, "cells": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(document, indent=2, default=float) + "\n")
    plotted = {m: {v: summary["variants"][v][m] for v in experiment.variants} for m in experiment.plotted}
    plot = plot_intervals(out / "plot.png", plotted,
                          title=f"{experiment.name} ({scale}): mean, {CONFIDENCE:.0%} t-interval, seeds as dots")

    seeds = sorted({r["seed"] for r in results})
    lines = [f"# Experiment `{experiment.name}` — scale `{scale}`", "",
             f"- command: `{command}`", f"- machine: {machine}", f"- date: {date}",
             f"- wall time: {wall_s / 60:.1f} min (cells and the stages they share)",
             f"- seeds: {', '.join(map(str, seeds))}; intervals are {CONFIDENCE:.0%} Student-t over seeds",
             f"- cells finished: {_provenance(results)}", ""]
    # The docstring after its first paragraph (the command): the claim, in the paper's words, and the set-up.
    lines += [" ".join(p.split()) + "\n" for p in experiment.doc.split("\n\n")[1:]]
    lines += ["## Claims", "", "| the paper says | compared (seed-paired a − b) | difference, mean [95% interval] | "
              "expected | verdict at this scale |", "|---|---|---:|---|---|"]
    for c in summary["claims"]:
        expected = f"same (±{c['tolerance']:g})" if c["expect"] == "same" else f"a {c['expect']}"
        lines.append(f"| {c['text']} | a = {c['a'][0]} `{c['a'][1]}`, b = {c['b'][0]} `{c['b'][1]}` | "
                     f"{_fmt(c)} | {expected} | **{c['verdict']}** |")
    lines += ["", "## Every variant", "", "| variant | overrides | diverged cells | "
              + " | ".join(f"`{m}`" for m in experiment.metrics) + " |",
              "|---|---|---:|" + "---:|" * len(experiment.metrics)]
    for variant, overrides in experiment.variants.items():
        stats = summary["variants"][variant]
        lines.append(f"| {variant} | {' '.join(f'`{o}`' for o in overrides) or '(base)'} | {stats['diverged_cells']} | "
                     + " | ".join(_fmt(stats[m]) for m in experiment.metrics) + " |")
    if plot:
        lines += ["", f"![{experiment.name}]({plot.name})"]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return summary


def _provenance(results: list[dict]) -> str:
    """When and at which commit the cells ran, e.g. "2026-12-07 at d70b12a, adopted from a published report (6
    cells); 2026-12-08 at 1f0e2d3 (6 cells)" (cells from before these fields: "date not recorded")."""
    groups: dict[str, int] = {}
    for r in results:
        key = f"{r.get('finished', 'date not recorded')} at {r.get('commit') or 'unknown commit'}"
        key += f" on {r['machine']}" if r.get("machine") else ""  # cells from before the field: no machine
        key += ", adopted from a published report" if r.get("adopted_from") else ""
        groups[key] = groups.get(key, 0) + 1
    return "; ".join(f"{key} ({n} cell{'s' if n > 1 else ''})" for key, n in groups.items())


INDEX_START, INDEX_END = "<!-- results table: written by `dalle-jax experiment report --publish` -->", "<!-- end -->"


def index_table(directory: Path) -> str:
    """One row per claim of every experiment in `directory`: our result from results/<name>.json (or "not run")."""
    from dalle_jax.experiments import spec

    rows = ["| experiment | the paper's claim | ours: a − b, mean [95% interval] | seeds | verdict | scale, date |",
            "|---|---|---:|---:|---|---|"]
    for name in spec.available(directory):
        published = directory / "results" / f"{name}.json"
        document = json.loads(published.read_text()) if published.is_file() else None
        claims = document["claims"] if document else [{"text": c.text} for c in spec.load(name, directory).claims]
        for claim in claims:
            if document:
                rows.append(f"| [{name}](results/{name}.md) | {claim['text']} | {_fmt(claim)} | {claim['n']} | "
                            f"**{claim['verdict']}** | {document['scale']}, {document['date']} |")
            else:
                rows.append(f"| {name} | {claim['text']} | not run yet | | | |")
    return "\n".join(rows)


def update_index(directory: Path) -> Path:
    """Rewrites the results table of directory/README.md between its markers (appends them when absent)."""
    readme = directory / "README.md"
    text = readme.read_text() if readme.is_file() else "# experiments\n"
    block = f"{INDEX_START}\n{index_table(directory)}\n{INDEX_END}"
    if INDEX_START in text and INDEX_END in text:
        head, rest = text.split(INDEX_START, 1)
        text = head + block + rest.split(INDEX_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    readme.write_text(text)
    return readme
