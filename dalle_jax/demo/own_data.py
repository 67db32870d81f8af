"""`dalle-jax train`: the demo's resumable stage runner over a user's own captioned images.

The data stage turns SRC into a TFDS dataset in RUN/data (a folder of images with name.txt captions or a manifest,
web-dataset tar shards, parquet files; a prepared dataset directory is used as it is). The dVAE is trained, or
taken from --dvae (a dVAE run, or the released OpenAI dVAE converted by `dalle-jax convert openai-dvae`), linked
as RUN/dvae so that `sample` and `serve` find the usual layout. With --init-from SRC_RUN the tokenizer and the
dVAE are SRC_RUN's (the prior's tokens must keep their meaning) and the prior and CLIP start from its weights.

The evaluate stage has no exact scorer for a user's images; it measures what can be measured on any data: for
held-back validation captions, the CLIP-best of N samples beside the real image, the CLIP score of the samples vs
that of the real images, and the Fréchet distance in CLIP space of the samples (and, as the ceiling this dVAE
allows, of its reconstructions) to the real images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dalle_jax import config as config_lib
from dalle_jax import runs
from dalle_jax.config import Config, ConfigError
from dalle_jax.demo.report import stage_summary, stage_table
from dalle_jax.demo.runner import STAGES, Demo, build_tokenizer, train_stage
from dalle_jax.errors import DatasetError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class BuildOptions:
    """How SRC becomes a dataset (the `data folder` / `data shards` options)."""

    validation_fraction: float = 0.05
    workers: int = 1
    image_column: str | None = None
    caption_column: str | None = None
    manifest: str | None = None


def build_dataset_from(source: str, image_size: int, out: Path, options: BuildOptions, *, verbose: bool) -> dict:
    """SRC -> a dataset version directory under `out` (or SRC itself when it already is one); its build report."""
    path = Path(source).expanduser()
    prepared = _prepared_dataset(path)
    if prepared is not None:
        return {"dataset_dir": str(prepared.resolve()), "build": "prepared dataset, used as it is"}
    if not path.exists():
        raise FileNotFoundError(f"--data {path} does not exist; pass a folder of images with name.txt captions, "
                                "web-dataset .tar shards, .parquet files, or a prepared dataset directory")
    try:
        version_dir, report = _build(path, image_size, out, options, verbose)
    except FileExistsError as err:  # a build from files that have changed since: the message says what to do
        raise DatasetError(str(err)) from err
    return {"dataset_dir": version_dir, "build": report.summary()}


def _build(path: Path, image_size: int, out: Path, options: BuildOptions, verbose: bool) -> tuple[str, Any]:
    import jax

    from dalle_jax import distributed
    from dalle_jax.data import folder, shards

    if shards.is_shard_source(path):  # on several hosts each converts its share of the shards
        spec = shards.ShardsSpec((str(path),), image_size, options.image_column, options.caption_column,
                                 options.validation_fraction)
        return shards.build_shards(str(out), spec, workers=options.workers, verbose=verbose,
                                   process_index=jax.process_index(), process_count=jax.process_count(),
                                   barrier=distributed.barrier)
    # a folder: process 0 builds; the others then find its build and reuse it (each build scans the whole folder,
    # so process 0 keeps its own result instead of scanning again)
    spec = folder.FolderSpec(str(path), image_size, options.manifest, options.validation_fraction)
    built = folder.build_folder(str(out), spec, verbose=verbose) if distributed.is_main() else None
    distributed.barrier("dalle_jax_build_folder")
    return built if built is not None else folder.build_folder(str(out), spec)


def _prepared_dataset(path: Path) -> Path | None:
    """A built dataset: `path` itself, or the one dataset under a TFDS data dir (what `data emoji --out` wrote). A
    folder of images is searched only when its top level holds no files (an image folder has some)."""
    if (path / "dataset_info.json").is_file():
        return path
    if not path.is_dir() or any(p.is_file() for p in path.iterdir()):
        return None
    try:
        return runs.find_dataset_dir(path)
    except DatasetError:
        return None


@dataclasses.dataclass
class OwnDataRun(Demo):
    """`Demo` with the data, tokenizer, dVAE and evaluate stages for a user's data (see the module docstring)."""

    source: str = ""
    dvae_dir: str | None = None
    init_from: str | None = None
    build_options: BuildOptions = dataclasses.field(default_factory=BuildOptions)
    eval_captions: int = 32  # validation captions sampled for the report (fewer when validation is smaller)

    def data(self) -> dict:
        built = build_dataset_from(self.source, self.config.data.image_size, runs.data_dir(self.run),
                                   self.build_options, verbose=self.progress)
        from dalle_jax.data.pipeline import open_split

        splits = {split: len(open_split(built["dataset_dir"], split)) for split in ("train", "validation")}
        return {**built, "num_train": splits["train"], "num_validation": splits["validation"]}

    def tokenizer(self) -> dict:
        if self.init_from:  # the source's BPE ids, or its prior and CLIP would read other words
            source = runs.tokenizer_path(self.init_from)
            if not source.is_file():
                source = runs.stage_dir(self.init_from, "prior") / runs.TOKENIZER
            shutil.copyfile(source, runs.tokenizer_path(self.run))
            return {"copied_from": str(source)}
        return build_tokenizer(self.config, self.dataset_dir, self.run)

    def dvae(self) -> dict:
        if self.dvae_dir is None:
            return train_stage("dvae", self.config, self.run, progress=self.progress)
        link = runs.stage_dir(self.run, "dvae")
        target = runs.find_model_dir(self.dvae_dir, "dvae").resolve()
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            raise ConfigError(f"{link} holds a dVAE trained in this run; --dvae would replace it: use another --out")
        link.symlink_to(target, target_is_directory=True)
        return {"dvae_dir": str(target)}

    def evaluate(self) -> dict:
        from dalle_jax.sampling.rerank import load_run

        return evaluate_own_data(load_run(self.run), self.dataset_dir, self.run, count=self.eval_captions,
                                 num_samples=self.num_samples, seed=self.seed, progress=self.progress)

    def run_all(self) -> dict:
        self.run.mkdir(parents=True, exist_ok=True)
        self.stage("data", self.data)
        self.config = bind_config(self.config, self.dataset_dir, self.dvae_dir, self.init_from)
        saved = self.run / runs.CONFIG
        if saved.is_file() and config_lib.load_config(saved) != self.config:
            raise ConfigError(f"{self.run} holds a run with a different config ({saved}); use another --out or the "
                              "same options")
        config_lib.save_config(self.config, saved)
        for name in STAGES[1:]:
            self.stage(name, getattr(self, name))
        return write_own_report(self.run, self.done(), self.config)


def bind_config(config: Config, dataset_dir: str, dvae_dir: str | None, init_from: str | None) -> Config:
    """The preset bound to the built dataset (and the given dVAE's architecture, and the fine-tuning source)."""
    from dalle_jax.data.pipeline import open_split
    from dalle_jax.models.dvae import DVAEConfig

    size = int(np.asarray(open_split(dataset_dir, "train")[0]["image"]).shape[0])
    if size != config.data.image_size:
        raise ConfigError(f"{dataset_dir} holds {size} px images and preset '{config.name}' trains at "
                          f"{config.data.image_size} px: pass --set data.image_size={size}, or the source images "
                          "to build them at the preset's size")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, dataset="folder",
                                                                  data_dir=str(Path(dataset_dir).resolve())))
    if dvae_dir is not None:  # the prior's image vocabulary and grid follow the dVAE it reads
        config = dataclasses.replace(config, dvae=runs.read_model_config(runs.find_model_dir(dvae_dir, "dvae"),
                                                                        "dvae", DVAEConfig))
    validation = len(open_split(dataset_dir, "validation"))
    if validation < 2:
        raise ConfigError(f"{dataset_dir} has {validation} validation image; the reranker's eval and the report need "
                          "two or more: pass a larger --validation-fraction or more images")
    if validation < config.clip_train.retrieval_batch:  # an eval setting: retrieval among fewer candidates
        fitted = 2 ** int(np.log2(validation))
        log.info("train: %d validation images: CLIP retrieval is measured among %d candidates instead of %d",
                 validation, fitted, config.clip_train.retrieval_batch)
        config = config_lib.apply_overrides(config, [f"clip_train.retrieval_batch={fitted}"])
    if init_from:
        source = str(Path(init_from).resolve())
        config = config_lib.apply_overrides(config, [f"prior_train.init_from={source}",
                                                     f"clip_train.init_from={source}"])
    return config


def evaluate_own_data(run: Any, dataset_dir: str, out: Path, *, count: int, num_samples: int, seed: int,
                      progress: bool) -> dict:
    """Validation captions -> CLIP-best of `num_samples` beside the real image (samples.png), CLIP scores of both,
    and Fréchet distances in CLIP space (samples and dVAE reconstructions to the real images)."""
    import jax.numpy as jnp

    from dalle_jax.data.pipeline import caption_text, open_split
    from dalle_jax.experiments.metrics import frechet_distance
    from dalle_jax.images import save_grid
    from dalle_jax.sampling.rerank import clip_scores, encode_prompts, reconstruct_images, sample_and_rerank

    split = open_split(dataset_dir, "validation")
    examples = sorted((split[i] for i in range(min(count, len(split)))), key=lambda e: int(e["id"]))
    captions = [caption_text(e["caption"]) for e in examples]
    real = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
    kept = sample_and_rerank(run, captions, num_samples=num_samples, top=1, seed=seed, batch_size=64,
                             progress=progress)
    samples = np.stack([k[0].image for k in kept])
    ids = encode_prompts(run.clip_tokenizer, captions)
    real_scores = np.array([clip_scores(run, real[i:i + 1], ids[i:i + 1])[0] for i in range(len(captions))])
    sample_scores = np.array([k[0].clip_score for k in kept])
    reconstructed = reconstruct_images(run, real)

    def embed(images: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(run.clip.encode_image(jnp.asarray(images[i:i + 64])))
                               for i in range(0, len(images), 64)])

    reference = embed(real)
    shown = min(len(captions), 16)
    tiles = [tile for i in range(shown) for tile in (real[i], reconstructed[i], samples[i])]
    labels = [label for i in range(shown) for label in
              (captions[i], "dVAE reconstruction", f"best of {num_samples}, CLIP {sample_scores[i]:.2f}")]
    save_grid(out / "samples.png", tiles, labels, columns=6, scale=max(1, 96 // real.shape[1]))
    return {
        "captions": len(captions), "num_samples": num_samples,
        "clip_score_samples": _mean_interval(sample_scores), "clip_score_real": _mean_interval(real_scores),
        "clip_score_gap": _mean_interval(sample_scores - real_scores),  # paired: the same captions
        # a covariance needs two images; None says there were too few validation images to measure it
        "frechet_samples": frechet_distance(embed(samples), reference) if len(real) > 1 else None,
        "frechet_reconstructions": frechet_distance(embed(reconstructed), reference) if len(real) > 1 else None,
    }


def _mean_interval(values: np.ndarray) -> dict:
    """Mean and a normal-approximation 95% interval of the mean."""
    values = np.asarray(values, np.float64)
    half = 1.96 * values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": float(values.mean()), "low": float(values.mean() - half), "high": float(values.mean() + half)}


def _frechet_line(evaluation: dict) -> str:
    count = evaluation["captions"]
    if evaluation["frechet_samples"] is None:
        return f"Fréchet distance: not measured ({count} validation image; it needs two or more)."
    return (f"Fréchet distance in CLIP image space to the {count} real images (lower is closer; with fewer images "
            "than embedding dimensions it is biased upward, so compare runs at the same count): samples "
            f"{evaluation['frechet_samples']:.4g}, dVAE reconstructions {evaluation['frechet_reconstructions']:.4g} "
            "(the ceiling a prior reaches through this dVAE).")


def write_own_report(run: Path, done: dict, config: Config) -> dict:
    """report.json and report.md for a run on the user's data."""
    evaluation = done["evaluate"]
    report = {**stage_summary(done, config, STAGES), "data": {k: done["data"][k] for k in
                                                              ("dataset_dir", "build", "num_train", "num_validation")},
              "evaluate": evaluation}
    (run / "report.json").write_text(json.dumps(report, indent=2) + "\n")

    def cell(d: dict) -> str:
        return f"{d['mean']:.3f} [{d['low']:.3f}, {d['high']:.3f}]"

    n, count = evaluation["num_samples"], evaluation["captions"]
    lines = [f"# dalle-jax train report ({config.name} preset)", "",
             f"Data: {report['data']['num_train']} train / {report['data']['num_validation']} validation images "
             f"from `{report['data']['dataset_dir']}` ({report['data']['build']}).", "",
             f"Machine: {report['machine']['processor']}, {report['machine']['cpu_count']} cores, JAX "
             f"{report['machine']['jax']} on {report['machine']['jax_backend']}; total {report['wall_s']['total']:.0f}"
             " s.", "",
             f"## Samples for {count} validation captions", "",
             "The validation images were never trained on (a caption may repeat a train caption).", "",
             f"Each caption gets {n} samples; the CLIP-best is kept. Brackets: 95% intervals of the mean over the "
             "captions. The CLIP score is the reranker's cosine similarity of an image with its caption; the gap "
             "is paired (sample minus real image, caption by caption).", "",
             "| | mean CLIP score |", "|---|---:|",
             f"| best of {n} samples | {cell(evaluation['clip_score_samples'])} |",
             f"| the real images | {cell(evaluation['clip_score_real'])} |",
             f"| gap (samples - real) | {cell(evaluation['clip_score_gap'])} |", "",
             _frechet_line(evaluation), "",
             "![real | reconstruction | sample](samples.png)", "", *stage_table(report), "",
             "## Curves", "", *[f"![{name}]({name}/loss_curve.png)" for name in ("dvae", "prior", "clip")
                                 if (run / name / "loss_curve.png").is_file()],
             "", "The dVAE's reconstruction grids are in `dvae/reconstructions/`.", ""]
    (run / "report.md").write_text("\n".join(lines))
    return report
