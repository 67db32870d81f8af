"""The scorer reads back exactly what the renderer drew, rejects wrong captions and degrades on noise."""

import numpy as np
import pytest

from dalle_jax.data.scorer import detect_objects, one_concept_captions, parse_caption, score
from dalle_jax.data.shapes import (
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    ShapesSpec,
    caption_for,
    render_example,
    render_objects,
)


def _fresh_seed() -> int:
    return int(np.random.default_rng().integers(1 << 30))


def test_parse_caption_reads_every_template():
    assert parse_caption("an orange cross") == {
        "template": "color_shape",
        "objects": [{"color": "orange", "shape": "cross"}],
        "relation": None,
    }
    parsed = parse_caption("a large blue circle in the bottom left")
    assert parsed["template"] == "size_position"
    assert parsed["objects"] == [{"color": "blue", "shape": "circle", "size": "large", "position": "bottom left"}]
    parsed = parse_caption("a red square to the right of an orange triangle")
    assert parsed["relation"] == "to the right of"
    assert parsed["objects"] == [{"color": "red", "shape": "square"}, {"color": "orange", "shape": "triangle"}]
    for bad in ("a pink circle", "a red circle in the middle", "two red circles", "a red circle above"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_parse_caption_round_trips_rendered_captions():
    spec = ShapesSpec(seed=_fresh_seed())
    for index in range(200):
        example = render_example(spec, "test", index)
        parsed = parse_caption(example["caption"])
        assert parsed["template"] == example["template"] and parsed["relation"] == example["relation"]
        assert len(parsed["objects"]) == len(example["objects"])
        for stated, drawn in zip(parsed["objects"], example["objects"], strict=True):
            assert all(drawn[key] == value for key, value in stated.items())


def test_one_concept_captions_are_the_forms_training_drops_a_concept_to():
    """Every one-concept caption the training data writes (data.one_concept_captions=1) is one of the two that
    one_concept_captions derives from the same example's full caption; relations have none."""
    spec = ShapesSpec(seed=_fresh_seed(), one_concept_captions=1.0)
    seen = 0
    for index in range(300):
        example = render_example(spec, "train", index)
        full = caption_for(example["template"], example["objects"], example["relation"])
        concepts = one_concept_captions(full)
        if example["template"] == "relation":
            assert concepts == [] and example["caption"] == full
            continue
        shape_only, color_only = concepts
        assert example["caption"] in concepts and example["caption"] != full
        assert example["objects"][0]["color"] not in shape_only and example["objects"][0]["shape"] not in color_only
        seen += 1
    assert seen > 150
    assert one_concept_captions("a pink elephant") == []


@pytest.mark.parametrize("image_size", [64, 32])
def test_detect_objects_recovers_every_colour_shape_and_size(image_size):
    """Scenes drawn directly (not through render_example): every pair and size, at random places."""
    rng = np.random.default_rng(_fresh_seed())
    for color in COLORS:
        for shape in SHAPES:
            for size, side in (("small", image_size // 4), ("large", round(28 * image_size / 64))):
                x0, y0 = rng.integers(0, image_size - side + 1, size=2)
                box = [int(x0), int(y0), int(x0) + side, int(y0) + side]
                image = render_objects([{"color": color, "shape": shape, "box": box}], image_size)
                (found,) = detect_objects(image)
                assert (found["color"], found["shape"], found["size"]) == (color, shape, size)
                assert found["box"] == box
                assert found["center"] == [(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]


@pytest.mark.parametrize("image_size,count", [(64, 1000), (32, 300)])
def test_scores_every_rendered_example_fully(image_size, count):
    spec = ShapesSpec(image_size=image_size, seed=_fresh_seed())
    splits = ("train", "validation", "test")
    for index in range(count):
        example = render_example(spec, splits[index % 3], index)
        result = score(example["image"], example["caption"])
        assert result["all"], (spec.seed, index, example["caption"], result, example["objects"])
        stated = {"size"} if "size" in example["template"] else set()
        stated |= {"position"} if "position" in example["template"] else set()
        stated |= {"relation"} if example["template"] == "relation" else set()
        assert set(result) == {"count", "color", "shape", "color_shape", "all", *stated}


def _other(options, *avoid):
    return next(option for option in options if option not in avoid)


def test_wrong_captions_flip_exactly_the_wrong_attribute():
    spec = ShapesSpec(seed=_fresh_seed())
    flipped = {"color": 0, "shape": 0, "size": 0, "position": 0, "relation": 0}
    for index in range(150):
        example = render_example(spec, "validation", index)
        objects = [dict(obj) for obj in example["objects"]]
        used_colors = [obj["color"] for obj in objects]
        used_shapes = [obj["shape"] for obj in objects]
        which = index % len(objects)  # alternate which object of a relation caption is wrong
        wrong = {
            "color": {which: {"color": _other(COLORS, *used_colors)}},
            "shape": {which: {"shape": _other(SHAPES, *used_shapes)}},
        }
        if "size" in example["template"]:
            wrong["size"] = {0: {"size": _other(SIZES, objects[0]["size"])}}
        if "position" in example["template"]:
            position = _other(POSITIONS[index % 5 :] + POSITIONS, objects[0]["position"])
            wrong["position"] = {0: {"position": position}}
        if example["relation"] is not None:
            wrong["relation"] = {"relation": _other(RELATIONS[index % 4 :] + RELATIONS, example["relation"])}
        for attribute, change in wrong.items():
            relation = change.get("relation", example["relation"])
            changed = [{**obj, **change.get(i, {})} for i, obj in enumerate(objects)]
            caption = caption_for(example["template"], changed, relation)
            result = score(example["image"], caption)
            expected_false = {attribute, "all"} | ({"color_shape"} if attribute in ("color", "shape") else set())
            assert {key for key, ok in result.items() if not ok} == expected_false, (caption, result)
            flipped[attribute] += 1
    assert min(flipped.values()) >= 20


def test_an_extra_object_fails_only_the_count():
    rng = np.random.default_rng(_fresh_seed())
    spec = ShapesSpec(seed=int(rng.integers(1000)), template_weights=(0, 0, 1, 0, 0))
    for index in range(20):
        example = render_example(spec, "train", index)
        obj = example["objects"][0]
        # A 12 px square of another colour in the image corner on the far side of the object.
        x0 = 2 if obj["center"][0] > 32 else 50
        y0 = 2 if obj["center"][1] > 32 else 50
        color = "black" if obj["color"] != "black" else "red"
        extra = {"color": color, "shape": "square", "box": [x0, y0, x0 + 12, y0 + 12]}
        image = render_objects([obj, extra], 64)
        result = score(image, example["caption"])
        assert {key for key, ok in result.items() if not ok} == {"count", "all"}, (example["caption"], result)


def test_mild_noise_keeps_accuracy_and_pure_noise_scores_nothing():
    rng = np.random.default_rng(_fresh_seed())
    spec = ShapesSpec(seed=int(rng.integers(1000)))
    correct = 0
    trials = 300
    for index in range(trials):
        example = render_example(spec, "test", index)
        noisy = np.clip(example["image"] + rng.normal(0.0, 8.0, example["image"].shape), 0, 255)
        correct += score(noisy.astype(np.uint8), example["caption"])["all"]
    assert correct / trials >= 0.95

    hits = 0
    for index in range(100):
        example = render_example(spec, "test", index)
        uniform = rng.integers(0, 256, example["image"].shape, dtype=np.uint8)
        grey = np.clip(rng.normal(128.0, 60.0, example["image"].shape), 0, 255).astype(np.uint8)
        hits += score(uniform, example["caption"])["all"] + score(grey, example["caption"])["all"]
    assert hits <= 2


def test_a_blank_or_off_shape_image_fails():
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert not any(score(blank, "a red circle").values())
    bar = render_objects([{"color": "red", "shape": "square", "box": [10, 10, 38, 38]}], 64)
    bar[16:38] = 255  # a wide, flat red bar is no square
    (found,) = detect_objects(bar)
    assert found["shape"] == "unknown" and found["color"] == "red"
    result = score(bar, "a red square")
    assert result == {"count": True, "color": True, "shape": False, "color_shape": False, "all": False}


def _box_blur(image: np.ndarray) -> np.ndarray:
    padded = np.pad(image.astype(np.float32), ((1, 1), (1, 1), (0, 0)), mode="edge")
    height, width, _ = image.shape
    total = sum(padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3))
    return np.round(total / 9).astype(np.uint8)


def test_blurred_renders_still_score():
    """Generated images are softer than renders: a 3x3 box blur at 64 px must not break the scorer."""
    spec = ShapesSpec(seed=_fresh_seed())
    trials = 200
    correct = sum(
        score(_box_blur(example["image"]), example["caption"])["all"]
        for example in (render_example(spec, "validation", index) for index in range(trials))
    )
    assert correct / trials >= 0.95


def test_match_returns_the_detections_in_caption_order_with_their_shape_distance():
    from dalle_jax.data.scorer import match

    rng = np.random.default_rng()
    top, bottom = rng.choice(list(COLORS), 2, replace=False)
    objects = [{"color": str(top), "shape": "circle", "box": [10, 2, 22, 14]},
               {"color": str(bottom), "shape": "square", "box": [10, 18, 22, 30]}]
    image = render_objects(objects, 32)
    caption = f"a {bottom} square below a {top} circle"
    verdict, matched = match(image, caption)
    assert verdict == score(image, caption) and verdict["all"]
    assert [(d["color"], d["shape"]) for d in matched] == [(str(bottom), "square"), (str(top), "circle")]
    assert all(d["shape_distance"] < 0.01 for d in matched)  # exact renders
    # A dented square (a quarter bitten out) still reads as a square at most, but farther from the exact render.
    dented = image.copy()
    dented[18:22, 18:22] = 255
    _, bitten = match(dented, caption)
    assert bitten and bitten[0]["shape_distance"] > matched[0]["shape_distance"] + 0.02
    assert match(render_objects(objects[:1], 32), caption) == (dict.fromkeys(verdict, False), [])
