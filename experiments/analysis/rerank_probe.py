"""Which samples does the reranker pick, and are the scorer's hits clean shapes? (docs/demo.md, 2026-12-07)

    python experiments/analysis/rerank_probe.py RUN OUT [--clip OTHER_CLIP_DIR]

Draws 16 samples for each of the demo's four prompt sets (32 prompts each; prompt seed 0, sampling seed 1) from a
trained run once (cached in OUT/samples.npz), then reranks the *same* samples with the run's CLIP or another one
(`--clip`, e.g. one trained with clip_train.hard_negatives) and prints per set: N = 1, best of 16, any of 16, how
often the reranker picks a right sample when there is one, the shapes drawn for each held-out prompt, and the
scorer's shape distance (`detect_objects(...)["shape_distance"]`, 0 = an exact render, "unknown" beyond 0.4) of the
samples it judged right. Writes OUT/heldout_ranked.png: held-out prompts with a right sample, their 8 CLIP-best
samples with the CLIP score, * = right by the scorer.
"""

import argparse
import collections
import json
from pathlib import Path

import numpy as np

from dalle_jax import runs
from dalle_jax.data.scorer import detect_objects, score
from dalle_jax.demo.evaluate import prompt_sets
from dalle_jax.images import save_grid
from dalle_jax.sampling.rerank import clip_scores, load_run, sample_and_rerank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", help="a trained run (dvae/, prior/, clip/)")
    parser.add_argument("out", help="where the samples and the grid go")
    parser.add_argument("--clip", help="rerank with this CLIP directory instead of RUN/clip")
    args = parser.parse_args()
    out = Path(args.out)
    cache = out / "samples.npz"
    if not cache.exists():
        run = load_run(args.run)
        config = runs.load_run_config(runs.stage_dir(args.run, "prior"))
        prompts, sets, images = [], [], []
        for name, batch in prompt_sets(config, 32, 0).items():
            for prompt, kept in zip(batch, sample_and_rerank(run, batch, num_samples=16, top=16, seed=1,
                                                            progress=False), strict=True):
                prompts.append(prompt)
                sets.append(name)
                images.append(np.stack([c.image for c in sorted(kept, key=lambda c: c.sample_index)]))
        out.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=np.stack(images), prompts=np.array(prompts), sets=np.array(sets))
    saved = np.load(cache)
    images, prompts, sets = saved["images"], [str(p) for p in saved["prompts"]], [str(s) for s in saved["sets"]]
    run = load_run(args.run, clip=args.clip)
    right = np.array([[score(image, p)["all"] for image in row] for row, p in zip(images, prompts, strict=True)])
    scores = np.array([clip_scores(run, row, run.clip_tokenizer.encode([p])) for row, p in zip(images, prompts,
                                                                                             strict=True)])
    picked = right[np.arange(len(right)), scores.argmax(1)]
    report = {}
    for name in dict.fromkeys(sets):
        rows = np.array([s == name for s in sets])
        some = right[rows].any(1)
        distances = [detect_objects(image)[0]["shape_distance"] for row, r in zip(images[rows], right[rows],
                                                                                  strict=True)
                     for image, ok in zip(row, r, strict=True) if ok]
        report[name] = {"n1": float(right[rows].mean()), "best_of_16": float(picked[rows].mean()),
                        "any_of_16": float(some.mean()),
                        "picked_when_any": float(picked[rows][some].mean()) if some.any() else None,
                        "right_samples": len(distances),
                        "right_shape_distance_quartiles": [round(float(q), 3) for q in
                                                           np.quantile(distances, [0.25, 0.5, 0.75])]
                        if distances else None}
    print(json.dumps({"clip": args.clip or f"{args.run}/clip", **report}, indent=1))
    drawn = collections.defaultdict(collections.Counter)
    tiles, labels = [], []
    for i, prompt in enumerate(prompts):
        if sets[i] != "heldout":
            continue
        for image in images[i]:
            found = detect_objects(image)
            drawn[prompt][" + ".join(f"{o['color']} {o['shape']}" for o in found[:2]) or "nothing"] += 1
        if right[i].any() and len(tiles) < 8 * 12:
            for rank, j in enumerate(np.argsort(-scores[i])[:8]):
                tiles.append(images[i][j])
                labels.append(f"{prompt if rank == 0 else ''} {scores[i][j]:.2f}{'*' if right[i][j] else ''}")
    for prompt, counts in sorted(drawn.items()):
        print(f"{prompt}: drawn {dict(counts.most_common(6))}")
    if tiles:
        save_grid(out / "heldout_ranked.png", tiles, labels, columns=8, scale=3)


if __name__ == "__main__":
    main()
