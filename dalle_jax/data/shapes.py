"""The built-in captioned-shapes dataset: rendering, captions, a TFDS builder and its CLI.

Every image is a white square with one or two flat-coloured shapes; its caption states exactly what is drawn,
so a sample can be checked by `dalle_jax.data.scorer` without any learned model. The rules in this file
(palette, sizes, the position partition, the relation rule) are the ground truth the scorer shares.

Geometry (image size S, all sizes scale by S/64):
  * Boxes are integer-aligned squares `[x0, x1) x [y0, y1)`; small = 16 px side, large = 28 px at 64 px.
    Shapes fill their box: circle (inscribed), square, triangle (isosceles, apex up, base = box width),
    cross (plus sign, arm thickness side/3). Edges are anti-aliased by 4x4 supersampling, interiors exact.
  * Positions partition the image by the object's centre: "center" when the centre lies in the middle-third
    square, else the quadrant that holds it. Generated centres keep a margin of max(1, S/32) px from every
    partition boundary, so small rendering or detection errors cannot flip the position.
  * Relations compare centres along the dominant axis: "a above b" means b's centre is lower than a's by
    more than their horizontal offset. Generated pairs keep the boxes apart along that axis by a gap of
    max(2, S/32) px, and the dominant offset exceeds the other by the margin.

Captions are one of five templates (`TEMPLATES`), chosen by `ShapesSpec.template_weights`. The default mix,
(0.10, 0.15, 0.20, 0.25, 0.30) for (color_shape, size, position, size_position, relation), favours the
captions that state more, since those teach the prior the most and the scorer checks the most.

Held-out (color, shape) pairs never appear in any train-split object (pixels or caption). Validation and test
draw objects from all pairs and, with probability `holdout_oversample` (default 0.25), force the first object
to be a held-out pair, so compositional generalisation can be measured on a reasonable number of examples.

Example i of split s depends only on (spec, s, i) through `np.random.default_rng([seed, split_index, i])`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
    "black": (20, 20, 20),
    "cyan": (20, 190, 200),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SIZES: tuple[str, ...] = ("small", "large")
SIZE_PX_AT_64: dict[str, int] = {"small": 16, "large": 28}
POSITIONS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right", "center")
RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of")
TEMPLATES: tuple[str, ...] = ("color_shape", "size", "position", "size_position", "relation")
DEFAULT_TEMPLATE_WEIGHTS: tuple[float, ...] = (0.10, 0.15, 0.20, 0.25, 0.30)
DEFAULT_HOLDOUT: tuple[tuple[str, str], ...] = (
    ("red", "triangle"),
    ("blue", "circle"),
    ("yellow", "cross"),
    ("green", "square"),
)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
MIN_IMAGE_SIZE = 16
SUPERSAMPLE = 4


@dataclasses.dataclass(frozen=True)
class ShapesSpec:
    """Everything that determines the dataset's content; equal specs give identical datasets."""

    image_size: int = 64
    num_train: int = 10000
    num_validation: int = 1000
    num_test: int = 1000
    holdout: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT
    seed: int = 0
    template_weights: tuple[float, ...] = DEFAULT_TEMPLATE_WEIGHTS
    holdout_oversample: float = 0.25
    # Object corners snap to multiples of `grid` px (1 = any pixel). A dVAE that downsamples by f sees an
    # object at f x f sub-token offsets, each with its own codes; grid = f gives every (colour, shape, size) one
    # token pattern, which short runs learn far faster (README "Stage 1").
    grid: int = 1
    # Fraction of the (colour, shape, size, position) combinations that single-object train images may show: a
    # fixed subset (seeded by `seed`) keeping at least one combination of every trained pair, so the same number of
    # images covers fewer distinct combinations (a composition lever, Okawa et al. 2023). Relation images and the
    # validation and test splits are unaffected. 1 = every combination.
    train_coverage: float = 1.0
    # Fraction of single-object train captions that name one concept: only the shape ("a small triangle in the top
    # left") or only the colour ("a small red object in the top left"), half each, drawn from a stream of their own
    # (images and every other draw unchanged). In full captions colour and shape always come together, so a prior
    # can learn each trained pair as one unit; a caption naming one concept makes that word act on its own (issue
    # 17: held-out pairs fail on the shape). 0 = every caption names both.
    one_concept_captions: float = 0.0

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {self.image_size}")
        for name in ("num_train", "num_validation", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        # Normalise to hashable tuples so specs built from lists compare and hash equal.
        object.__setattr__(self, "holdout", tuple((str(c), str(s)) for c, s in self.holdout))
        object.__setattr__(self, "template_weights", tuple(float(w) for w in self.template_weights))
        for color, shape in self.holdout:
            if color not in COLORS or shape not in SHAPES:
                raise ValueError(f"bad held-out pair {(color, shape)}; {_valid_names()}")
        if len(all_pairs()) - len(set(self.holdout)) < 2:
            raise ValueError("the holdout leaves fewer than two (color, shape) pairs for training")
        weights = self.template_weights
        if len(weights) != len(TEMPLATES) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"template_weights needs {len(TEMPLATES)} non-negative weights for {TEMPLATES}")
        if not 0.0 <= self.holdout_oversample <= 1.0:
            raise ValueError("holdout_oversample must be in [0, 1]")
        if not 1 <= self.grid <= self.image_size // 4:
            raise ValueError(f"grid={self.grid} must be in [1, image_size / 4 = {self.image_size // 4}]")
        if not 0.0 < self.train_coverage <= 1.0:
            raise ValueError(f"train_coverage={self.train_coverage} must be in (0, 1]")
        if not 0.0 <= self.one_concept_captions <= 1.0:
            raise ValueError(f"one_concept_captions={self.one_concept_captions} must be in [0, 1]")
        self._check_grid_leaves_room()

    def _check_grid_leaves_room(self) -> None:
        """Every size fits every position on the grid (relations then fit too: checked for every grid at 16-128 px)."""
        size, grid = self.image_size, self.grid
        for name in SIZES:
            for position in POSITIONS:
                if len(corners_in_position(size_px(name, size), position, size, grid)[0]) == 0:
                    raise ValueError(f"grid={grid} leaves no corner for a {name} object in the {position} of a "
                                     f"{size}px image; use a smaller grid or a larger image")

    def num_examples(self, split: str) -> int:
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}[split]

    def to_json(self) -> str:
        fields = dataclasses.asdict(self)
        for name, default in (("grid", 1), ("train_coverage", 1.0), ("one_concept_captions", 0.0)):
            if fields[name] == default:  # datasets built before the field existed keep their names
                del fields[name]
        return json.dumps(fields, sort_keys=True)

    def config_name(self) -> str:
        """A short, filesystem-safe name that changes whenever any field changes."""
        digest = hashlib.sha256(self.to_json().encode()).hexdigest()[:10]
        return f"s{self.image_size}_seed{self.seed}_{digest}"


def _valid_names() -> str:
    return f"valid colours: {', '.join(COLORS)}; valid shapes: {', '.join(SHAPES)}"


def all_pairs() -> tuple[tuple[str, str], ...]:
    return tuple((color, shape) for color in COLORS for shape in SHAPES)


@functools.lru_cache(maxsize=16)
def covered_combinations(spec: ShapesSpec) -> tuple[tuple[str, str, str, str], ...]:
    """The (colour, shape, size, position) combinations single-object train images show under
    `spec.train_coverage`: one random combination of every trained pair, then random others up to the fraction."""
    holdout = set(spec.holdout)
    pairs = [p for p in all_pairs() if p not in holdout]
    combos = [(*pair, size, position) for pair in pairs for size in SIZES for position in POSITIONS]
    if spec.train_coverage >= 1.0:
        return tuple(combos)
    rng = np.random.default_rng([spec.seed, 7919])  # its own stream: the examples' draws are untouched
    per_pair = len(SIZES) * len(POSITIONS)
    first = [i * per_pair + int(rng.integers(per_pair)) for i in range(len(pairs))]
    rest = [i for i in rng.permutation(len(combos)) if i not in set(first)]
    count = max(len(pairs), round(spec.train_coverage * len(combos)))
    return tuple(combos[i] for i in sorted(first + rest[:count - len(first)]))


def parse_holdout(text: str) -> tuple[tuple[str, str], ...]:
    """Parses "red triangle,blue circle" into (("red", "triangle"), ("blue", "circle")); "" or "none" → ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    pairs = []
    for entry in text.split(","):
        words = entry.strip().lower().split()
        if len(words) != 2 or words[0] not in COLORS or words[1] not in SHAPES:
            raise ValueError(f"bad held-out entry {entry.strip()!r} (want '<colour> <shape>'); {_valid_names()}")
        pairs.append((words[0], words[1]))
    return tuple(dict.fromkeys(pairs))  # drop duplicates, keep order


# ----------------------------------------------------------------------------------------------- geometry


def size_px(size: str, image_size: int) -> int:
    """Box side in pixels of a "small" / "large" object at this image size."""
    return int(round(SIZE_PX_AT_64[size] * image_size / 64))


def position_margin(image_size: int) -> float:
    return max(1.0, image_size / 32)


def classify_position(center: Sequence[float], image_size: int) -> str:
    """The position name of a centre (x, y): "center" inside the middle-third square, else its quadrant."""
    dx, dy = center[0] - image_size / 2, center[1] - image_size / 2
    if max(abs(dx), abs(dy)) < image_size / 6:
        return "center"
    return f"{'top' if dy < 0 else 'bottom'} {'left' if dx < 0 else 'right'}"


def relation_between(first_center: Sequence[float], second_center: Sequence[float]) -> str:
    """How the first object relates to the second, judged along the axis of larger centre offset."""
    dx = second_center[0] - first_center[0]
    dy = second_center[1] - first_center[1]  # image y grows downwards
    if abs(dy) > abs(dx):
        return "above" if dy > 0 else "below"
    return "to the left of" if dx > 0 else "to the right of"


@functools.lru_cache(maxsize=256)
def shape_coverage(shape: str, side: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
    """Fraction of each pixel of a side x side box covered by the shape, (side, side) float32, read-only.

    Boxes are integer-aligned, so coverage depends only on (shape, side) and is cached.
    """
    sub = (np.arange(side * supersample) + 0.5) / supersample  # sub-pixel centres in box coordinates
    u, v = np.meshgrid(sub, sub)  # u: x (right), v: y (down)
    half = side / 2
    if shape == "circle":
        inside = (u - half) ** 2 + (v - half) ** 2 <= half**2
    elif shape == "square":
        inside = np.ones_like(u, dtype=bool)
    elif shape == "triangle":
        inside = np.abs(u - half) <= v / 2  # apex at the top centre, base spans the bottom edge
    elif shape == "cross":
        arm = side / 6  # half the arm thickness of side / 3
        inside = (np.abs(u - half) <= arm) | (np.abs(v - half) <= arm)
    else:
        raise ValueError(f"unknown shape {shape!r}; valid shapes: {', '.join(SHAPES)}")
    coverage = inside.reshape(side, supersample, side, supersample).mean(axis=(1, 3)).astype(np.float32)
    coverage.flags.writeable = False
    return coverage


def render_objects(objects: Sequence[dict[str, Any]], image_size: int) -> np.ndarray:
    """Draws objects (dicts with "color", "shape", "box" = [x0, y0, x1, y1]) on white; (S, S, 3) uint8."""
    canvas = np.full((image_size, image_size, 3), BACKGROUND, dtype=np.float32)
    for obj in objects:
        x0, y0, x1, y1 = (int(v) for v in obj["box"])
        side = x1 - x0
        if side != y1 - y0 or x0 < 0 or y0 < 0 or x1 > image_size or y1 > image_size:
            raise ValueError(f"box {obj['box']} must be a square inside the {image_size}px image")
        coverage = shape_coverage(obj["shape"], side)[..., None]  # (side, side, 1)
        color = np.asarray(COLORS[obj["color"]], np.float32)
        region = canvas[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1] = region * (1 - coverage) + color * coverage
    return np.round(canvas).astype(np.uint8)


def _object(color: str, shape: str, size: str, x0: int, y0: int, image_size: int) -> dict[str, Any]:
    side = size_px(size, image_size)
    center = [x0 + side / 2, y0 + side / 2]
    return {
        "color": color,
        "shape": shape,
        "size": size,
        "box": [int(x0), int(y0), int(x0 + side), int(y0 + side)],
        "center": center,
        "position": classify_position(center, image_size),
    }


def lattice_objects(image_size: int, grid: int, per_axis: int = 7) -> list[dict[str, Any]]:
    """A single object of every (colour, shape, size) at up to `per_axis` x `per_axis` corners on the data's grid,
    evenly spread over where it fits: the images a dVAE round trip is checked on (`experiments.evaluate`)."""
    objects = []
    for size in SIZES:
        side = size_px(size, image_size)
        corners = np.arange(0, image_size - side + 1, grid)
        corners = corners[np.unique(np.linspace(0, len(corners) - 1, min(per_axis, len(corners))).round().astype(int))]
        for color, shape in all_pairs():
            objects += [_object(color, shape, size, int(x0), int(y0), image_size) for x0 in corners for y0 in corners]
    return objects


def corners_in_position(side: int, position: str, image_size: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-left corners (xs, ys) on the `grid` whose centre is in `position`, at least the margin from its borders."""
    corners = np.arange(0, image_size - side + 1, grid)
    offsets = corners + side / 2 - image_size / 2  # centre offset from the image centre
    dx, dy = np.meshgrid(offsets, offsets)  # (n, n): dx varies along x0, dy along y0
    margin, third = position_margin(image_size), image_size / 6
    chebyshev = np.maximum(np.abs(dx), np.abs(dy))
    if position == "center":
        valid = chebyshev <= third - margin
    else:
        vertical, horizontal = position.split()
        valid = (chebyshev >= third + margin) & (np.abs(dx) >= margin) & (np.abs(dy) >= margin)
        valid &= (dy < 0) if vertical == "top" else (dy > 0)
        valid &= (dx < 0) if horizontal == "left" else (dx > 0)
    ys, xs = np.nonzero(valid)
    return corners[xs], corners[ys]


def sample_corner_in_position(rng: np.random.Generator, side: int, position: str, image_size: int, grid: int):
    """Uniform top-left corner on the `grid` whose centre is in `position` (`ShapesSpec` ensures there is one)."""
    xs, ys = corners_in_position(side, position, image_size, grid)
    pick = rng.integers(len(xs))
    return int(xs[pick]), int(ys[pick])


def pair_gap(image_size: int) -> int:
    """White pixels at least between the boxes of a relation (an anti-aliased apex row can lie two from its core)."""
    return max(2, round(image_size / 32))


def sample_pair_corners(rng: np.random.Generator, sides: tuple[int, int], relation: str, image_size: int,
                         grid: int):
    """Corners on the `grid` for two boxes, the first clearly `relation` the second, the boxes not touching."""
    margin, gap = position_margin(image_size), pair_gap(image_size)
    first, second = sides
    for _ in range(200):  # each round tries 256 candidates; acceptance is a few percent at worst
        ax, ay = (rng.integers(0, (image_size - first) // grid + 1, 256) * grid for _ in range(2))
        bx, by = (rng.integers(0, (image_size - second) // grid + 1, 256) * grid for _ in range(2))
        dx = (bx + second / 2) - (ax + first / 2)
        dy = (by + second / 2) - (ay + first / 2)
        if relation == "above":
            ok = (ay + first + gap <= by) & (dy >= np.abs(dx) + margin)
        elif relation == "below":
            ok = (by + second + gap <= ay) & (-dy >= np.abs(dx) + margin)
        elif relation == "to the left of":
            ok = (ax + first + gap <= bx) & (dx >= np.abs(dy) + margin)
        elif relation == "to the right of":
            ok = (bx + second + gap <= ax) & (-dx >= np.abs(dy) + margin)
        else:
            raise ValueError(f"unknown relation {relation!r}")
        hits = np.nonzero(ok)[0]
        if len(hits):
            i = hits[0]
            return (int(ax[i]), int(ay[i])), (int(bx[i]), int(by[i]))
    raise RuntimeError(f"could not place two objects {relation} each other in a {image_size}px image")


# ----------------------------------------------------------------------------------------------- captions


def with_article(phrase: str) -> str:
    """Prefixes "an" before a vowel sound's letter, else "a": "an orange cross", "a large ..."."""
    return f"{'an' if phrase[:1] in 'aeiou' else 'a'} {phrase}"


def caption_for(template: str, objects: Sequence[dict[str, Any]], relation: str | None = None,
                concepts: str = "both") -> str:
    """The caption of `template` for the objects (dicts with color, shape, size, position); a single object's
    caption names its colour and shape (`concepts` "both"), only its shape ("shape") or only its colour ("color")."""
    first = objects[0]
    color_shape = {"both": f"{first['color']} {first['shape']}", "shape": first["shape"],
                   "color": f"{first['color']} object"}[concepts]
    if concepts != "both" and template == "relation":
        raise ValueError("a relation caption names both concepts of each object")
    if template == "color_shape":
        return with_article(color_shape)
    if template == "size":
        return with_article(f"{first['size']} {color_shape}")
    if template == "position":
        return f"{with_article(color_shape)} in the {first['position']}"
    if template == "size_position":
        return f"{with_article(first['size'] + ' ' + color_shape)} in the {first['position']}"
    if template == "relation":
        second = objects[1]
        return f"{with_article(color_shape)} {relation} {with_article(second['color'] + ' ' + second['shape'])}"
    raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")


# ------------------------------------------------------------------------------------------------ examples


def render_example(spec: ShapesSpec, split: str, index: int) -> dict[str, Any]:
    """Example `index` of `split`: {"image", "caption", "objects", "template", "relation"}.

    Depends only on (spec, split, index), so any example can be regenerated on its own.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
    size = spec.image_size
    holdout = set(spec.holdout)
    allowed = [p for p in all_pairs() if split != "train" or p not in holdout]
    weights = np.asarray(spec.template_weights) / sum(spec.template_weights)
    template = TEMPLATES[rng.choice(len(TEMPLATES), p=weights)]

    if split != "train" and holdout and rng.random() < spec.holdout_oversample:
        first_pair = spec.holdout[rng.integers(len(spec.holdout))]
    else:
        first_pair = allowed[rng.integers(len(allowed))]

    relation = None
    if template == "relation":
        others = [p for p in allowed if p != first_pair]
        second_pair = others[rng.integers(len(others))]
        sizes = [SIZES[rng.integers(len(SIZES))] for _ in range(2)]
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        sides = (size_px(sizes[0], size), size_px(sizes[1], size))
        corner_a, corner_b = sample_pair_corners(rng, sides, relation, size, spec.grid)
        objects = [
            _object(*first_pair, sizes[0], *corner_a, size),
            _object(*second_pair, sizes[1], *corner_b, size),
        ]
    elif split == "train" and spec.train_coverage < 1.0:
        combos = covered_combinations(spec)
        color, shape, obj_size, position = combos[rng.integers(len(combos))]
        corner = sample_corner_in_position(rng, size_px(obj_size, size), position, size, spec.grid)
        objects = [_object(color, shape, obj_size, *corner, size)]
    else:
        obj_size = SIZES[rng.integers(len(SIZES))]
        position = POSITIONS[rng.integers(len(POSITIONS))]
        corner = sample_corner_in_position(rng, size_px(obj_size, size), position, size, spec.grid)
        objects = [_object(*first_pair, obj_size, *corner, size)]

    concepts = "both"
    if split == "train" and template != "relation" and spec.one_concept_captions > 0:
        side = np.random.default_rng([spec.seed, SPLITS.index(split), index, 104729])  # leaves `rng` untouched
        if side.random() < spec.one_concept_captions:
            concepts = "shape" if side.random() < 0.5 else "color"
    return {
        "image": render_objects(objects, size),
        "caption": caption_for(template, objects, relation, concepts),
        "objects": objects,
        "template": template,
        "relation": relation,
    }


# -------------------------------------------------------------------------------------------------- TFDS


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    """A BuilderConfig carrying the full spec; its name is derived from the spec (see `config_for`)."""

    spec: ShapesSpec = dataclasses.field(default_factory=ShapesSpec)


class ShapesBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the captioned-shapes dataset (features: image, caption, id, objects_json)."""

    name = "captioned_shapes"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [ShapesConfig(name=ShapesSpec().config_name(), description=ShapesSpec().to_json())]

    @classmethod
    def config_for(cls, spec: ShapesSpec) -> ShapesConfig:
        # TFDS refuses a custom config that shares a name with a predefined one, so reuse that instance.
        for config in cls.BUILDER_CONFIGS:
            if config.spec == spec:
                return config
        return ShapesConfig(name=spec.config_name(), description=spec.to_json(), spec=spec)

    DESCRIPTION = "Captioned shapes (dalle_jax built-in)."

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.spec.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.DESCRIPTION} Spec: {self.builder_config.spec.to_json()}",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(size, size, 3), dtype=np.uint8, encoding="zlib"),
                    "caption": tfds.features.Text(),
                    "id": tfds.features.Scalar(dtype=np.int64),
                    "objects_json": tfds.features.Text(),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        spec = self.builder_config.spec
        return {split: self._generate_examples(split) for split in SPLITS if spec.num_examples(split) > 0}

    def _generate_examples(self, split: str):
        for index in range(self.builder_config.spec.num_examples(split)):
            image, caption, objects = self.render(split, index)
            yield index, {"image": image, "caption": caption, "id": index, "objects_json": json.dumps(objects)}

    def render(self, split: str, index: int) -> tuple[np.ndarray, str, Any]:
        """Example `index` of `split`: its image, caption and what the objects_json feature records."""
        example = render_example(self.builder_config.spec, split, index)
        return example["image"], example["caption"], example["objects"]


def build_shapes(data_dir: str, spec: ShapesSpec) -> str:
    """Builds (or reuses, if already built) the dataset as array_record; returns its version directory."""
    builder = ShapesBuilder(data_dir=data_dir, config=ShapesBuilder.config_for(spec), file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)
