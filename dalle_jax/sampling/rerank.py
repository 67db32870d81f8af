"""Captions (optionally plus the top rows of an image) -> reranked PNGs; what `dalle-jax sample` runs.

For each prompt: draw N candidate token grids from the prior (`dalle_jax.sampling.sampler`), decode them with the dVAE,
score every candidate against the caption with the CLIP reranker and keep the best K (the paper draws 512 and
keeps the top 32 by CLIP score). Output layout, exactly:

    OUT/{p:04d}_{r:02d}.png   prompt index p (0-based, input order), rank r (0 = best)
    OUT/samples.jsonl         one line per kept image: prompt_index, prompt, rank, file, clip_score, seed
    OUT/grid.png              one row per prompt, captions written on it

Randomness: candidate i of prompt p is sample `p * N + i` of the sampler's per-sample key stream for `seed`, so
the same (seed, prompts, N) gives the same images whatever `--batch-size` or `--mesh` is.

`--mesh D,F,T` samples on a (data, fsdp, tensor) device mesh, e.g. all chips of a TPU VM: the prior's parameters
are sharded by the default logical rules (FSDP over "fsdp", heads over "tensor") and each sampler batch is split
over data x fsdp (padded to a multiple of it). Decoding and reranking stay on one device.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_jax import runs, sharding
from dalle_jax.data.tokenizer import CaptionTruncatedWarning, TextTokenizer
from dalle_jax.errors import InputError
from dalle_jax.models.dvae import DVAE
from dalle_jax.models.prior import Prior
from dalle_jax.sampling.sampler import SampleConfig, check_serving_dtype, sample_tokens, serving_prior

log = logging.getLogger(__name__)


class SampleInputError(InputError):
    """A prompt, image or checkpoint that cannot be used; the message names it and the fix."""


@dataclasses.dataclass
class LoadedRun:
    """A run's dVAE, prior, tokenizer and (optionally) CLIP reranker, loaded and checked against each other."""

    dvae: DVAE
    prior: Prior
    tokenizer: TextTokenizer  # the prior's
    clip: Any | None  # models.clip.CLIP, or None to skip reranking
    clip_tokenizer: TextTokenizer | None
    image_size: int

    @property
    def grid(self) -> int:
        return self.prior.config.grid_size


# ------------------------------------------------------------------------------------------------ loading

def _stage_dir(run: str | Path | None, explicit: str | Path | None, stage: str) -> Path | None:
    if explicit:
        return Path(explicit)
    if run:
        return runs.stage_dir(run, stage)
    return None


def load_run(run: str | Path | None = None, *, dvae: str | Path | None = None, prior: str | Path | None = None,
             clip: str | Path | None = None, rerank: bool = True, dtype: str = "float32") -> LoadedRun:
    """Loads RUN/{dvae,prior,clip} (or explicit directories) and checks they fit together before compiling.

    `dtype` "bfloat16" samples with the prior's block weights, compute and KV cache in bf16
    (`sampler.serving_prior`)."""
    dvae_dir, prior_dir = _stage_dir(run, dvae, "dvae"), _stage_dir(run, prior, "prior")
    if dvae_dir is None or prior_dir is None:
        raise SampleInputError("pass --run RUN (holding dvae/, prior/ and clip/) or both --dvae and --prior")
    for name, directory in (("dVAE", dvae_dir), ("prior", prior_dir)):
        if not directory.is_dir():
            raise SampleInputError(f"{name} directory {directory} does not exist")
    check_serving_dtype(dtype)  # before anything loads
    prior_model, tokenizer, config = runs.load_prior(prior_dir)
    prior_model = serving_prior(prior_model, dtype)
    dvae_model = runs.load_dvae(dvae_dir)
    p, d = prior_model.config, dvae_model.config
    if d.vocab_size != p.image_vocab_size:
        raise SampleInputError(f"the dVAE in {dvae_dir} has {d.vocab_size} codes but the prior in {prior_dir} "
                               f"predicts {p.image_vocab_size}: they were not trained together")
    image_size = config.data.image_size
    if image_size % d.downsample or image_size // d.downsample != p.grid_size:
        raise SampleInputError(f"the dVAE in {dvae_dir} turns {image_size}px images into "
                               f"{image_size // d.downsample}x{image_size // d.downsample} grids but the prior in "
                               f"{prior_dir} models {p.grid_size}x{p.grid_size}")
    clip_model = clip_tokenizer = None
    clip_dir = _stage_dir(run, clip, "clip")
    if rerank:
        if clip_dir is None or not clip_dir.is_dir():
            raise SampleInputError(f"CLIP directory {clip_dir} does not exist: train it with `dalle-jax "
                                   "train-clip`, pass --clip DIR, or --no-rerank to keep samples in draw order")
        clip_model, clip_tokenizer, _ = runs.load_clip(clip_dir)
        if clip_model.config.image_size != image_size:
            raise SampleInputError(f"the CLIP model in {clip_dir} scores {clip_model.config.image_size}px images "
                                   f"but the dVAE decodes {image_size}px")
    return LoadedRun(dvae_model, prior_model, tokenizer, clip_model, clip_tokenizer, image_size)


# ------------------------------------------------------------------------------------------------ inputs

def encode_prompts(tokenizer: TextTokenizer, prompts: list[str]) -> np.ndarray:
    """Prompts -> (P, T) ids. Empty prompts are refused; long ones are truncated with a warning saying what
    was kept. Characters the BPE never saw are handled by its byte-level alphabet."""
    for i, prompt in enumerate(prompts):
        if not prompt.strip():
            raise SampleInputError(f"prompt {i} is empty or whitespace: {prompt!r}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CaptionTruncatedWarning)
        ids = tokenizer.encode(prompts)
    if any(issubclass(w.category, CaptionTruncatedWarning) for w in caught):
        for i, prompt in enumerate(prompts):
            if len(tokenizer.encode_unpadded([prompt])[0]) > tokenizer.text_len:
                kept = tokenizer.decode(ids[i : i + 1])[0]
                log.warning("prompt %d is longer than text_len=%d tokens; kept: %r", i, tokenizer.text_len, kept)
    return ids


def read_image(path: str | Path, flag: str = "--image-prefix") -> Any:
    """A PIL image, fully read; a missing, unreadable or decompression-bomb file is one SampleInputError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise SampleInputError(f"{flag} {path}: no such file") from None
    except Image.DecompressionBombError as error:
        raise SampleInputError(f"{flag} {path}: refused, too many pixels ({error})") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise SampleInputError(f"{flag} {path}: not a readable image ({error})") from None


def prefix_from_image(run: LoadedRun, image: Any, rows: int) -> np.ndarray:
    """An image (PIL, from `read_image`) of any size or mode -> the dVAE tokens of its top `rows` rows, (rows, grid)."""
    from dalle_jax.data.folder import preprocess_image

    if not 0 < rows < run.grid:
        raise SampleInputError(f"--prefix-rows {rows} must be between 1 and {run.grid - 1} (the grid has "
                               f"{run.grid} rows; at least one must be generated)")
    pixels, _ = preprocess_image(image, run.image_size)  # as the dataset builders do
    tokens = run.dvae.encode(jnp.asarray(pixels[None], jnp.float32) / 255.0)
    return np.asarray(tokens)[0, :rows]  # (rows, grid)


# ------------------------------------------------------------------------------------------------ sampling

@nnx.jit
def _decode(dvae: DVAE, tokens: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(dvae.decode(tokens) * 255.0), 0, 255).astype(jnp.uint8)


@nnx.jit
def _clip_scores(clip: Any, images: jax.Array, text_ids: jax.Array) -> jax.Array:
    from dalle_jax.models.clip import pair_similarity

    return pair_similarity(clip, images, text_ids)


def decode_images(run: LoadedRun, tokens: np.ndarray) -> np.ndarray:
    """(B, N) image tokens -> (B, H, W, 3) uint8."""
    grid = tokens.reshape(len(tokens), run.grid, run.grid)
    return np.asarray(_decode(run.dvae, jnp.asarray(grid)))


def reconstruct_images(run: LoadedRun, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """(B, H, W, 3) uint8 images -> their round trip through the dVAE (argmax tokens, decoded), uint8, encoded
    `batch` at a time."""
    tokens = np.concatenate([np.asarray(run.dvae.encode(jnp.asarray(images[i:i + batch], jnp.float32) / 255.0))
                             for i in range(0, len(images), batch)])
    return decode_images(run, tokens.reshape(len(images), -1))


def clip_scores(run: LoadedRun, images: np.ndarray, prompt_ids: np.ndarray) -> np.ndarray:
    """CLIP cosine similarity of each image with the prompt (its CLIP token ids, (1, T)), (B,)."""
    ids = np.broadcast_to(prompt_ids, (len(images), prompt_ids.shape[-1]))
    return np.asarray(_clip_scores(run.clip, jnp.asarray(images), jnp.asarray(ids)))


@dataclasses.dataclass
class RankedSample:
    """One decoded candidate of a prompt, in CLIP order (or draw order without a reranker)."""

    image: np.ndarray  # (H, W, 3) uint8
    clip_score: float | None
    sample_index: int  # candidate index within its prompt


def check_counts(num_samples: int, top: int, batch_size: int) -> None:
    """--num-samples, --top and --batch-size make sense together (checked before anything loads)."""
    if num_samples < 1:
        raise SampleInputError(f"--num-samples {num_samples} must be at least 1")
    if not 1 <= top <= num_samples:
        raise SampleInputError(f"--top {top} must be between 1 and --num-samples {num_samples}")
    if batch_size < 1:
        raise SampleInputError(f"--batch-size {batch_size} must be positive")


def sample_and_rerank(run: LoadedRun, prompts: list[str], *, num_samples: int, top: int, seed: int,
                      sample_config: SampleConfig | None = None, batch_size: int = 64,
                      prefix: np.ndarray | None = None, mesh=None, rules=None, progress: bool = True,
                      on_prompt: Callable[[int, str, list[RankedSample]], None] | None = None,
                      timings: dict[str, float] | None = None, concepts: list[list[str]] | None = None
                      ) -> list[list[RankedSample]]:
    """For each prompt, `num_samples` candidates reranked by CLIP; the best `top` in score order.

    Candidates are drawn, decoded and scored `batch_size` at a time and only the best `top` so far are kept, so
    memory does not grow with `num_samples` (the order is that of a stable sort of all N scores, best first, ties
    by draw index). Without a reranker only the first `top` draws are made (later draws would not change them).
    `on_prompt(p, prompt, kept)` is called as each prompt finishes (`SampleWriter.add` writes its files then).
    `timings`, if given, accumulates the seconds spent "sampling" (the prior), "decoding" (the dVAE) and "scoring"
    (CLIP, and keeping the best). `concepts[p]`: prompt p's concept captions for concept guidance
    (`sample_config.concept_scale`; an empty list samples that prompt without it); CLIP scores the prompt itself.
    """
    from tqdm.auto import tqdm

    text, cfg, drawn = _prepare_prompts(run, prompts, num_samples, top, batch_size, sample_config, prefix)
    params = nnx.state(run.prior, nnx.Param)  # split once, not per batch
    if mesh is not None:
        rules = rules if rules is not None else sharding.DEFAULT_RULES  # the sampler's default too
        params = sharding.shard_state(params, mesh, rules)
    prior = (nnx.graphdef(run.prior), params)
    if concepts is not None and len(concepts) != len(prompts):
        raise SampleInputError(f"{len(concepts)} concept lists for {len(prompts)} prompts: give one per prompt")
    bar = tqdm(total=len(prompts) * drawn, desc="candidates", unit="sample", disable=not progress, dynamic_ncols=True)
    results = []
    for p, prompt in enumerate(prompts):
        concept_ids = encode_prompts(run.tokenizer, concepts[p]) if concepts and concepts[p] else None
        prompt_cfg = cfg if concept_ids is not None else dataclasses.replace(cfg, concept_scale=0.0)
        kept = _draw_and_rank(run, prior, [prompt], text[p : p + 1], [p * num_samples], drawn=drawn, top=top, seed=seed,
                              cfg=prompt_cfg, per_call=batch_size, prefix=prefix, mesh=mesh, rules=rules,
                              timings=timings, concept_ids=concept_ids,
                              on_batch=lambda done, p=p: bar.update(p * drawn + done - bar.n))[0]
        results.append(kept)
        if on_prompt is not None:
            on_prompt(p, prompt, kept)
    bar.close()
    return results


def sample_and_rerank_together(run: LoadedRun, prompts: list[str], *, num_samples: int, top: int, seed: int,
                               sample_config: SampleConfig | None = None, batch_size: int = 64,
                               prefix: np.ndarray | None = None,
                               on_progress: Callable[[int, int], None] | None = None) -> list[list[RankedSample]]:
    """Prompts that share every setting, drawn in the same sampler calls, each exactly as if it were alone:
    prompt p's candidate i is sample i of `seed`'s stream, as `sample_and_rerank(run, [prompt], ...)` draws it, so
    a request served in a batch with others gets the images it would get alone (`dalle-jax serve` batches
    concurrent requests this way). A call holds `batch_size` candidates in all, split between the prompts;
    `on_progress(done, total)` follows the candidates drawn per prompt."""
    text, cfg, drawn = _prepare_prompts(run, prompts, num_samples, top, batch_size, sample_config, prefix)
    prior = (nnx.graphdef(run.prior), nnx.state(run.prior, nnx.Param))
    report = None if on_progress is None else (lambda done: on_progress(done, drawn))
    return _draw_and_rank(run, prior, prompts, text, [0] * len(prompts), drawn=drawn, top=top, seed=seed, cfg=cfg,
                          per_call=max(1, batch_size // len(prompts)), prefix=prefix, on_batch=report)


def _prepare_prompts(run: LoadedRun, prompts: list[str], num_samples: int, top: int, batch_size: int,
                     sample_config: SampleConfig | None, prefix: np.ndarray | None
                     ) -> tuple[np.ndarray, SampleConfig, int]:
    """(caption ids (P, T), the sample config with the prefix's rows, candidates to draw per prompt)."""
    check_counts(num_samples, top, batch_size)
    text = encode_prompts(run.tokenizer, prompts)
    cfg = dataclasses.replace(sample_config or SampleConfig(), prefix_rows=0 if prefix is None else len(prefix))
    return text, cfg, num_samples if run.clip is not None else top


def _draw_and_rank(run: LoadedRun, prior: tuple[Any, Any], prompts: list[str], text: np.ndarray, offsets: list[int],
                   *, drawn: int, top: int, seed: int, cfg: SampleConfig, per_call: int,
                   prefix: np.ndarray | None = None, mesh=None, rules=None, timings: dict[str, float] | None = None,
                   on_batch: Callable[[int], None] | None = None, concept_ids: np.ndarray | None = None
                   ) -> list[list[RankedSample]]:
    """Candidates 0 .. drawn - 1 of each prompt (caption ids `text[p]`; candidate i is sample offsets[p] + i of
    `seed`'s stream), `per_call` of every prompt in each sampler call (rows prompt-major); each batch is decoded and
    scored, and only the best `top` per prompt are kept. `on_batch(done)`: candidates drawn per prompt so far;
    `timings` as in `sample_and_rerank`; `concept_ids` (K, T): concept captions every row is guided with."""
    clip_ids = [None if run.clip is None else run.clip_tokenizer.encode([prompt]) for prompt in prompts]
    kept: list[list[RankedSample]] = [[] for _ in prompts]
    for start in range(0, drawn, per_call):
        count = min(per_call, drawn - start)
        rows = len(prompts) * count  # prompt p's rows are p * count ... (p + 1) * count - 1
        batch_prefix = None if prefix is None else np.broadcast_to(prefix, (rows, *prefix.shape))
        sample_ids = (np.asarray(offsets)[:, None] + np.arange(start, start + count)).reshape(-1)
        clock = time.perf_counter()
        batch_concepts = None if concept_ids is None else np.broadcast_to(concept_ids, (rows, *concept_ids.shape))
        tokens = sample_tokens(prior, np.repeat(text, count, axis=0), seed, cfg, pad_ids=run.tokenizer.pad_ids(),
                               prefix=batch_prefix, mesh=mesh, rules=rules, sample_offset=sample_ids,
                               concepts=batch_concepts)
        clock = _lap(timings, "sampling", clock)
        images = decode_images(run, tokens)
        clock = _lap(timings, "decoding", clock)
        for p in range(len(prompts)):
            kept[p] = _keep_best(run, kept[p], images[p * count : (p + 1) * count], clip_ids[p], start, top)
        _lap(timings, "scoring", clock)
        if on_batch is not None:
            on_batch(start + count)
    return [k[:top] for k in kept]


def _lap(timings: dict[str, float] | None, name: str, since: float) -> float:
    """Adds the seconds since `since` to timings[name] (if timings is given); returns now."""
    now = time.perf_counter()
    if timings is not None:
        timings[name] = timings.get(name, 0.0) + now - since
    return now


def _keep_best(run: LoadedRun, kept: list[RankedSample], images: np.ndarray, clip_ids: np.ndarray | None,
               start: int, top: int) -> list[RankedSample]:
    """`kept` plus decoded candidates `start, start + 1, ...` of one prompt: the best `top` by CLIP score (a stable
    sort, ties by draw index), or all of them in draw order without a reranker."""
    if run.clip is None:
        return kept + [RankedSample(images[i], None, start + i) for i in range(len(images))]
    scores = clip_scores(run, images, clip_ids)
    kept = kept + [RankedSample(images[i], float(scores[i]), start + i) for i in range(len(images))]
    return sorted(kept, key=lambda c: (-c.clip_score, c.sample_index))[:top]


# Files `SampleWriter` writes: {p:04d}_{r:02d}.png, samples.jsonl, grid.png.
_OUTPUT_NAME = re.compile(r"^(\d{4}_\d{2}\.png|samples\.jsonl|grid\.png)$")


class SampleWriter:
    """Writes the documented output layout prompt by prompt, so an interrupted run keeps what it finished.

    Made before anything is loaded: an out-dir that is a file or cannot be written fails at once, and the files of
    an earlier sample run in it are removed (they would mix with this run's). grid.png is drawn by `finish`.
    """

    def __init__(self, out_dir: str | Path, seed: int):
        self.out, self.seed = Path(out_dir), seed
        if self.out.exists() and not self.out.is_dir():
            raise SampleInputError(f"--out-dir {self.out} is a file: give a directory (it is created if missing)")
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".dalle_jax_write_test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise SampleInputError(f"--out-dir {self.out} cannot be written ({error.strerror or error}): choose a "
                                   "writable directory") from None
        stale = [p for p in self.out.iterdir() if _OUTPUT_NAME.match(p.name)]
        for path in stale:
            path.unlink()
        if stale:
            log.warning("removed %d files of an earlier sample run from %s", len(stale), self.out)
        self.tiles: list[np.ndarray] = []
        self.labels: list[str] = []
        self.columns = 1

    def add(self, p: int, prompt: str, kept: list[RankedSample]) -> None:
        from PIL import Image

        lines = []
        for r, item in enumerate(kept):
            name = f"{p:04d}_{r:02d}.png"
            Image.fromarray(item.image).save(self.out / name)
            lines.append({"prompt_index": p, "prompt": prompt, "rank": r, "file": name,
                          "clip_score": item.clip_score, "seed": self.seed, "sample_index": item.sample_index})
            self.tiles.append(item.image)
            self.labels.append(prompt if r == 0 else
                               (f"#{r}" if item.clip_score is None else f"#{r} {item.clip_score:.2f}"))
        with (self.out / "samples.jsonl").open("a") as f:
            f.write("".join(json.dumps(line) + "\n" for line in lines))
        self.columns = max(self.columns, len(kept))

    def finish(self) -> Path:
        """grid.png: one row per prompt, captions written on it."""
        from dalle_jax.images import save_grid

        scale = max(1, 96 // self.tiles[0].shape[0])
        return save_grid(self.out / "grid.png", self.tiles, self.labels, columns=self.columns, scale=scale)


def write_outputs(out_dir: str | Path, prompts: list[str], results: list[list[RankedSample]], seed: int) -> Path:
    """PNG per kept image, samples.jsonl and grid.png (one row per prompt) in the documented layout."""
    writer = SampleWriter(out_dir, seed)
    for p, (prompt, kept) in enumerate(zip(prompts, results, strict=True)):
        writer.add(p, prompt, kept)
    return writer.finish()
