"""Hard-negative captions for the reranker (clip_train.hard_negatives): the swap, the loss, the config check."""

import jax.numpy as jnp
import numpy as np
import pytest

from dalle_jax.config import ClipTrainConfig, Config, DataConfig
from dalle_jax.data.scorer import parse_caption, swap_one_concept
from dalle_jax.data.shapes import (
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    ShapesSpec,
    all_pairs,
    caption_for,
    render_example,
)
from dalle_jax.errors import ConfigError
from dalle_jax.models.clip import contrastive_loss


def _concepts(caption: str) -> dict:
    parsed = parse_caption(caption)
    flat = {"template": parsed["template"], "relation": parsed["relation"]}
    for i, obj in enumerate(parsed["objects"]):
        flat |= {f"{i}.{k}": v for k, v in obj.items()}
    return flat


def _alternatives(caption: str) -> list[str]:
    """Every caption of the same template that differs from `caption` in one concept (brute force)."""
    parsed = parse_caption(caption)
    values = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
    out = [caption_for(parsed["template"], parsed["objects"], r) for r in RELATIONS
           if parsed["relation"] is not None and r != parsed["relation"]]
    for i, obj in enumerate(parsed["objects"]):
        for key in values:
            for v in values[key]:
                if key in obj and v != obj[key]:
                    changed = [dict(o) for o in parsed["objects"]]
                    changed[i][key] = v
                    out.append(caption_for(parsed["template"], changed, parsed["relation"]))
    return out


def test_swap_changes_exactly_one_concept_and_never_names_a_heldout_pair():
    rng = np.random.default_rng()
    pairs = all_pairs()
    holdout = {pairs[i] for i in rng.choice(len(pairs), 4, replace=False)}
    spec = ShapesSpec(image_size=32, holdout=tuple(sorted(holdout)), seed=int(rng.integers(1000)),
                      one_concept_captions=0.3)
    names_heldout = lambda c: any((o["color"], o["shape"]) in holdout for o in parse_caption(c)["objects"])  # noqa: E731
    changed, unparsable = set(), 0
    for index in range(300):
        split = "train" if index % 2 else "validation"  # validation captions may name held-out pairs
        caption = render_example(spec, split, index)["caption"]
        swapped = swap_one_concept(caption, rng, holdout)
        try:
            allowed = [c for c in _alternatives(caption) if not names_heldout(c)]
        except ValueError:  # a one-concept caption ("a triangle", "a red object") fits no template
            assert swapped is None
            unparsable += 1
            continue
        if not allowed:  # e.g. a relation of two held-out pairs: every single swap keeps one
            assert swapped is None, (caption, swapped)
            continue
        assert swapped in allowed, (caption, swapped)
        before, after = parse_caption(caption), parse_caption(swapped)
        changed |= {key for a, b in zip(before["objects"], after["objects"], strict=True) for key in a
                    if a[key] != b[key]} | ({"relation"} if before["relation"] != after["relation"] else set())
    assert unparsable > 0  # the train half had one-concept captions
    assert changed == {"color", "shape", "size", "position", "relation"}, changed


def test_swap_of_a_caption_whose_every_swap_is_held_out_is_none():
    # "a red circle": every other colour with circle and every other shape with red held out -> nothing to swap to.
    holdout = {(c, "circle") for c in COLORS if c != "red"} | {("red", s) for s in SHAPES if s != "circle"}
    assert swap_one_concept(caption_for("color_shape", [{"color": "red", "shape": "circle"}]),
                            np.random.default_rng(), holdout) is None


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_hard_negative_loss_matches_numpy_reference():
    rng = np.random.default_rng()
    batch, dim = 6, 12
    image = _unit(rng.normal(size=(batch, dim)))
    text = _unit(image + rng.normal(size=(batch, dim)))
    negative = _unit(image + rng.normal(size=(batch, dim)))
    valid = rng.random(batch) < 0.6
    valid[0], valid[1] = True, False
    scale = float(rng.uniform(2.0, 5.0))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    loss, metrics = contrastive_loss(f32(image), f32(text), f32(scale), f32(negative), jnp.asarray(valid))

    logits = scale * image @ text.T
    rows = np.concatenate([logits, scale * (image @ negative.T)[:, valid]], axis=1)  # each image: B + valid texts

    def ce(r):
        log_z = np.log(np.exp(r - r.max(1, keepdims=True)).sum(1)) + r.max(1)
        return np.mean(log_z - r[np.arange(len(r)), np.arange(len(r))])

    np.testing.assert_allclose(metrics["image_to_text_loss"], ce(rows), rtol=1e-5)
    np.testing.assert_allclose(metrics["text_to_image_loss"], ce(logits.T), rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * (ce(rows) + ce(logits.T)), rtol=1e-5)
    own = np.diag(logits) > np.sum(image * negative, 1) * scale
    np.testing.assert_allclose(metrics["hard_negative_acc"], own[valid].mean(), rtol=1e-6)

    # No valid negative: exactly the plain loss.
    plain, _ = contrastive_loss(f32(image), f32(text), f32(scale))
    none, _ = contrastive_loss(f32(image), f32(text), f32(scale), f32(negative), jnp.zeros(batch, bool))
    np.testing.assert_allclose(none, plain, rtol=1e-6)


def test_hard_negatives_need_shapes_captions():
    with pytest.raises(ConfigError, match="clip_train.hard_negatives"):
        Config(data=DataConfig(dataset="folder"), clip_train=ClipTrainConfig(hard_negatives=True))
