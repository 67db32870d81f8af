"""A real-image dataset no one here drew: Noto Color Emoji glyphs composed into captioned scenes (`dalle-jax data
emoji`).

Each image is a flat background colour with one or two emoji; the caption names the emoji by its Unicode name
("PENGUIN" -> "a penguin", "SPOUTING WHALE" -> "a whale"), the background colour, and where the emoji are:

    plain           "an emoji of a penguin on a blue background"
    size_position   "a small penguin in the top left on a blue background"
    relation        "a penguin above an avocado on a blue background"

Held-out (emoji, colour) pairs never appear in train (no image of that emoji on that background), but do in
validation and test, oversampled as for the shapes, so the prior's composition of an object it knows with a colour
it knows can be measured. The geometry (positions by the centre's partition, relations along the dominant axis,
margins) is the shapes dataset's (`dalle_jax.data.shapes`).

The glyphs come from Debian's `fonts-noto-color-emoji` (NotoColorEmoji.ttf, bitmap strikes at 109 px), rendered once
per emoji and resized with LANCZOS on premultiplied alpha; nothing is downloaded. Example i of split s depends only
on (spec, s, i).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont

from dalle_jax.data import shapes
from dalle_jax.data.shapes import COLORS, POSITIONS, RELATIONS, SPLITS, with_article
from dalle_jax.errors import DatasetError

FONT_PATHS = ("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", "/usr/share/fonts/noto/NotoColorEmoji.ttf")
FONT_PACKAGE = "fonts-noto-color-emoji"
_STRIKE = 109  # the font's bitmap size; other sizes do not render

EMOJI: tuple[str, ...] = tuple("🐧🥑🐈🐕🚀🍎🍌🍕🐸🐙🦋🐌🐢🐳🦉⭐🍄🌵🌻🦀🍋🍓👻🤖")
# Unicode names shortened where the name carries a qualifier a caption would not (a colour word would also clash
# with the background's); otherwise the name lowercased, without " face".
_SHORTER = {"red apple": "apple", "slice of pizza": "pizza", "spouting whale": "whale", "white medium star": "star"}
TEMPLATES: tuple[str, ...] = ("plain", "size_position", "relation")
DEFAULT_TEMPLATE_WEIGHTS: tuple[float, ...] = (0.3, 0.4, 0.3)
DEFAULT_HOLDOUT: tuple[tuple[str, str], ...] = (("penguin", "blue"), ("avocado", "red"), ("cat", "green"),
                                                 ("rocket", "yellow"), ("octopus", "purple"), ("lemon", "black"))
# emoji side / image side: 12 and 16 px at 32 px for the sizes captions name (a larger "large" leaves no room in a
# quadrant at 32 px); the plain template's single emoji is drawn at 24 px in the centre, where it is easiest to see
SIZE_FRACTION = {"small": 0.375, "large": 0.5, "plain": 0.75}


def object_name(emoji: str) -> str:
    """The caption word(s) for an emoji, from its Unicode name."""
    name = unicodedata.name(emoji).lower().removesuffix(" face")
    return _SHORTER.get(name, name)


NAMES: dict[str, str] = {object_name(e): e for e in EMOJI}


@dataclasses.dataclass(frozen=True)
class EmojiSpec:
    """Everything that determines the dataset's content; equal specs give identical datasets."""

    image_size: int = 32
    num_train: int = 10000
    num_validation: int = 1000
    num_test: int = 1000
    holdout: tuple[tuple[str, str], ...] = DEFAULT_HOLDOUT  # (emoji name, background colour)
    seed: int = 0
    template_weights: tuple[float, ...] = DEFAULT_TEMPLATE_WEIGHTS
    holdout_oversample: float = 0.25

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 (an emoji needs ~12 px), got {self.image_size}")
        for name in ("num_train", "num_validation", "num_test"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        object.__setattr__(self, "holdout", tuple((str(e), str(c)) for e, c in self.holdout))
        object.__setattr__(self, "template_weights", tuple(float(w) for w in self.template_weights))
        for emoji, color in self.holdout:
            if emoji not in NAMES or color not in COLORS:
                raise ValueError(f"bad held-out pair {(emoji, color)}; emoji: {', '.join(NAMES)}; "
                                 f"colours: {', '.join(COLORS)}")
        weights = self.template_weights
        if len(weights) != len(TEMPLATES) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"template_weights needs {len(TEMPLATES)} non-negative weights for {TEMPLATES}")
        for size in ("small", "large"):  # every named size fits every position (true for every size >= 32)
            for position in POSITIONS:
                if not len(shapes.corners_in_position(side_px(size, self.image_size), position, self.image_size,
                                                      1)[0]):
                    raise ValueError(f"a {size} emoji has no room in the {position} of a {self.image_size} px image")

    def num_examples(self, split: str) -> int:
        return {"train": self.num_train, "validation": self.num_validation, "test": self.num_test}[split]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def config_name(self) -> str:
        digest = hashlib.sha256(self.to_json().encode()).hexdigest()[:10]
        return f"s{self.image_size}_seed{self.seed}_{digest}"


def parse_holdout(text: str) -> tuple[tuple[str, str], ...]:
    """"penguin blue,avocado red" -> (("penguin", "blue"), ("avocado", "red")); "" or "none" -> ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    pairs = []
    for entry in text.split(","):
        *emoji, color = entry.strip().lower().split()
        pairs.append((" ".join(emoji), color))
    return tuple(dict.fromkeys(pairs))


# ------------------------------------------------------------------------------------------------ glyphs

def find_font(path: str | None = None) -> str:
    """The Noto Color Emoji font file: `path`, or where Debian installs it; DatasetError names the package."""
    for candidate in ([path] if path else FONT_PATHS):
        if Path(candidate).is_file():
            return str(candidate)
    where = path or " or ".join(FONT_PATHS)
    raise DatasetError(f"Noto Color Emoji font not found at {where}: install it with `apt-get install {FONT_PACKAGE}` "
                       "(or pass --font PATH to NotoColorEmoji.ttf)")


@functools.cache
def glyph(emoji: str, font_path: str) -> np.ndarray:
    """The emoji's pixels as premultiplied RGBA float32 (side, side, 4) in [0, 1], centred in a square."""
    font = ImageFont.truetype(font_path, _STRIKE)
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), emoji, font=font, embedded_color=True)
    left, top, right, bottom = canvas.getbbox()
    side = max(right - left, bottom - top)
    square = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    square.paste(canvas.crop((left, top, right, bottom)), ((side - right + left) // 2, (side - bottom + top) // 2))
    rgba = np.asarray(square, np.float32) / 255.0
    rgba[..., :3] *= rgba[..., 3:]
    rgba.flags.writeable = False
    return rgba


@functools.lru_cache(maxsize=512)
def _scaled(emoji: str, font_path: str, side: int) -> np.ndarray:
    rgba = glyph(emoji, font_path)
    channels = [Image.fromarray(rgba[..., c], "F").resize((side, side), Image.Resampling.LANCZOS) for c in range(4)]
    scaled = np.clip(np.stack([np.asarray(c) for c in channels], -1), 0.0, 1.0)
    scaled.flags.writeable = False
    return scaled


def render(objects: list[dict[str, Any]], background: str, image_size: int, font_path: str) -> np.ndarray:
    """Emoji (dicts with "emoji" and a square "box") over the background colour; (S, S, 3) uint8."""
    canvas = np.empty((image_size, image_size, 3), np.float32)
    canvas[:] = np.asarray(COLORS[background], np.float32) / 255.0
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        rgba = _scaled(NAMES[obj["emoji"]], font_path, x1 - x0)
        canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - rgba[..., 3:]) + rgba[..., :3]
    return np.round(np.clip(canvas, 0, 1) * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ examples

def side_px(size: str, image_size: int) -> int:
    return int(round(SIZE_FRACTION[size] * image_size))


def _object(name: str, size: str, corner: tuple[int, int], image_size: int) -> dict[str, Any]:
    side = side_px(size, image_size)
    x0, y0 = corner
    center = [x0 + side / 2, y0 + side / 2]
    return {"emoji": name, "size": size, "box": [x0, y0, x0 + side, y0 + side], "center": center,
            "position": shapes.classify_position(center, image_size)}


def caption_for(template: str, objects: list[dict[str, Any]], background: str, relation: str | None) -> str:
    first = objects[0]
    on = f"on {with_article(background)} background"
    if template == "plain":
        return f"an emoji of {with_article(first['emoji'])} {on}"
    if template == "size_position":
        return f"{with_article(first['size'] + ' ' + first['emoji'])} in the {first['position']} {on}"
    return f"{with_article(first['emoji'])} {relation} {with_article(objects[1]['emoji'])} {on}"


def render_example(spec: EmojiSpec, split: str, index: int, font_path: str) -> dict[str, Any]:
    """Example `index` of `split`: {"image", "caption", "objects", "background", "template", "relation"}."""
    rng = np.random.default_rng([spec.seed, SPLITS.index(split), index])
    size, names, colors = spec.image_size, list(NAMES), list(COLORS)
    holdout = set(spec.holdout)
    weights = np.asarray(spec.template_weights) / sum(spec.template_weights)
    template = TEMPLATES[rng.choice(len(TEMPLATES), p=weights)]
    if split != "train" and holdout and rng.random() < spec.holdout_oversample:
        first, background = spec.holdout[rng.integers(len(spec.holdout))]
    else:
        while True:
            first, background = names[rng.integers(len(names))], colors[rng.integers(len(colors))]
            if split != "train" or (first, background) not in holdout:
                break
    relation = None
    if template == "relation":  # two small emoji, both allowed on this background in train
        others = [n for n in names if n != first and (split != "train" or (n, background) not in holdout)]
        second = others[rng.integers(len(others))]
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        side = side_px("small", size)
        corner_a, corner_b = shapes.sample_pair_corners(rng, (side, side), relation, size, 1)
        objects = [_object(first, "small", corner_a, size), _object(second, "small", corner_b, size)]
    else:
        obj_size = ("small", "large")[rng.integers(2)] if template == "size_position" else "plain"
        position = POSITIONS[rng.integers(len(POSITIONS))] if template == "size_position" else "center"
        corner = shapes.sample_corner_in_position(rng, side_px(obj_size, size), position, size, 1)
        objects = [_object(first, obj_size, corner, size)]
    return {"image": render(objects, background, size, font_path),
            "caption": caption_for(template, objects, background, relation), "objects": objects,
            "background": background, "template": template, "relation": relation}


# -------------------------------------------------------------------------------------------------- TFDS

@dataclasses.dataclass(eq=False)
class EmojiConfig(tfds.core.BuilderConfig):
    spec: EmojiSpec = dataclasses.field(default_factory=EmojiSpec)
    font_path: str = ""


class EmojiBuilder(shapes.ShapesBuilder):
    """TFDS builder of the captioned-emoji dataset: the shapes builder's features (image, caption, id,
    objects_json) and splits, with emoji scenes."""

    name = "captioned_emoji"
    BUILDER_CONFIGS = []
    DESCRIPTION = "Captioned Noto Color Emoji scenes (dalle_jax built-in)."

    def render(self, split: str, index: int) -> tuple[np.ndarray, str, Any]:
        example = render_example(self.builder_config.spec, split, index, self.builder_config.font_path)
        return example["image"], example["caption"], {"background": example["background"],
                                                      "objects": example["objects"]}


def build_emoji(data_dir: str, spec: EmojiSpec, font: str | None = None) -> str:
    """Builds (or reuses) the dataset as array_record; returns its version directory."""
    config = EmojiConfig(name=spec.config_name(), description=spec.to_json(), spec=spec, font_path=find_font(font))
    builder = EmojiBuilder(data_dir=data_dir, config=config, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)
