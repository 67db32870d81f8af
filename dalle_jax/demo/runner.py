"""The demo's stage runner: every stage into one run directory, each skipped when done and resumed when
interrupted; `dalle-jax demo` calls `Demo.run_all`."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dalle_jax import config as config_lib
from dalle_jax import runs
from dalle_jax.config import Config
from dalle_jax.demo.report import write_report

log = logging.getLogger(__name__)
STAGES = ("data", "tokenizer", "dvae", "encode", "prior", "clip", "evaluate")


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
        return self.run / runs.STAGES_FILE

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
        return {"dataset_dir": build_dataset(self.config, runs.data_dir(self.run)),
                "num_train": self.config.data.num_train}

    def tokenizer(self) -> dict:
        return build_tokenizer(self.config, self.dataset_dir, self.run)

    def dvae(self) -> dict:
        return train_stage("dvae", self.config, self.run, progress=self.progress)

    def encode(self) -> dict:
        from dalle_jax.encode import encode_dataset

        tokens = encode_dataset(runs.stage_dir(self.run, "dvae"), self.dataset_dir, runs.tokens_dir(self.run),
                                posterior_topk=self.config.prior_train.encoded_topk, progress=self.progress)
        return {"token_dir": str(tokens)}

    def prior(self) -> dict:
        return train_stage("prior", self.config, self.run, data=self.done()["encode"]["token_dir"],
                           tokenizer=runs.tokenizer_path(self.run), progress=self.progress)

    def clip(self) -> dict:
        return train_stage("clip", self.config, self.run, data=self.dataset_dir,
                           tokenizer=runs.tokenizer_path(self.run), progress=self.progress)

    def evaluate(self) -> dict:
        from dalle_jax.demo.evaluate import SCORE_KEY, accuracy_table, image_to_image, prompt_sets, save_sample_grid
        from dalle_jax.sampling.rerank import load_run, sample_and_rerank

        run = load_run(self.run)
        sets = prompt_sets(self.config, self.prompts_per_set, self.seed)
        results: dict[str, Any] = {}
        for name, prompts in sets.items():
            kept = sample_and_rerank(run, prompts, num_samples=self.num_samples, top=self.num_samples,
                            seed=self.seed, batch_size=64, progress=self.progress)
            results[name] = accuracy_table(prompts, kept, SCORE_KEY)
            save_sample_grid(self.run / f"samples_{name}.png", prompts, kept, columns=min(8, self.num_samples))
        image_to_image(run, self.config, self.dataset_dir, self.run / "image_to_image.png", self.seed)
        return {"accuracy": results, "num_samples": self.num_samples}

    @property
    def dataset_dir(self) -> str:
        return self.done()["data"]["dataset_dir"]

    def run_all(self) -> dict:
        self.run.mkdir(parents=True, exist_ok=True)
        config_lib.save_config(self.config, self.run / runs.CONFIG)
        for name in STAGES:
            self.stage(name, getattr(self, name))
        report = write_report(self.run, self.done(), self.config, STAGES)
        return report


# ------------------------------------------------------------------------------------------------ stage bodies
# Shared with the experiment runner (dalle_jax.experiments.runner), which runs them into its own directories.

def build_dataset(config: Config, directory: str | Path) -> str:
    """The built-in shapes dataset for `config.data`, built under `directory` (reused when already built)."""
    from dalle_jax.data.pipeline import shapes_spec
    from dalle_jax.data.shapes import build_shapes

    return build_shapes(str(directory), shapes_spec(config.data))


def build_tokenizer(config: Config, dataset_dir: str, run: Path) -> dict:
    """The BPE tokenizer trained on the dataset's train captions, saved where `runs` looks for it in `run`."""
    from dalle_jax.data.tokenizer import TextTokenizer, captions_from_dataset

    t = config.text
    captions = captions_from_dataset(dataset_dir, "train")
    tokenizer = TextTokenizer.train(captions, vocab_size=t.vocab_size, text_len=t.text_len,
                                    pad_mode=t.pad_mode, dropout=t.bpe_dropout)
    tokenizer.save(runs.tokenizer_path(run))
    lengths = [len(ids) for ids in tokenizer.encode_unpadded(captions[:2000])]
    return {"vocab_size": tokenizer.vocab_size, "max_caption_tokens": max(lengths)}


def train_stage(stage: str, config: Config, run: Path, *, data: str | None = None, tokenizer: Path | None = None,
                progress: bool = True) -> dict:
    """Trains "dvae" (on config.data), "prior" (on the token dataset `data`) or "clip" (on the image dataset
    `data`) into run/<stage>; returns its final metrics as floats, its step and whether a signal stopped it."""
    if stage == "dvae":
        from dalle_jax.train.dvae import train_dvae

        result = train_dvae(config, run, progress=progress)
    elif stage == "prior":
        from dalle_jax.train.prior import train_prior

        result = train_prior(config, data, tokenizer, run, progress=progress)
    else:
        from dalle_jax.train.clip import train_clip

        result = train_clip(config, data, tokenizer, run, progress=progress)
    metrics = {k: float(v) for k, v in result["metrics"].items() if isinstance(v, (int, float))}
    return {**metrics, "step": result["step"], "preempted": result["preempted"]}


DEMO_PRESETS = ("demo", "compose", "ablation")  # the shapes presets `dalle-jax demo --preset` runs


def demo_config(quick: bool, holdout: str | None, seed: int, overrides: list[str], preset: str = "demo") -> Config:
    """`preset` (one of DEMO_PRESETS; quick with `quick`) with every training stage seeded by `seed` and the held-out
    pairs set."""
    if preset not in DEMO_PRESETS:
        raise config_lib.ConfigError(f"demo --preset {preset}: choose one of {', '.join(DEMO_PRESETS)} "
                                     "(the shapes presets)")
    sets = [f"{section}.seed={seed}" for section in ("dvae_train", "prior_train", "clip_train")]
    if holdout:
        sets.append(f"data.holdout={holdout}")
    return config_lib.resolve("quick" if quick else preset, sets + list(overrides))
