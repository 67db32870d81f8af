"""The demo's accuracy estimates: best-of-n over disjoint groups of draws, the oracle, Wilson intervals, and the
prompt sets. Candidates are exact renders (right or wrong shape) with random CLIP orders, and every figure is
checked against a direct recomputation from the per-draw truth."""

import numpy as np
import pytest

from dalle_jax import config as config_lib
from dalle_jax.data.shapes import parse_holdout, render_objects
from dalle_jax.demo.evaluate import REPORT_N, accuracy_table, prompt_sets, wilson_interval
from dalle_jax.sampling.rerank import RankedSample


def _candidates(rng, num, prompt_shape, color):
    """`num` draws, each an exact render of the prompt's shape or of another one, in a random CLIP order."""
    truth = rng.random(num) < 0.4
    images = [render_objects([{"color": color, "shape": prompt_shape if ok else "cross", "box": [4, 4, 28, 28]}],
                             32) for ok in truth]
    scores = rng.normal(size=num)
    order = np.argsort(-scores, kind="stable")
    return [RankedSample(images[i], float(scores[i]), int(i)) for i in order], truth, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_best_of_n_averages_the_disjoint_groups(seed):
    rng = np.random.default_rng(seed)
    num = 16
    prompts = ["a red circle", "a blue square", "a green triangle"]
    kept, truths, all_scores = [], [], []
    for prompt in prompts:
        _, color, shape = prompt.split()
        candidates, truth, scores = _candidates(rng, num, shape, color)
        kept.append(candidates), truths.append(truth), all_scores.append(scores)

    table = accuracy_table(prompts, kept, "color_shape")
    assert set(table["best_of_n"]) == {n for n in REPORT_N if n <= num}
    for n, value in table["best_of_n"].items():
        expected = [truth[g * n + np.argmax(scores[g * n:(g + 1) * n])]
                    for truth, scores in zip(truths, all_scores, strict=True) for g in range(num // n)]
        assert value == pytest.approx(np.mean(expected)) and table["trials"][n] == len(expected)
        low, high = table["interval_95"][n]
        assert low <= value <= high
    assert table["best_of_n"][1] == pytest.approx(np.mean(truths))
    assert table["any_of_n"] == pytest.approx(np.mean([t.any() for t in truths]))
    assert table["prompts"] == 3 and table["distinct_prompts"] == 3
    assert table["right_samples"] == sum(int(t.sum()) for t in truths)  # every draw judged right counts once
    assert table["right_shape_distance_median"] < 0.01  # exact renders: drawn shapes, not blobs that pass


def test_wilson_interval_matches_the_closed_form():
    rng = np.random.default_rng(0)
    for _ in range(20):
        trials = int(rng.integers(1, 200))
        hits = int(rng.integers(0, trials + 1))
        low, high = wilson_interval(hits, trials)
        p, z = hits / trials, 1.959963984540054
        # the interval's ends are the two roots of (p - q)^2 = z^2 q (1 - q) / n
        for q in (low, high):
            if 0 < q < 1:
                assert (p - q) ** 2 == pytest.approx(z * z * q * (1 - q) / trials, rel=1e-3, abs=1e-9)
        assert low <= p <= high
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert np.diff(wilson_interval(5, 10)) > np.diff(wilson_interval(50, 100))  # more trials, narrower


def test_prompt_sets_cover_the_pairs_and_keep_the_holdout_apart():
    config = config_lib.resolve("demo")
    holdout = {f"{c} {s}" for c, s in parse_holdout(config.data.holdout)}
    sets = prompt_sets(config, 32, seed=3)
    assert all(len(prompts) == 32 for prompts in sets.values())
    single = {p.split(" ", 1)[1] for p in sets["in_distribution"]}
    assert len(single) == 32 - len(holdout) and not single & holdout  # every in-distribution pair, none held out
    assert {p.split(" ", 1)[1] for p in sets["heldout"]} == holdout
    assert all(sets["heldout"].count(p) == 32 // len(holdout) for p in set(sets["heldout"]))
    for name in ("position", "relations"):
        assert not any(pair in p for p in sets[name] for pair in holdout), name
    assert prompt_sets(config, 32, seed=3) == sets and prompt_sets(config, 32, seed=4) != sets


def test_sample_grid_shows_each_distinct_prompt_once(tmp_path):
    from PIL import Image

    from dalle_jax.demo.evaluate import save_sample_grid

    rng = np.random.default_rng(0)
    prompts = ["a red circle", "a blue square", "a red circle", "a green cross", "a blue square"]
    kept = [_candidates(rng, 4, p.split()[2], p.split()[1])[0] for p in prompts]
    save_sample_grid(tmp_path / "grid.png", prompts, kept, columns=4)
    save_sample_grid(tmp_path / "two.png", prompts, kept, columns=4, rows=2)
    with Image.open(tmp_path / "grid.png") as grid, Image.open(tmp_path / "two.png") as two:
        # same tile layout, so the height grows with the row count: 3 distinct prompts vs 2
        assert grid.size[0] == two.size[0] and grid.size[1] * 2 == pytest.approx(two.size[1] * 3, rel=0.05)
