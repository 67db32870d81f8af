"""The captioned-shapes dataset follows its spec: palette, geometry, captions, holdout, determinism, TFDS, CLI."""

import argparse
import json
import os
import re

import numpy as np
import pytest
import tensorflow_datasets as tfds

from dalle_jax.commands.data import register_shapes
from dalle_jax.data.scorer import detect_objects
from dalle_jax.data.shapes import (
    COLORS,
    DEFAULT_HOLDOUT,
    POSITIONS,
    RELATIONS,
    SHAPES,
    ShapesSpec,
    build_shapes,
    caption_for,
    parse_holdout,
    render_example,
    render_objects,
)

WHITE = (255, 255, 255)
EXPECTED_SIDES = {64: {"small": 16, "large": 28}, 32: {"small": 8, "large": 14}}


# ----------------------------------------------------------------------------- independent spec helpers


def _fully_inside(shape: str, box, px: int, py: int) -> bool:
    """Whether the whole unit pixel [px, px+1) x [py, py+1) lies inside the shape (geometry from the spec)."""
    x0, y0, x1, y1 = box
    side, cx, cy = x1 - x0, (x0 + x1) / 2, (y0 + y1) / 2
    corners = [(px, py), (px + 1, py), (px, py + 1), (px + 1, py + 1)]
    if shape == "square":
        return x0 <= px and px + 1 <= x1 and y0 <= py and py + 1 <= y1
    if shape == "circle":  # convex: all corners inside the inscribed disc
        return all((x - cx) ** 2 + (y - cy) ** 2 <= (side / 2) ** 2 for x, y in corners)
    if shape == "triangle":  # apex (cx, y0), base from (x0, y1) to (x1, y1); convex
        return all(y <= y1 and abs(x - cx) <= (y - y0) / 2 for x, y in corners)
    if shape == "cross":  # a pixel inside the plus lies wholly inside one of its two bars
        arm = side / 6
        in_vertical = cx - arm <= px and px + 1 <= cx + arm and y0 <= py and py + 1 <= y1
        in_horizontal = cy - arm <= py and py + 1 <= cy + arm and x0 <= px and px + 1 <= x1
        return in_vertical or in_horizontal
    raise AssertionError(shape)


def _expected_position(cx: float, cy: float, size: int) -> str:
    if abs(cx - size / 2) < size / 6 and abs(cy - size / 2) < size / 6:
        return "center"
    return ("top" if cy < size / 2 else "bottom") + " " + ("left" if cx < size / 2 else "right")


_WORDS = {
    "c": "|".join(COLORS),
    "s": "|".join(SHAPES),
    "z": "small|large",
    "p": "|".join(POSITIONS),
    "r": "|".join(RELATIONS),
}
_TEMPLATE_RES = [
    re.compile(pattern.format(**_WORDS))
    for pattern in (
        r"^(a|an) ({c}) ({s})$",
        r"^(a|an) ({z}) ({c}) ({s})$",
        r"^(a|an) ({c}) ({s}) in the ({p})$",
        r"^(a|an) ({z}) ({c}) ({s}) in the ({p})$",
        r"^(a|an) ({c}) ({s}) ({r}) (a|an) ({c}) ({s})$",
    )
]


def _check_articles(caption: str) -> None:
    words = caption.split()
    for article, following in zip(words, words[1:], strict=False):
        if article in ("a", "an"):
            assert article == ("an" if following[0] in "aeiou" else "a"), caption


# ------------------------------------------------------------------------------------------- rendering


def test_same_seed_same_examples_and_different_seed_differs():
    spec, other = ShapesSpec(image_size=32, seed=7), ShapesSpec(image_size=32, seed=8)
    differing = 0
    for split in ("train", "validation", "test"):
        for index in (0, 1, 17, 503):
            first, again = render_example(spec, split, index), render_example(spec, split, index)
            np.testing.assert_array_equal(first["image"], again["image"])
            assert first["caption"] == again["caption"] and first["objects"] == again["objects"]
            changed = render_example(other, split, index)
            differing += (changed["caption"] != first["caption"]) or not np.array_equal(
                changed["image"], first["image"]
            )
    assert differing >= 10  # of 12; a coincidental match of an example is possible but rare
    # Examples of one split do not all repeat in another.
    captions = {split: [render_example(spec, split, i)["caption"] for i in range(20)] for split in ("train", "test")}
    assert captions["train"] != captions["test"]


@pytest.mark.parametrize("image_size,count,grid", [(64, 300, 1), (32, 150, 1), (32, 150, 4)])
def test_rendered_examples_follow_the_spec(image_size, count, grid):
    spec = ShapesSpec(image_size=image_size, seed=int(np.random.default_rng().integers(1000)), grid=grid)
    sides = EXPECTED_SIDES[image_size]
    margin = max(1.0, image_size / 32)
    templates_seen = set()
    for index in range(count):
        example = render_example(spec, "validation", index)
        image, caption, objects = example["image"], example["caption"], example["objects"]
        assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8

        matches = [i for i, regex in enumerate(_TEMPLATE_RES) if regex.match(caption)]
        assert len(matches) == 1, caption
        templates_seen.add(matches[0])
        _check_articles(caption)
        groups = _TEMPLATE_RES[matches[0]].match(caption).groups()

        outside_all_boxes = np.ones((image_size, image_size), bool)
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size
            assert x0 % grid == 0 and y0 % grid == 0
            assert x1 - x0 == y1 - y0 == sides[obj["size"]]
            assert obj["center"] == [(x0 + x1) / 2, (y0 + y1) / 2]
            outside_all_boxes[y0:y1, x0:x1] = False
            interior = [
                (px, py)
                for py in range(y0, y1)
                for px in range(x0, x1)
                if _fully_inside(obj["shape"], obj["box"], px, py)
            ]
            assert len(interior) > 0.3 * (x1 - x0) ** 2
            for px, py in interior:
                assert tuple(image[py, px]) == COLORS[obj["color"]], (obj, px, py)
        assert (image[outside_all_boxes] == WHITE).all()

        first = objects[0]
        if matches[0] == 4:  # relation: a {c} {s} {rel} a {c} {s}
            _, color_a, shape_a, relation, _, color_b, shape_b = groups
            second = objects[1]
            assert (color_a, shape_a, color_b, shape_b) == (
                first["color"], first["shape"], second["color"], second["shape"]
            )
            assert (first["color"], first["shape"]) != (second["color"], second["shape"])
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = first["box"], second["box"]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, "boxes overlap"
            dx = second["center"][0] - first["center"][0]
            dy = second["center"][1] - first["center"][1]
            expected_offset = {"above": dy, "below": -dy, "to the left of": dx, "to the right of": -dx}[relation]
            other_axis = abs(dx) if relation in ("above", "below") else abs(dy)
            assert expected_offset >= other_axis + margin, (caption, objects)
        else:
            assert len(objects) == 1
            words = groups[1:]
            if matches[0] in (1, 3):
                assert words[0] == first["size"]
                words = words[1:]
            assert tuple(words[:2]) == (first["color"], first["shape"])
            position = _expected_position(*first["center"], image_size)
            assert first["position"] == position
            if matches[0] in (2, 3):
                assert words[2] == position
                # The centre keeps the margin from every border of the position partition.
                cx, cy = (c - image_size / 2 for c in first["center"])
                chebyshev = max(abs(cx), abs(cy))
                if position == "center":
                    assert chebyshev <= image_size / 6 - margin
                else:
                    assert chebyshev >= image_size / 6 + margin and min(abs(cx), abs(cy)) >= margin
    assert templates_seen == set(range(5))
    if grid == 1:  # unaligned corners really use sub-grid offsets (so the grid=4 case tests something)
        boxes = [o["box"] for i in range(40) for o in render_example(spec, "validation", i)["objects"]]
        assert any(x0 % 4 or y0 % 4 for x0, y0, _, _ in boxes)


def test_grid_names_a_new_dataset_and_keeps_the_old_names():
    assert "grid" not in json.loads(ShapesSpec().to_json())  # grid 1: the name datasets had before the field
    assert ShapesSpec(grid=4).config_name() != ShapesSpec().config_name()
    with pytest.raises(ValueError, match="grid=9"):
        ShapesSpec(image_size=32, grid=9)
    with pytest.raises(ValueError, match="grid=4 leaves no corner for a small object in the center"):
        ShapesSpec(image_size=16, grid=4)  # a 4 px object's centre can't sit in the middle third


def test_train_coverage_narrows_train_combinations_and_leaves_the_default_untouched():
    from dalle_jax.data.shapes import covered_combinations

    assert "train_coverage" not in json.loads(ShapesSpec().to_json())  # the default dataset keeps its name
    seed = int(np.random.default_rng().integers(1000))
    full, narrow = ShapesSpec(image_size=32, seed=seed), ShapesSpec(image_size=32, seed=seed, train_coverage=0.25)
    assert narrow.config_name() != full.config_name()
    combos = set(covered_combinations(narrow))
    assert len(combos) == round(0.25 * len(covered_combinations(full)))
    trained_pairs = {(c, s) for c, s, _, _ in covered_combinations(full)}
    assert {(c, s) for c, s, _, _ in combos} == trained_pairs  # every trained pair keeps a combination
    single = 0
    for index in range(120):
        example = render_example(narrow, "train", index)
        if example["template"] != "relation":
            single += 1
            o = example["objects"][0]
            assert (o["color"], o["shape"], o["size"], o["position"]) in combos
        assert render_example(narrow, "validation", index)["caption"] == render_example(full, "validation",
                                                                                        index)["caption"]
    assert single > 50
    with pytest.raises(ValueError, match="train_coverage"):
        ShapesSpec(train_coverage=0.0)


def test_one_concept_captions_name_the_shape_or_the_colour_and_change_nothing_else():
    assert "one_concept_captions" not in json.loads(ShapesSpec().to_json())  # the default dataset keeps its name
    seed = int(np.random.default_rng().integers(1000))
    full, half = ShapesSpec(image_size=32, seed=seed), ShapesSpec(image_size=32, seed=seed, one_concept_captions=0.5)
    assert half.config_name() != full.config_name()
    kinds = {"both": 0, "shape": 0, "color": 0}
    for index in range(300):
        a, b = render_example(full, "train", index), render_example(half, "train", index)
        assert np.array_equal(a["image"], b["image"]) and a["objects"] == b["objects"]  # only captions change
        if a["template"] == "relation":
            assert b["caption"] == a["caption"]
            continue
        named = {k: caption_for(a["template"], a["objects"], None, k) for k in kinds}
        assert named["both"] == a["caption"] and b["caption"] in named.values()
        kinds[next(k for k, v in named.items() if v == b["caption"])] += 1
        for split in ("validation", "test"):
            assert render_example(half, split, index)["caption"] == render_example(full, split, index)["caption"]
    single = sum(kinds.values())
    assert single > 150
    # half of the single-object captions name one concept, half of those the shape (binomial, ~4-5 sigma bounds)
    assert abs(kinds["both"] - single / 2) < 0.15 * single
    assert abs(kinds["shape"] - kinds["color"]) < 0.2 * single
    with pytest.raises(ValueError, match="one_concept_captions"):
        ShapesSpec(one_concept_captions=1.5)
    orange = {"color": "orange", "shape": "triangle", "size": "small", "position": "top left"}
    assert caption_for("size_position", [orange], concepts="shape") == "a small triangle in the top left"
    assert caption_for("size_position", [orange], concepts="color") == "a small orange object in the top left"
    assert caption_for("color_shape", [orange], concepts="shape") == "a triangle"
    assert caption_for("color_shape", [orange]) == "an orange triangle"


def test_template_weights_choose_the_template():
    only_relations = ShapesSpec(image_size=32, template_weights=(0, 0, 0, 0, 1))
    only_plain = ShapesSpec(image_size=32, template_weights=(1, 0, 0, 0, 0))
    for index in range(30):
        assert _TEMPLATE_RES[4].match(render_example(only_relations, "train", index)["caption"])
        assert _TEMPLATE_RES[0].match(render_example(only_plain, "train", index)["caption"])
    with pytest.raises(ValueError):
        ShapesSpec(template_weights=(1, 1))


def test_render_objects_draws_a_given_scene():
    objects = [
        {"color": "orange", "shape": "square", "box": [2, 3, 18, 19]},
        {"color": "cyan", "shape": "circle", "box": [30, 30, 58, 58]},
    ]
    image = render_objects(objects, 64)
    np.testing.assert_array_equal(image[3:19, 2:18], np.broadcast_to(COLORS["orange"], (16, 16, 3)))
    assert tuple(image[44, 44]) == COLORS["cyan"]
    assert tuple(image[30, 30]) == WHITE  # the circle's box corner lies outside the circle
    assert tuple(image[25, 25]) == WHITE
    with pytest.raises(ValueError):
        render_objects([{"color": "red", "shape": "square", "box": [60, 60, 70, 70]}], 64)


def test_parse_holdout():
    assert parse_holdout("red triangle, Blue circle") == (("red", "triangle"), ("blue", "circle"))
    assert parse_holdout("none") == () and parse_holdout("") == ()
    assert parse_holdout(",".join(f"{c} {s}" for c, s in DEFAULT_HOLDOUT)) == DEFAULT_HOLDOUT
    for bad in ("red triangle,pink circle", "red", "red hexagon", "large red circle"):
        with pytest.raises(ValueError) as error:
            parse_holdout(bad)
        message = str(error.value)
        assert bad.split(",")[-1].strip() in message
        assert all(color in message for color in COLORS) and all(shape in message for shape in SHAPES)


# ------------------------------------------------------------------------------------------------- TFDS


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    spec = ShapesSpec(image_size=32, num_train=300, num_validation=100, num_test=20, seed=5)
    data_dir = tmp_path_factory.mktemp("shapes")
    return spec, data_dir, build_shapes(str(data_dir), spec)


def _read_split(path: str, split: str):
    source = tfds.builder_from_directory(path).as_data_source(split)
    return [source[i] for i in range(len(source))]


def test_built_splits_hold_out_pairs_from_train_only(built):
    spec, _, path = built
    holdout = {tuple(pair) for pair in spec.holdout}
    held_out_phrases = [f"{color} {shape}" for color, shape in holdout]
    found_in_validation = 0
    for split, count in (("train", 300), ("validation", 100), ("test", 20)):
        examples = _read_split(path, split)
        assert sorted(int(ex["id"]) for ex in examples) == list(range(count))
        for ex in examples:
            caption = ex["caption"].decode()
            pairs = {(obj["color"], obj["shape"]) for obj in json.loads(ex["objects_json"])}
            if split == "train":
                assert not pairs & holdout, caption
                assert not any(phrase in caption for phrase in held_out_phrases), caption
                # ...nor in the pixels: what the scorer sees in the image is no held-out pair either.
                seen = {(obj["color"], obj["shape"]) for obj in detect_objects(ex["image"])}
                assert seen == pairs, caption
            elif split == "validation":
                found_in_validation += bool(pairs & holdout)
    assert found_in_validation >= 10


def test_built_examples_equal_the_renders(built):
    spec, _, path = built
    for split in ("train", "validation"):
        examples = _read_split(path, split)
        for ex in examples[:: max(1, len(examples) // 25)]:
            expected = render_example(spec, split, int(ex["id"]))
            assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
            np.testing.assert_array_equal(ex["image"], expected["image"])
            assert ex["caption"].decode() == expected["caption"]
            assert json.loads(ex["objects_json"]) == expected["objects"]


def test_rebuilding_the_same_spec_reuses_the_data(built):
    spec, data_dir, path = built
    record = next(p for p in os.listdir(path) if "train.array_record" in p)
    before = os.stat(os.path.join(path, record)).st_mtime_ns
    assert build_shapes(str(data_dir), ShapesSpec(**{**spec.__dict__})) == path
    assert os.stat(os.path.join(path, record)).st_mtime_ns == before
    different = build_shapes(str(data_dir), ShapesSpec(image_size=32, num_train=5, num_validation=2, num_test=0))
    assert different != path
    assert tfds.builder_from_directory(different).info.splits["train"].num_examples == 5


# -------------------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dalle-jax data")
    register_shapes(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_builds_a_readable_dataset(tmp_path, capsys):
    args = _parser().parse_args(
        ["shapes", "--out", str(tmp_path), "--num", "24", "--num-validation", "8", "--num-test", "0",
         "--image-size", "32", "--holdout", "red triangle, cyan square", "--seed", "3"]
    )  # fmt: skip
    assert args.func(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    path = next(line.removeprefix("dataset: ") for line in printed if line.startswith("dataset: "))
    assert path.startswith(str(tmp_path))
    assert printed[-2:] == ["  train: 24 examples", "  validation: 8 examples"]
    builder = tfds.builder_from_directory(path)
    assert {name: split.num_examples for name, split in builder.info.splits.items()} == {
        "train": 24,
        "validation": 8,
    }
    spec = ShapesSpec(
        image_size=32, num_train=24, num_validation=8, num_test=0,
        holdout=(("red", "triangle"), ("cyan", "square")), seed=3,
    )  # fmt: skip
    source = builder.as_data_source("train")
    for i in range(len(source)):
        example = source[i]
        expected = render_example(spec, "train", int(example["id"]))
        np.testing.assert_array_equal(example["image"], expected["image"])
        assert example["caption"].decode() == expected["caption"]


def test_cli_rejects_a_bad_holdout(tmp_path, capsys):
    args = _parser().parse_args(["shapes", "--out", str(tmp_path), "--holdout", "pink circle"])
    assert args.func(args) == 2
    out = capsys.readouterr().out
    assert "pink circle" in out and "cyan" in out
    assert not any(tmp_path.iterdir())
