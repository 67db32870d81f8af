"""The demo's evaluation: prompt sets, caption-match accuracy by the exact shapes scorer, sample grids,
image-to-image completions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dalle_jax.config import Config

REPORT_N = (1, 2, 4, 8, 16, 32, 64)  # accuracy-vs-N table: best of the first n candidates by CLIP


# ------------------------------------------------------------------------------------------------ prompts

def prompt_sets(config: Config, count: int, seed: int) -> dict[str, list[str]]:
    """The four evaluation sets of `count` prompts each: single objects in distribution, held-out pairs,
    size+position, relations. The single-object sets cycle through their pairs (every in-distribution pair
    once before any twice; the held-out pairs count/len times each); a repeated prompt gets its own samples."""
    from dalle_jax.data.shapes import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, parse_holdout, with_article

    holdout = set(parse_holdout(config.data.holdout))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    in_dist = [p for p in pairs if p not in holdout]
    rng = np.random.default_rng(seed)

    def pick(options: list, n: int) -> list:
        return [options[i] for i in rng.permutation(len(options))[:n]]

    def cycle(options: list) -> list:
        rounds = -(-count // len(options))
        return [p for _ in range(rounds) for p in pick(options, len(options))][:count]

    single = [with_article(f"{c} {s}") for c, s in cycle(in_dist)]
    heldout = [with_article(f"{c} {s}") for c, s in cycle(sorted(holdout))]
    placed = [f"{with_article(f'{z} {c} {s}')} in the {p}"
              for z, (c, s), p in zip(pick(list(SIZES) * count, count), cycle(in_dist),
                                      pick(list(POSITIONS) * count, count), strict=True)]
    relations = []
    for _ in range(count):
        (c1, s1), (c2, s2) = pick(in_dist, 2)
        relations.append(f"{with_article(f'{c1} {s1}')} {RELATIONS[rng.integers(len(RELATIONS))]} "
                         f"{with_article(f'{c2} {s2}')}")
    return {"in_distribution": single, "heldout": heldout, "position": placed, "relations": relations}


# The scorer's "all": every attribute the caption states and exactly as many objects as it names (a blue circle
# drawn next to a stray red square does not match "a blue circle"; the lenient "color_shape" alone would count it).
SCORE_KEY = "all"


# ------------------------------------------------------------------------------------------------ scoring

def wilson_interval(hits: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sensible at 0 and at `trials` hits)."""
    if trials == 0:
        return 0.0, 1.0
    p = hits / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def accuracy_table(prompts: list[str], kept: list[list[Any]], key: str) -> dict:
    """Scorer accuracy of the CLIP-best of n candidates for every n in REPORT_N that divides N (the candidates
    per prompt), with 95% Wilson intervals.

    `kept[p]` is prompt p's N candidates in CLIP order, each with its draw index. A prompt's N draws split into
    N/n disjoint groups of n consecutive draws; each group's CLIP-best is one trial, so n = 1 is plain sampling
    (every draw a trial) and n = N is one trial per prompt. Averaging over the groups estimates best-of-n with far
    less noise than taking only the first n draws. "any_of_n" (an oracle: some draw is right) is the ceiling a
    perfect reranker would reach. "right_shape_distance_median": over the draws judged right, the median of their
    worst matched shape distance (`scorer.match`) — near 0.1 for drawn shapes, near the scorer's 0.4 tolerance
    for blobs that pass it (held-out pairs, 2026-12-07: 0.31 against 0.07 in distribution).
    """
    from dalle_jax.data.scorer import match

    num = len(kept[0])
    hits: dict[int, list[bool]] = {n: [] for n in REPORT_N if n <= num and num % n == 0}
    oracle, distances = [], []
    for prompt, candidates in zip(prompts, kept, strict=True):
        right = {}
        for c in candidates:
            verdict, matched = match(c.image, prompt)
            right[c.sample_index] = bool(verdict[key])
            if right[c.sample_index]:
                distances.append(max(d["shape_distance"] for d in matched))
        order = [c.sample_index for c in candidates]
        for n, trials in hits.items():
            for group in range(num // n):
                trials.append(right[next(i for i in order if group * n <= i < (group + 1) * n)])
        oracle.append(any(right.values()))
    table = {n: float(np.mean(h)) for n, h in hits.items()}
    intervals = {n: wilson_interval(sum(h), len(h)) for n, h in hits.items()}
    return {"key": key, "prompts": len(prompts), "distinct_prompts": len(set(prompts)), "best_of_n": table,
            "interval_95": intervals, "trials": {n: len(h) for n, h in hits.items()},
            "any_of_n": float(np.mean(oracle)), "right_samples": len(distances),
            "right_shape_distance_median": float(np.median(distances)) if distances else None}


def save_sample_grid(path: Path, prompts: list[str], kept: list[list[Any]], columns: int, rows: int = 16) -> None:
    """One row per distinct prompt (its first occurrence, at most `rows`): the caption, then its top `columns`
    samples by CLIP score."""
    from dalle_jax.images import save_grid

    first = {prompt: p for p, prompt in reversed(list(enumerate(prompts)))}
    shown = sorted(first.values())[:rows]
    tiles, labels = [], []
    for p in shown:
        for r, c in enumerate(kept[p][:columns]):
            tiles.append(c.image)
            labels.append(prompts[p] if r == 0 else f"#{r}")
    save_grid(path, tiles, labels, columns=columns, scale=max(1, 96 // tiles[0].shape[0]))


def image_to_image(run: Any, config: Config, dataset_dir: str, out: Path, seed: int, count: int = 4) -> None:
    """Source image | its top-half token prefix | completions for a caption that changes the bottom object."""
    from dalle_jax.data.pipeline import caption_text, open_split
    from dalle_jax.data.scorer import parse_caption
    from dalle_jax.data.shapes import COLORS, SHAPES, with_article
    from dalle_jax.images import save_grid
    from dalle_jax.sampling.rerank import decode_images, sample_and_rerank

    source = open_split(dataset_dir, "validation")
    examples = []
    for i in range(len(source)):
        caption = caption_text(source[i]["caption"])
        parsed = parse_caption(caption) if " above " in caption else None
        if parsed and len(parsed["objects"]) == 2:
            examples.append((source[i]["image"], parsed["objects"]))
        if len(examples) == count:
            break
    rows = run.grid // 2
    rng = np.random.default_rng(seed)
    tiles, labels = [], []
    for image, (top, bottom) in examples:
        new = next((c, s) for c, s in zip(rng.permutation(list(COLORS)), rng.permutation(list(SHAPES) * 2),
                                          strict=False) if (c, s) != (bottom["color"], bottom["shape"]))
        prompt = f"{with_article(top['color'] + ' ' + top['shape'])} above {with_article(new[0] + ' ' + new[1])}"
        prefix = np.asarray(run.dvae.encode(np.asarray(image, np.float32)[None] / 255.0))[0, :rows]
        shown_prefix = np.array(decode_images(run, np.concatenate(
            [prefix.reshape(-1), np.zeros(run.grid * (run.grid - rows), np.int32)])[None])[0])
        shown_prefix[shown_prefix.shape[0] // 2:] = 255  # only the kept rows are real
        kept = sample_and_rerank(run, [prompt], num_samples=8, top=3, seed=seed, prefix=prefix, progress=False)[0]
        tiles += [image, shown_prefix, *(k.image for k in kept)]
        labels += ["source", f"top {rows} rows", prompt, "#1", "#2"]
    save_grid(out, tiles, labels, columns=5, scale=max(1, 96 // tiles[0].shape[0]))
