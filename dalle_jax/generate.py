"""`dalle-jax sample`: captions (optionally plus the top rows of an image) -> reranked PNGs.

For each prompt: draw N candidate token grids from the prior (`dalle_jax.sample`), decode them with the dVAE,
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

import argparse
import dataclasses
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dalle_jax import config as config_lib
from dalle_jax import sharding
from dalle_jax.config import Config
from dalle_jax.data.tokenizer import CaptionTruncatedWarning, TextTokenizer
from dalle_jax.models.dvae import DVAE
from dalle_jax.models.transformer import Prior
from dalle_jax.sample import SampleConfig, sample_tokens

log = logging.getLogger("dalle_jax.sample")


class SampleInputError(ValueError):
    """A prompt, image or checkpoint that cannot be used; the message names it and the fix."""


@dataclasses.dataclass
class Generator:
    """Everything sampling needs, loaded and checked against each other."""

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

def _stage_dir(run: str | Path | None, explicit: str | Path | None, name: str) -> Path | None:
    if explicit:
        return Path(explicit)
    if run:
        return Path(run) / name
    return None


def load_prior(prior_dir: str | Path) -> tuple[Prior, TextTokenizer, Config]:
    """The prior's EMA weights, its tokenizer and the run's config from RUN/prior."""
    from dalle_jax.train import loop
    from dalle_jax.train.prior import make_optimizer

    prior_dir = Path(prior_dir)
    for needed in ("config.json", "tokenizer.json"):
        if not (prior_dir / needed).is_file():
            raise SampleInputError(f"{prior_dir / needed} not found: is {prior_dir} a prior trained by "
                                   "`dalle-jax train-prior` (RUN/prior)?")
    config = config_lib.load_config(prior_dir / "config.json")
    model = loop.load_trained(prior_dir / "checkpoints", lambda: Prior(config.prior, rngs=nnx.Rngs(0)),
                              make_optimizer(config.prior_train))
    return model, TextTokenizer.load(prior_dir / "tokenizer.json"), config


def load_generator(run: str | Path | None = None, *, dvae: str | Path | None = None,
                   prior: str | Path | None = None, clip: str | Path | None = None,
                   rerank: bool = True) -> Generator:
    """Loads RUN/{dvae,prior,clip} (or explicit directories) and checks they fit together before compiling."""
    from dalle_jax.convert.openai_dvae import load_dvae

    dvae_dir, prior_dir = _stage_dir(run, dvae, "dvae"), _stage_dir(run, prior, "prior")
    if dvae_dir is None or prior_dir is None:
        raise SampleInputError("pass --run RUN (holding dvae/, prior/ and clip/) or both --dvae and --prior")
    for name, directory in (("dVAE", dvae_dir), ("prior", prior_dir)):
        if not directory.is_dir():
            raise SampleInputError(f"{name} directory {directory} does not exist")
    prior_model, tokenizer, config = load_prior(prior_dir)
    dvae_model = load_dvae(dvae_dir)
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
        from dalle_jax.train.clip import load_clip

        if clip_dir is None or not clip_dir.is_dir():
            raise SampleInputError(f"CLIP directory {clip_dir} does not exist: train it with `dalle-jax "
                                   "train-clip`, pass --clip DIR, or --no-rerank to keep samples in draw order")
        clip_model, clip_tokenizer, _ = load_clip(clip_dir)
        if clip_model.config.image_size != image_size:
            raise SampleInputError(f"the CLIP model in {clip_dir} scores {clip_model.config.image_size}px images "
                                   f"but the dVAE decodes {image_size}px")
    return Generator(dvae_model, prior_model, tokenizer, clip_model, clip_tokenizer, image_size)


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


def prefix_from_image(generator: Generator, path: str | Path, rows: int) -> np.ndarray:
    """An image file of any size or mode -> the dVAE tokens of its top `rows` rows, (rows, grid)."""
    from PIL import Image, UnidentifiedImageError

    from dalle_jax.data.folder import preprocess_image

    if not 0 < rows < generator.grid:
        raise SampleInputError(f"--prefix-rows {rows} must be between 1 and {generator.grid - 1} (the grid has "
                               f"{generator.grid} rows; at least one must be generated)")
    try:
        with Image.open(path) as img:
            img.load()
            pixels, _ = preprocess_image(img, generator.image_size)  # as the dataset builders do
    except FileNotFoundError:
        raise SampleInputError(f"--image-prefix {path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise SampleInputError(f"--image-prefix {path}: not a readable image ({error})") from None
    tokens = generator.dvae.encode(jnp.asarray(pixels[None], jnp.float32) / 255.0)
    return np.asarray(tokens)[0, :rows]  # (rows, grid)


# ------------------------------------------------------------------------------------------------ sampling

@nnx.jit
def _decode(dvae: DVAE, tokens: jax.Array) -> jax.Array:
    return jnp.clip(jnp.round(dvae.decode(tokens) * 255.0), 0, 255).astype(jnp.uint8)


@nnx.jit
def _clip_scores(clip: Any, images: jax.Array, text_ids: jax.Array) -> jax.Array:
    from dalle_jax.models.clip import score

    return score(clip, images, text_ids)


def decode_images(generator: Generator, tokens: np.ndarray) -> np.ndarray:
    """(B, N) image tokens -> (B, H, W, 3) uint8."""
    grid = tokens.reshape(len(tokens), generator.grid, generator.grid)
    return np.asarray(_decode(generator.dvae, jnp.asarray(grid)))


def clip_scores(generator: Generator, images: np.ndarray, prompt: str) -> np.ndarray:
    """CLIP cosine similarity of each image with the prompt, (B,)."""
    ids = generator.clip_tokenizer.encode([prompt] * len(images))
    return np.asarray(_clip_scores(generator.clip, jnp.asarray(images), jnp.asarray(ids)))


@dataclasses.dataclass
class Kept:
    image: np.ndarray  # (H, W, 3) uint8
    clip_score: float | None
    sample_index: int  # candidate index within its prompt


def generate(generator: Generator, prompts: list[str], *, num_samples: int, top: int, seed: int,
             sample_config: SampleConfig | None = None, batch_size: int = 64,
             prefix: np.ndarray | None = None, mesh=None, rules=None, progress: bool = True) -> list[list[Kept]]:
    """For each prompt, `num_samples` candidates reranked by CLIP; the best `top` in score order."""
    from tqdm.auto import tqdm

    if num_samples < 1 or not 1 <= top <= num_samples:
        raise SampleInputError(f"--top {top} must be between 1 and --num-samples {num_samples}")
    if batch_size < 1:
        raise SampleInputError(f"--batch-size {batch_size} must be positive")
    text = encode_prompts(generator.tokenizer, prompts)
    pads = generator.tokenizer.pad_ids()
    cfg = dataclasses.replace(sample_config or SampleConfig(), prefix_rows=0 if prefix is None else len(prefix))
    params = nnx.state(generator.prior, nnx.Param)  # split once, not per batch
    if mesh is not None:
        rules = rules if rules is not None else config_lib.DEFAULT_RULES  # the sampler's default too
        params = sharding.shard_state(params, mesh, rules)
    prior = (nnx.graphdef(generator.prior), params)
    results = []
    for p, prompt in enumerate(tqdm(prompts, desc="prompts", disable=not progress)):
        tokens = []
        for start in range(0, num_samples, batch_size):
            count = min(batch_size, num_samples - start)
            batch_prefix = None if prefix is None else np.broadcast_to(prefix, (count, *prefix.shape))
            tokens.append(sample_tokens(prior, np.repeat(text[p : p + 1], count, axis=0), seed, cfg, pad_ids=pads,
                                        prefix=batch_prefix, mesh=mesh, rules=rules,
                                        sample_offset=p * num_samples + start))
        images = decode_images(generator, np.concatenate(tokens))
        if generator.clip is not None:
            scores = clip_scores(generator, images, prompt)
            order = np.argsort(-scores, kind="stable")[:top]
            results.append([Kept(images[i], float(scores[i]), int(i)) for i in order])
        else:
            results.append([Kept(images[i], None, i) for i in range(top)])
    return results


def write_outputs(out_dir: str | Path, prompts: list[str], results: list[list[Kept]], seed: int) -> Path:
    """PNG per kept image, samples.jsonl and grid.png (one row per prompt) in the documented layout."""
    from PIL import Image

    from dalle_jax.images import save_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines, tiles, labels = [], [], []
    for p, (prompt, kept) in enumerate(zip(prompts, results, strict=True)):
        for r, item in enumerate(kept):
            name = f"{p:04d}_{r:02d}.png"
            Image.fromarray(item.image).save(out / name)
            lines.append({"prompt_index": p, "prompt": prompt, "rank": r, "file": name,
                          "clip_score": item.clip_score, "seed": seed, "sample_index": item.sample_index})
            tiles.append(item.image)
            labels.append(prompt if r == 0 else (f"#{r}" if item.clip_score is None else f"#{r} {item.clip_score:.2f}"))
    (out / "samples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    columns = max(len(kept) for kept in results)
    scale = max(1, 96 // results[0][0].image.shape[0])
    return save_grid(out / "grid.png", tiles, labels, columns=columns, scale=scale)


# ------------------------------------------------------------------------------------------------ CLI

def register_cli(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sample", help="generate images for captions, reranked by CLIP",
        description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  dalle-jax sample --run runs/demo --prompt 'a purple cross above an orange circle'\n"
               "  dalle-jax sample --run runs/demo --prompts-file prompts.txt --num-samples 32 --top 4\n"
               "  dalle-jax sample --run runs/demo --prompt 'a red square' --image-prefix cat.png --prefix-rows 3\n"
               "  dalle-jax sample --run runs/demo --prompt 'a blue circle' --cfg-scale 3 --top-k 64")
    where = parser.add_argument_group("checkpoints")
    where.add_argument("--run", help="run directory holding dvae/, prior/ and clip/ (as `dalle-jax demo` writes)")
    where.add_argument("--dvae", help="dVAE directory (default RUN/dvae)")
    where.add_argument("--prior", help="prior directory (default RUN/prior)")
    where.add_argument("--clip", help="CLIP reranker directory (default RUN/clip)")
    where.add_argument("--no-rerank", action="store_true", help="skip CLIP: keep the first K samples drawn")
    what = parser.add_argument_group("prompts")
    what.add_argument("--prompt", action="append", default=[], help="a caption (repeatable)")
    what.add_argument("--prompts-file", help="a text file with one caption per line")
    what.add_argument("--image-prefix", help="image whose top --prefix-rows token rows are kept and completed")
    what.add_argument("--prefix-rows", type=int, default=0, help="token rows of --image-prefix to keep")
    how = parser.add_argument_group("sampling")
    how.add_argument("--num-samples", type=int, default=16, help="candidates drawn per prompt, N (default 16)")
    how.add_argument("--top", type=int, default=4, help="kept per prompt after reranking, K (default 4)")
    how.add_argument("--seed", type=int, default=0)
    how.add_argument("--temperature", type=float, default=1.0, help="(default 1.0, the paper's)")
    how.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off, the paper)")
    how.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1.0 = off, the paper)")
    how.add_argument("--cfg-scale", type=float, default=1.0,
                     help="classifier-free guidance s (1 = plain conditional, the paper; needs caption dropout "
                          "in training)")
    how.add_argument("--batch-size", type=int, default=64, help="candidates per sampler call (default 64)")
    how.add_argument("--mesh", help="D,F,T: sample on a (data, fsdp, tensor) mesh of this host's devices, one -1 "
                                    "fills (e.g. -1,1,1 = data-parallel over all); default one device")
    parser.add_argument("--out-dir", required=True, help="directory for the PNGs, samples.jsonl and grid.png")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cli)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SampleInputError(f"--prompts-file {path}: no such file")
        prompts += [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SampleInputError("give at least one --prompt TEXT or --prompts-file FILE")
    return prompts


def sampling_mesh(text: str | None) -> jax.sharding.Mesh | None:
    """`--mesh D,F,T` -> a (data, fsdp, tensor) mesh over this host's devices; None -> None (one device)."""
    if text is None:
        return None
    try:  # parsed and validated as `--set mesh.ici_parallelism=D,F,T` would be
        mesh_config = config_lib.apply_overrides(config_lib.MeshConfig(), [f"ici_parallelism={text}"])
    except config_lib.ConfigError as error:
        raise SampleInputError(f"--mesh {text!r}: give three integers D,F,T (data, fsdp, tensor), e.g. 2,2,2 or "
                               f"-1,1,1 ({error})") from None
    try:
        return sharding.make_mesh(mesh_config)
    except sharding.ShardingError:
        n = jax.device_count()
        raise SampleInputError(f"--mesh {text} does not fit this host's {n} devices: D*F*T must be {n}, or put -1 "
                               "in one entry to fill, e.g. --mesh -1,1,1") from None


def _cli(args: argparse.Namespace) -> int:
    try:
        prompts = read_prompts(args)
        if args.prefix_rows and not args.image_prefix:
            raise SampleInputError("--prefix-rows needs --image-prefix IMAGE")
        mesh = sampling_mesh(args.mesh)  # before loading anything
        generator = load_generator(args.run, dvae=args.dvae, prior=args.prior, clip=args.clip,
                                   rerank=not args.no_rerank)
        prefix = prefix_from_image(generator, args.image_prefix, args.prefix_rows) if args.image_prefix else None
        cfg = SampleConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           cfg_scale=args.cfg_scale)
        results = generate(generator, prompts, num_samples=args.num_samples, top=args.top, seed=args.seed,
                           sample_config=cfg, batch_size=args.batch_size, prefix=prefix, mesh=mesh,
                           progress=not args.quiet)
    except (SampleInputError, FileNotFoundError, sharding.ShardingError) as error:  # the last: a param vs the mesh
        print(f"error: {error}", file=__import__("sys").stderr)
        return 2
    grid = write_outputs(args.out_dir, prompts, results, args.seed)
    print(f"sample: {len(prompts)} prompt(s) x top {args.top} of {args.num_samples} -> {args.out_dir} ({grid.name})")
    return 0
