"""`dalle-jax demo`: the whole DALL·E pipeline on the built-in shapes data, into one run directory.

Stages, in order (each prints a one-line summary; rerunning skips finished stages and resumes an interrupted
one from its checkpoint):

    data       captioned shapes: train / validation / test, held-out (colour, shape) pairs never in train
    tokenizer  byte-level BPE on the train captions                       -> RUN/tokenizer.json
    dvae       the discrete VAE                                           -> RUN/dvae
    encode     every split -> dVAE tokens                                 -> RUN/tokens
    prior      the sparse transformer on [caption | image tokens]         -> RUN/prior
    clip       the CLIP-style reranker                                    -> RUN/clip
    evaluate   sample + rerank prompt sets, score with the exact shapes scorer, grids, image-to-image
    report     RUN/report.md and RUN/report.json

Afterwards `dalle-jax sample --run RUN --prompt "..."` works on the run directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dalle_jax import config as config_lib
from dalle_jax.config import Config

log = logging.getLogger("dalle_jax.demo")
STAGES = ("data", "tokenizer", "dvae", "encode", "prior", "clip", "evaluate")
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


# ------------------------------------------------------------------------------------------------ stages

@dataclasses.dataclass
class Demo:
    config: Config
    run: Path
    seed: int
    progress: bool = True
    num_samples: int = 16
    prompts_per_set: int = 32

    @property
    def state_file(self) -> Path:
        return self.run / "stages.json"

    def done(self) -> dict[str, Any]:
        return json.loads(self.state_file.read_text()) if self.state_file.is_file() else {}

    def stage(self, name: str, fn: Callable[[], dict]) -> dict:
        """Runs `fn` unless the stage finished before; records its summary and wall time."""
        done = self.done()
        if name in done:
            log.info("demo: %-9s done before (%.0f s) — skipped", name, done[name]["wall_s"])
            return done[name]
        start = time.perf_counter()
        summary = fn()
        if summary.get("preempted"):
            raise SystemExit(f"demo: {name} was stopped; rerun the same command to resume it")
        summary = {**summary, "wall_s": time.perf_counter() - start}
        done = self.done()
        done[name] = summary
        self.state_file.write_text(json.dumps(done, indent=2, default=float) + "\n")
        shown = {k: round(v, 4) for k, v in summary.items() if isinstance(v, float)}
        log.info("demo: %-9s %s", name, shown)
        return summary

    # ---- the stages

    def data(self) -> dict:
        from dalle_jax.data.pipeline import shapes_spec
        from dalle_jax.data.shapes import build_shapes

        spec = shapes_spec(self.config.data)
        return {"dataset_dir": build_shapes(str(self.run / "data"), spec), "num_train": spec.num_train}

    def tokenizer(self) -> dict:
        from dalle_jax.data.tokenizer import TextTokenizer, captions_from_dataset

        t = self.config.text
        captions = captions_from_dataset(self.dataset_dir, "train")
        tokenizer = TextTokenizer.train(captions, vocab_size=t.vocab_size, text_len=t.text_len,
                                        pad_mode=t.pad_mode, dropout=t.bpe_dropout)
        tokenizer.save(self.run / "tokenizer.json")
        lengths = [len(ids) for ids in tokenizer.encode_unpadded(captions[:2000])]
        return {"vocab_size": tokenizer.vocab_size, "max_caption_tokens": max(lengths)}

    def dvae(self) -> dict:
        from dalle_jax.train.dvae import train_dvae

        result = train_dvae(self.config, self.run, progress=self.progress)
        return {**_floats(result["metrics"]), "step": result["step"], "preempted": result["preempted"]}

    def encode(self) -> dict:
        from dalle_jax.encode import encode_dataset

        tokens = encode_dataset(self.run / "dvae", self.dataset_dir, self.run / "tokens", progress=self.progress)
        return {"token_dir": str(tokens)}

    def prior(self) -> dict:
        from dalle_jax.train.prior import train_prior

        result = train_prior(self.config, self.done()["encode"]["token_dir"], self.run / "tokenizer.json",
                             self.run, progress=self.progress)
        return {**_floats(result["metrics"]), "step": result["step"], "preempted": result["preempted"]}

    def clip(self) -> dict:
        from dalle_jax.train.clip import train_clip

        result = train_clip(self.config, self.dataset_dir, self.run / "tokenizer.json", self.run,
                            progress=self.progress)
        return {**_floats(result["metrics"]), "step": result["step"], "preempted": result["preempted"]}

    def evaluate(self) -> dict:
        from dalle_jax.generate import generate, load_generator

        generator = load_generator(self.run)
        sets = prompt_sets(self.config, self.prompts_per_set, self.seed)
        results: dict[str, Any] = {}
        for name, prompts in sets.items():
            kept = generate(generator, prompts, num_samples=self.num_samples, top=self.num_samples,
                            seed=self.seed, batch_size=64, progress=self.progress)
            results[name] = accuracy_table(prompts, kept, SCORE_KEY)
            save_sample_grid(self.run / f"samples_{name}.png", prompts, kept, columns=min(8, self.num_samples))
        image_to_image(generator, self.config, self.dataset_dir, self.run / "image_to_image.png", self.seed)
        return {"accuracy": results, "num_samples": self.num_samples}

    @property
    def dataset_dir(self) -> str:
        return self.done()["data"]["dataset_dir"]

    def run_all(self) -> dict:
        self.run.mkdir(parents=True, exist_ok=True)
        config_lib.save_config(self.config, self.run / "config.json")
        for name in STAGES:
            self.stage(name, getattr(self, name))
        report = write_report(self.run, self.done(), self.config)
        return report


def _floats(metrics: dict) -> dict:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


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
    perfect reranker would reach.
    """
    from dalle_jax.data.scorer import score

    num = len(kept[0])
    hits: dict[int, list[bool]] = {n: [] for n in REPORT_N if n <= num and num % n == 0}
    oracle = []
    for prompt, candidates in zip(prompts, kept, strict=True):
        right = {c.sample_index: bool(score(c.image, prompt)[key]) for c in candidates}
        order = [c.sample_index for c in candidates]
        for n, trials in hits.items():
            for group in range(num // n):
                trials.append(right[next(i for i in order if group * n <= i < (group + 1) * n)])
        oracle.append(any(right.values()))
    table = {n: float(np.mean(h)) for n, h in hits.items()}
    intervals = {n: wilson_interval(sum(h), len(h)) for n, h in hits.items()}
    return {"key": key, "prompts": len(prompts), "distinct_prompts": len(set(prompts)), "best_of_n": table,
            "interval_95": intervals, "trials": {n: len(h) for n, h in hits.items()},
            "any_of_n": float(np.mean(oracle))}


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


def image_to_image(generator: Any, config: Config, dataset_dir: str, out: Path, seed: int, count: int = 4) -> None:
    """Source image | its top-half token prefix | completions for a caption that changes the bottom object."""
    from dalle_jax.data.pipeline import caption_text, open_split
    from dalle_jax.data.scorer import parse_caption
    from dalle_jax.data.shapes import COLORS, SHAPES, with_article
    from dalle_jax.generate import decode_images, generate
    from dalle_jax.images import save_grid

    source = open_split(dataset_dir, "validation")
    examples = []
    for i in range(len(source)):
        caption = caption_text(source[i]["caption"])
        parsed = parse_caption(caption) if " above " in caption else None
        if parsed and len(parsed["objects"]) == 2:
            examples.append((source[i]["image"], parsed["objects"]))
        if len(examples) == count:
            break
    rows = generator.grid // 2
    rng = np.random.default_rng(seed)
    tiles, labels = [], []
    for image, (top, bottom) in examples:
        new = next((c, s) for c, s in zip(rng.permutation(list(COLORS)), rng.permutation(list(SHAPES) * 2),
                                          strict=False) if (c, s) != (bottom["color"], bottom["shape"]))
        prompt = f"{with_article(top['color'] + ' ' + top['shape'])} above {with_article(new[0] + ' ' + new[1])}"
        prefix = np.asarray(generator.dvae.encode(np.asarray(image, np.float32)[None] / 255.0))[0, :rows]
        shown_prefix = np.array(decode_images(generator, np.concatenate(
            [prefix.reshape(-1), np.zeros(generator.grid * (generator.grid - rows), np.int32)])[None])[0])
        shown_prefix[shown_prefix.shape[0] // 2:] = 255  # only the kept rows are real
        kept = generate(generator, [prompt], num_samples=8, top=3, seed=seed, prefix=prefix, progress=False)[0]
        tiles += [image, shown_prefix, *(k.image for k in kept)]
        labels += ["source", f"top {rows} rows", prompt, "#1", "#2"]
    save_grid(out, tiles, labels, columns=5, scale=max(1, 96 // tiles[0].shape[0]))


# ------------------------------------------------------------------------------------------------ report

def write_report(run: Path, done: dict, config: Config) -> dict:
    """report.json (everything) and report.md (the headline numbers, the accuracy-vs-N table, the images)."""
    import platform

    import jax

    def pick(stage: str, *keys: str) -> dict:
        return {k: done[stage][k] for k in keys if k in done.get(stage, {})}

    accuracy = done["evaluate"]["accuracy"]
    report = {
        "preset": config.name,
        "machine": {"platform": platform.platform(), "processor": _cpu_model() or platform.machine(),
                    "cpu_count": __import__("os").cpu_count(), "jax_backend": jax.default_backend(),
                    "jax": jax.__version__},
        "wall_s": {name: round(done[name]["wall_s"], 1) for name in STAGES if name in done},
        "dvae": pick("dvae", "step", "eval/mse", "eval/codebook_perplexity", "eval/codebook_used",
                     "eval/recon_color_shape_acc"),
        "prior": pick("prior", "step", "eval/text_loss", "eval/image_loss", "eval/image_loss_in_distribution",
                      "eval/image_loss_heldout", "eval/uniform_image_loss", "eval/bits_per_image_token"),
        "clip": pick("clip", "step", "eval/retrieval_top1", "eval/retrieval_top1_in_distribution",
                     "eval/retrieval_top1_heldout", "eval/image_to_text_top1", "eval/retrieval_chance"),
        "caption_match": accuracy,
        "num_samples": done["evaluate"]["num_samples"],
    }
    report["wall_s"]["total"] = round(sum(report["wall_s"].values()), 1)
    (run / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    n = report["num_samples"]

    def cell(table: dict, k: int) -> str:
        low, high = table["interval_95"][str(k)]
        return f"{100 * table['best_of_n'][str(k)]:.1f}% [{100 * low:.0f}, {100 * high:.0f}]"

    lines = [f"# dalle-jax demo report ({config.name} preset)", "",
             f"Machine: {report['machine']['processor']}, {report['machine']['cpu_count']} cores, "
             f"JAX {report['machine']['jax']} on {report['machine']['jax_backend']}.", "",
             "## Caption match (exact shapes scorer)", "",
             f"Each prompt gets {n} samples. N=1 scores every sample; best of {n} scores the CLIP-best of each "
             f"prompt's {n}; any of {n} counts prompts with at least one right sample (what a perfect reranker "
             "would reach). A sample is right when it shows every attribute of the caption and as many objects "
             "as it names (scorer key \"all\"). Brackets: 95% Wilson intervals over the trials (repeated prompts "
             "are not independent, so read them as a lower bound on the uncertainty).", "",
             f"| prompts (distinct) | scored on | N=1 (no reranking) | best of {n} by CLIP | any of {n} |",
             "|---|---|---:|---:|---:|"]
    for name, table in accuracy.items():
        lines.append(f"| {name} {table['prompts']} ({table['distinct_prompts']}) | {table['key']} | "
                     f"{cell(table, 1)} | {cell(table, n)} | {100 * table['any_of_n']:.1f}% |")
    sizes = sorted({int(k) for t in accuracy.values() for k in t["best_of_n"]})
    lines += ["", f"Accuracy vs N (CLIP-best of n, averaged over the {n}/n disjoint groups of each prompt's draws):",
              "", "| prompts | " + " | ".join(f"N={k}" for k in sizes) + " |", "|---|" + "---:|" * len(sizes)]
    for name, table in accuracy.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * table['best_of_n'][str(k)]:.1f}%" for k in sizes) + " |")
    lines += ["", "## Stages", "", "| stage | wall (s) | numbers |", "|---|---:|---|"]
    numbers = {"dvae": report["dvae"], "prior": report["prior"], "clip": report["clip"]}
    for name, wall in report["wall_s"].items():
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in numbers.get(name, {}).items())
        lines.append(f"| {name} | {wall:.0f} | {shown} |")
    lines += ["", "## Images", "", "![in distribution](samples_in_distribution.png)", "",
              "![held out](samples_heldout.png)", "", "![position](samples_position.png)", "",
              "![relations](samples_relations.png)", "", "![image to image](image_to_image.png)", ""]
    (run / "report.md").write_text("\n".join(lines))
    return report


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------ CLI

def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "demo", help="train the whole pipeline on the built-in shapes data and report (the main job)",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  dalle-jax demo --out runs/demo\n  dalle-jax demo --quick --out runs/quick\n"
               "  dalle-jax demo --out runs/demo2 --holdout 'red triangle,blue circle' --seed 1")
    parser.add_argument("--out", default="runs/demo", help="run directory (default runs/demo); rerun to resume")
    parser.add_argument("--quick", action="store_true", help="the same stages at minimal sizes (the quick preset)")
    parser.add_argument("--holdout", help="comma-separated '<colour> <shape>' pairs kept out of train "
                                          "(default: red triangle,blue circle,yellow cross,green square)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every training stage and of sampling")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config value of the preset (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=_cli)


def demo_config(quick: bool, holdout: str | None, seed: int, overrides: list[str]) -> Config:
    sets = [f"{section}.seed={seed}" for section in ("dvae_train", "prior_train", "clip_train")]
    if holdout:
        sets.append(f"data.holdout={holdout}")
    return config_lib.resolve("quick" if quick else "demo", sets + list(overrides))


def _cli(args: argparse.Namespace) -> int:
    config = demo_config(args.quick, args.holdout, args.seed, args.set)
    run = Path(args.out)
    saved = run / "config.json"
    if saved.is_file() and config_lib.load_config(saved) != config:
        raise config_lib.ConfigError(f"{run} holds a demo run with a different config ({saved}); use another "
                                     "--out or the same options")
    demo = Demo(config, run, args.seed, progress=not args.quiet,
                num_samples=4 if args.quick else 16, prompts_per_set=2 if args.quick else 32)
    report = demo.run_all()
    print(f"demo: done in {report['wall_s']['total']:.0f} s -> {run / 'report.md'}")
    return 0
