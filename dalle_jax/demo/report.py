"""The demo's report: report.json (everything) and report.md (headline tables, per-stage numbers, images)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from dalle_jax.config import Config

# ------------------------------------------------------------------------------------------------ report

def write_report(run: Path, done: dict, config: Config, stages: tuple[str, ...]) -> dict:
    """report.json (everything) and report.md (the headline numbers, the accuracy-vs-N table, the images)."""
    accuracy = done["evaluate"]["accuracy"]
    report = {
        **stage_summary(done, config, stages),
        "holdout": config.data.holdout,  # the (colour, shape) pairs no train image shows
        "caption_match": accuracy,
        "num_samples": done["evaluate"]["num_samples"],
    }
    (run / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    n = report["num_samples"]

    def cell(table: dict, k: int) -> str:
        low, high = table["interval_95"][str(k)]
        return f"{100 * table['best_of_n'][str(k)]:.1f}% [{100 * low:.0f}, {100 * high:.0f}]"

    lines = [f"# dalle-jax demo report ({config.name} preset; held out: {config.data.holdout or 'nothing'})", "",
             f"Machine: {report['machine']['processor']}, {report['machine']['cpu_count']} cores, "
             f"JAX {report['machine']['jax']} on {report['machine']['jax_backend']}.", "",
             "## Caption match (exact shapes scorer)", "",
             f"Each prompt gets {n} samples. N=1 scores every sample; best of {n} scores the CLIP-best of each "
             f"prompt's {n}; any of {n} counts prompts with at least one right sample (what a perfect reranker "
             "would reach). A sample is right when it shows every attribute of the caption and as many objects "
             "as it names (scorer key \"all\"). Brackets: 95% Wilson intervals over the trials (repeated prompts "
             "are not independent, so read them as a lower bound on the uncertainty). Shape distance: the median, "
             "over the samples judged right, of how far their worst shape is from an exact render (0 exact, ~0.1 "
             "a dVAE round trip of a small object; the scorer accepts up to 0.4): hits near 0.3 are blobs that "
             "pass, not drawn shapes.", "",
             f"| prompts (distinct) | scored on | N=1 (no reranking) | best of {n} by CLIP | any of {n} | "
             "right samples: shape distance |",
             "|---|---|---:|---:|---:|---:|"]
    for name, table in accuracy.items():
        distance = table.get("right_shape_distance_median")
        lines.append(f"| {name} {table['prompts']} ({table['distinct_prompts']}) | {table['key']} | "
                     f"{cell(table, 1)} | {cell(table, n)} | {100 * table['any_of_n']:.1f}% | "
                     f"{'—' if distance is None else f'{distance:.2f}'} ({table.get('right_samples', 0)}) |")
    sizes = sorted({int(k) for t in accuracy.values() for k in t["best_of_n"]})
    lines += ["", f"Accuracy vs N (CLIP-best of n, averaged over the {n}/n disjoint groups of each prompt's draws):",
              "", "| prompts | " + " | ".join(f"N={k}" for k in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for name, table in accuracy.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * table['best_of_n'][str(k)]:.1f}%" for k in sizes) + " |")
    lines += ["", *stage_table(report)]
    lines += ["", "## Images", "", "![in distribution](samples_in_distribution.png)", "",
              "![held out](samples_heldout.png)", "", "![position](samples_position.png)", "",
              "![relations](samples_relations.png)", "", "![image to image](image_to_image.png)", ""]
    (run / "report.md").write_text("\n".join(lines))
    return report


def stage_summary(done: dict, config: Config, stages: tuple[str, ...]) -> dict:
    """What every run report holds: preset, machine, wall time per stage, and each model's final eval numbers."""
    import os
    import platform

    import jax

    def pick(stage: str, *keys: str) -> dict:
        return {k: done[stage][k] for k in keys if k in done.get(stage, {})}

    wall = {name: round(done[name]["wall_s"], 1) for name in stages if name in done}
    return {
        "preset": config.name,
        "machine": {"platform": platform.platform(), "processor": _cpu_model() or platform.machine(),
                    "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(), "jax": jax.__version__},
        "wall_s": {**wall, "total": round(sum(wall.values()), 1)},
        "dvae": pick("dvae", "step", "eval/mse", "eval/codebook_perplexity", "eval/codebook_used",
                     "eval/recon_color_shape_acc"),
        "prior": pick("prior", "step", "eval/text_loss", "eval/image_loss", "eval/image_loss_in_distribution",
                      "eval/image_loss_heldout", "eval/uniform_image_loss", "eval/bits_per_image_token"),
        "clip": pick("clip", "step", "eval/retrieval_top1", "eval/retrieval_top1_in_distribution",
                     "eval/retrieval_top1_heldout", "eval/image_to_text_top1", "eval/retrieval_chance"),
    }


def stage_table(report: dict) -> list[str]:
    """The "## Stages" section: wall time and final numbers per stage."""
    lines = ["## Stages", "", "| stage | wall (s) | numbers |", "|---|---:|---|"]
    numbers = {"dvae": report["dvae"], "prior": report["prior"], "clip": report["clip"]}
    for name, wall in report["wall_s"].items():
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in numbers.get(name, {}).items())
        lines.append(f"| {name} | {wall:.0f} | {shown} |")
    return lines


def machine() -> str:
    """"<CPU model>, <n> cores": where a measurement ran (runs on different machines are not bitwise equal)."""
    return f"{_cpu_model() or 'unknown CPU'}, {os.cpu_count()} cores"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""
