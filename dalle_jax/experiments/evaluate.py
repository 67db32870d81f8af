"""A cell's evaluation: caption match of sampled images by the exact shapes scorer per prompt category (single
objects, held-out pairs, size+position, relations: a "GenEval for shapes"), best of n by CLIP for every n, and
CLIP Fréchet distances of samples and of dVAE reconstructions to validation images, at several blur radii."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dalle_jax.config import Config


def evaluate_cell(cell: Path, config: Config, dataset: str, seed: int, options: dict, progress: bool = True
                  ) -> dict[str, float]:
    from dalle_jax.data.scorer import one_concept_captions
    from dalle_jax.demo.evaluate import SCORE_KEY, accuracy_table, prompt_sets, save_sample_grid
    from dalle_jax.sampling.rerank import load_run, reconstruct_images, sample_and_rerank
    from dalle_jax.sampling.sampler import SampleConfig

    run = load_run(cell)
    metrics: dict[str, float] = {}
    num = options["num_samples"]
    sample_config = SampleConfig(**options.get("sample", {}))  # the variant's sampling settings (default: paper's)
    per_set = []
    for name, prompts in prompt_sets(config, options["prompts_per_set"], seed).items():
        # Concept guidance: each single-object prompt guided by its shape-only and colour-only captions.
        concepts = [one_concept_captions(p) for p in prompts] if sample_config.concept_scale else None
        kept = sample_and_rerank(run, prompts, num_samples=num, top=num, seed=seed, sample_config=sample_config,
                                 batch_size=64, progress=progress, concepts=concepts)
        table = accuracy_table(prompts, kept, SCORE_KEY)
        per_set.append(table)
        metrics.update({f"caption/{name}/best_of_{n}": v for n, v in table["best_of_n"].items()})
        metrics[f"caption/{name}/any_of_n"] = table["any_of_n"]
        if table["right_shape_distance_median"] is not None:  # how cleanly the hits are drawn (no hit: no value)
            metrics[f"caption/{name}/right_shape_distance"] = table["right_shape_distance_median"]
        # Per concept, per sample: is composition the product of its parts (Okawa et al. 2023)?
        metrics.update({f"caption/{name}/{key}_per_sample": rate
                        for key, rate in attribute_rates(prompts, kept, ("color", "shape")).items()})
        if name == "in_distribution":
            save_sample_grid(cell / "samples.png", prompts, kept, columns=min(8, num))
        if name == "heldout":
            save_sample_grid(cell / "samples_heldout.png", prompts, kept, columns=min(8, num))
    for n in per_set[0]["best_of_n"]:
        metrics[f"caption/mean/best_of_{n}"] = float(np.mean([t["best_of_n"][n] for t in per_set]))
    metrics.update(round_trip_accuracy(lambda images: reconstruct_images(run, images), config))
    if options["frechet_images"]:  # 0: caption match only (rerank_n)
        metrics.update(frechet_metrics(run, dataset, seed, options["frechet_images"], options["blur_radii"],
                                       progress))
    return metrics


def attribute_rates(prompts: list[str], kept: list[list], keys: tuple[str, ...]) -> dict[str, float]:
    """The fraction of all candidates (every prompt's, unranked) that the scorer finds right on each key."""
    from dalle_jax.data.scorer import score

    right = {key: [] for key in keys}
    for prompt, candidates in zip(prompts, kept, strict=True):
        for candidate in candidates:
            verdict = score(candidate.image, prompt)
            for key in keys:
                right[key].append(bool(verdict[key]))
    return {key: float(np.mean(values)) for key, values in right.items()}


def round_trip_accuracy(codec, config: Config, batch: int = 256) -> dict[str, float]:
    """How often `codec` (uint8 images -> uint8 images: the dVAE's encode then decode) keeps a single object's
    colour and shape (`shapes.lattice_objects`), per size, for trained and for held-out pairs: the ceiling the dVAE
    sets on what a prior can be seen to draw ("round_trip/small_heldout", ...)."""
    from dalle_jax.data.scorer import score
    from dalle_jax.data.shapes import lattice_objects, parse_holdout, render_objects, with_article

    holdout = set(parse_holdout(config.data.holdout))
    objects = lattice_objects(config.data.image_size, config.data.grid)
    right: dict[str, list[bool]] = {}
    for start in range(0, len(objects), batch):
        chunk = objects[start:start + batch]
        images = np.stack([render_objects([o], config.data.image_size) for o in chunk])
        for obj, image in zip(chunk, codec(images), strict=True):
            pair = (obj["color"], obj["shape"])
            group = f"round_trip/{obj['size']}_{'heldout' if pair in holdout else 'trained'}"
            right.setdefault(group, []).append(bool(score(image, with_article(" ".join(pair)))["color_shape"]))
    return {group: float(np.mean(values)) for group, values in sorted(right.items())}


def frechet_metrics(run, dataset: str, seed: int, count: int, radii: tuple, progress: bool) -> dict[str, float]:
    """CLIP Fréchet distance to `count` validation images: of one sample per validation caption, and (the ceiling
    a prior could reach through this dVAE) of the dVAE's reconstructions of those images."""
    import jax.numpy as jnp

    from dalle_jax.data.pipeline import caption_text, open_split
    from dalle_jax.experiments.metrics import blur, frechet_distance
    from dalle_jax.sampling.rerank import reconstruct_images, sample_and_rerank

    split = open_split(dataset, "validation")
    count = min(count, len(split))
    examples = [split[i] for i in range(count)]
    real = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
    captions = [caption_text(e["caption"]) for e in examples]
    generated = np.stack([k[0].image for k in sample_and_rerank(run, captions, num_samples=1, top=1, seed=seed + 1,
                                                                 batch_size=64, progress=progress)])
    reconstructed = reconstruct_images(run, real)

    def embed(images: np.ndarray) -> np.ndarray:
        return np.concatenate([np.asarray(run.clip.encode_image(jnp.asarray(images[i:i + 64])))
                               for i in range(0, len(images), 64)])

    metrics = {}
    for radius in radii:
        reference = embed(blur(real, radius))
        metrics[f"frechet/generated_blur{radius}"] = frechet_distance(embed(blur(generated, radius)), reference)
        metrics[f"frechet/reconstructed_blur{radius}"] = frechet_distance(embed(blur(reconstructed, radius)),
                                                                          reference)
        # the prior's share: how far its samples are beyond what the dVAE's own reconstructions reach
        metrics[f"frechet/gap_blur{radius}"] = (metrics[f"frechet/generated_blur{radius}"]
                                                - metrics[f"frechet/reconstructed_blur{radius}"])
    return metrics
