"""Exact scorer for captioned-shapes images: does an image show what its caption says?

Works on any image size and on generated (noisy, blurry) images, not only exact renders:
  1. every pixel takes the nearest palette colour (white included) if within `ASSIGN_DISTANCE`, else none;
  2. 8-connected components of same-colour pixels; components under a fifth of a small box's area are noise;
  3. each component gets a soft coverage map (its pixels and the anti-aliased fringe up to two pixels
     around it, projected onto the white→colour line), whose box (coverage >= `BOX_THRESHOLD`) gives
     size, position and centre, and whose fill ratio, aspect and thirds-of-the-box row and column profiles
     are matched to the same features of the exact shape renders at that box side (triangle widens
     downward, cross has a full middle and thin thirds, circle ~0.785 fill, square ~1.0).

`score` matches caption objects to detections (best colour+shape agreement, then area) and reports one
boolean per stated attribute; "count" (as many objects as the caption names) is part of "all".
"""

from __future__ import annotations

import functools
import itertools
import re
from typing import Any

import numpy as np

from dalle_jax.data.shapes import (
    BACKGROUND,
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    caption_for,
    classify_position,
    relation_between,
    shape_coverage,
    size_px,
)

ASSIGN_DISTANCE = 64.0  # RGB distance within which a pixel counts as a palette colour
BOX_THRESHOLD = 0.2  # coverage from which a pixel counts towards an object's box
MIN_AREA_FRACTION = 0.2  # components smaller than this fraction of a small box's area are noise
SHAPE_MAX_DISTANCE = 0.4  # feature distance to the nearest prototype beyond which a blob is "unknown"

_PALETTE_NAMES = ("white", *COLORS)
_PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # (9, 3)

_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_SIZE = "|".join(SIZES)
_POSITION = "|".join(POSITIONS)
_RELATION = "|".join(RELATIONS)
_THING = rf"an? (?P<{{p}}color>{_COLOR}) (?P<{{p}}shape>{_SHAPE})"
_CAPTION_PATTERNS = {
    "color_shape": re.compile(rf"^{_THING.format(p='a')}$"),
    "size": re.compile(rf"^an? (?P<asize>{_SIZE}) (?P<acolor>{_COLOR}) (?P<ashape>{_SHAPE})$"),
    "position": re.compile(rf"^{_THING.format(p='a')} in the (?P<aposition>{_POSITION})$"),
    "size_position": re.compile(
        rf"^an? (?P<asize>{_SIZE}) (?P<acolor>{_COLOR}) (?P<ashape>{_SHAPE}) in the (?P<aposition>{_POSITION})$"
    ),
    "relation": re.compile(rf"^{_THING.format(p='a')} (?P<relation>{_RELATION}) {_THING.format(p='b')}$"),
}


def parse_caption(caption: str) -> dict[str, Any]:
    """{"template", "objects": [{color, shape, size?, position?}], "relation": str | None}; ValueError if
    the caption fits none of the five templates."""
    text = " ".join(caption.strip().lower().split())
    for template, pattern in _CAPTION_PATTERNS.items():
        match = pattern.match(text)
        if match is None:
            continue
        groups = match.groupdict()
        objects = []
        for prefix in ("a", "b"):
            if groups.get(f"{prefix}color") is None:
                continue
            obj = {"color": groups[f"{prefix}color"], "shape": groups[f"{prefix}shape"]}
            for key in ("size", "position"):
                if groups.get(f"{prefix}{key}") is not None:
                    obj[key] = groups[f"{prefix}{key}"]
            objects.append(obj)
        return {"template": template, "objects": objects, "relation": groups.get("relation")}
    raise ValueError(f"caption {caption!r} matches none of the captioned-shapes templates")


def swap_one_concept(caption: str, rng: np.random.Generator,
                     holdout: set[tuple[str, str]] | frozenset = frozenset()) -> str | None:
    """A caption of the same template that differs from `caption` in exactly one stated concept: one object's
    colour, shape, size or position, or the relation — a hard negative for the reranker (NegCLIP, Yuksekgonul et
    al. 2023): in a batch of random pairs a caption rarely meets an image that differs from it in one word, so
    a contrastive model can get by on colour alone. No swap names a pair of `holdout` (the reranker never sees
    held-out pairs, not even as negatives). None when the caption fits no template (one-concept captions,
    other datasets) or every swap would name a held-out pair."""
    try:
        parsed = parse_caption(caption)
    except ValueError:
        return None
    objects, relation = parsed["objects"], parsed["relation"]
    choices = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
    slots = [(i, key) for i, obj in enumerate(objects) for key in choices if key in obj]
    if relation is not None:
        slots.append((None, "relation"))
    for s in rng.permutation(len(slots)):
        i, key = slots[s]
        current = relation if i is None else objects[i][key]
        values = [v for v in (RELATIONS if i is None else choices[key]) if v != current]
        for v in rng.permutation(len(values)):
            swapped = [dict(obj) for obj in objects]
            if i is not None:
                swapped[i][key] = values[v]
            if not any((o["color"], o["shape"]) in holdout for o in swapped):
                return caption_for(parsed["template"], swapped, values[v] if i is None else relation)
    return None


def one_concept_captions(caption: str) -> list[str]:
    """A single-object caption's forms naming only its shape and only its colour, as `data.one_concept_captions`
    trains on ("a small blue circle" -> ["a small circle", "a small blue object"]): the concepts of concept
    guidance (`SampleConfig.concept_scale`). [] for relations (training never drops a concept from them) and for
    captions of no template."""
    try:
        parsed = parse_caption(caption)
    except ValueError:
        return []
    if parsed["relation"] is not None:
        return []
    return [caption_for(parsed["template"], parsed["objects"], concepts=concepts) for concepts in ("shape", "color")]


# ------------------------------------------------------------------------------------------- components


def _connected_components(color_index: np.ndarray) -> np.ndarray:
    """8-connected components of equal positive `color_index`; (H, W) int, each pixel's smallest flat index
    in its component, or -1 for pixels with index <= 0. Min-label propagation with pointer jumping."""
    height, width = color_index.shape
    foreground = color_index > 0
    none = height * width
    labels = np.where(foreground, np.arange(none).reshape(height, width), none)
    padded_colors = np.pad(color_index, 1, constant_values=-1)
    shifts = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    same = [
        foreground & (padded_colors[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] == color_index)
        for dy, dx in shifts
    ]
    while True:
        padded = np.pad(labels, 1, constant_values=none)
        new = labels
        for (dy, dx), connected in zip(shifts, same, strict=True):
            neighbour = padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
            new = np.minimum(new, np.where(connected, neighbour, none))
        flat = new.ravel()
        fg_flat = foreground.ravel()
        for _ in range(4):  # pointer jumping: adopt the label of the pixel our label points to
            flat[fg_flat] = flat[flat[fg_flat]]
        new = flat.reshape(height, width)
        if np.array_equal(new, labels):
            return np.where(foreground, labels, -1)
        labels = new


# --------------------------------------------------------------------------------------------- features


def _thirds(profile: np.ndarray) -> np.ndarray:
    """Mean of a piecewise-constant profile over each third of its length (rows straddling split)."""
    cumulative = np.concatenate([[0.0], np.cumsum(profile, dtype=np.float64)])
    n = len(profile)
    edges = np.interp(np.arange(4) * n / 3, np.arange(n + 1), cumulative)
    return np.diff(edges) / (n / 3)


def _box_of(coverage: np.ndarray) -> tuple[int, int, int, int]:
    """[x0, y0, x1) x [y0, y1) of the pixels covered at least BOX_THRESHOLD (or half the peak, if faint)."""
    threshold = min(BOX_THRESHOLD, 0.5 * float(coverage.max()))
    rows = np.nonzero(coverage.max(axis=1) >= threshold)[0]
    cols = np.nonzero(coverage.max(axis=0) >= threshold)[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _shape_features(coverage: np.ndarray) -> np.ndarray:
    """[fill, aspect, row thirds (top, middle, bottom), column thirds (left, middle, right)] of a coverage map;
    aspect (short / long box side) keeps bars and slivers from passing as squares."""
    x0, y0, x1, y1 = _box_of(coverage)
    box = coverage[y0:y1, x0:x1]
    height, width = box.shape
    fill = box.sum() / (height * width)
    rows = _thirds(box.sum(axis=1) / width)
    cols = _thirds(box.sum(axis=0) / height)
    aspect = min(height, width) / max(height, width)
    return np.concatenate([[fill, aspect], rows, cols])


# Generated images are softer than exact renders, so each shape is also matched blurred by these kernels.
_BLUR_KERNELS = (np.array([1.0]), np.array([1.0, 2.0, 1.0]) / 4, np.array([1.0, 1.0, 1.0]) / 3)


def _blur(coverage: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable blur of a coverage map padded with zeros, so the blurred fringe is kept."""
    reach = len(kernel) // 2
    padded = np.pad(coverage, reach + 1)
    rows = np.apply_along_axis(np.convolve, 1, padded, kernel, mode="same")
    return np.apply_along_axis(np.convolve, 0, rows, kernel, mode="same")


@functools.lru_cache(maxsize=512)
def _prototypes(measured_side: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Features of every shape, exact and blurred, whose box measures about `measured_side`, with labels.

    Blurring widens the measured box, so renders a pixel or two smaller than measured are included.
    """
    features, labels = [], []
    for side in range(max(measured_side - 2, 2), measured_side + 1):
        for shape in SHAPES:
            for kernel in _BLUR_KERNELS:
                features.append(_shape_features(_blur(shape_coverage(shape, side), kernel)))
                labels.append(shape)
    return np.stack(features), tuple(labels)


def _classify_shape(coverage: np.ndarray, measured_side: int) -> tuple[str, float]:
    features, labels = _prototypes(max(measured_side, 2))
    distances = np.linalg.norm(features - _shape_features(coverage), axis=1)
    best = int(np.argmin(distances))
    shape = labels[best] if distances[best] <= SHAPE_MAX_DISTANCE else "unknown"
    return shape, float(distances[best])


# -------------------------------------------------------------------------------------------- detection


def _fringe_color(pixels: np.ndarray) -> np.ndarray:
    """Explains each pixel as white blended with one palette colour: (H, W) index into _PALETTE of the
    colour whose white→colour segment passes nearest."""
    directions = _PALETTE[1:] - _PALETTE[0]  # (8, 3)
    offsets = pixels - _PALETTE[0]  # (H, W, 3)
    along = np.clip(offsets @ directions.T / np.sum(directions**2, axis=1), 0.0, 1.0)  # (H, W, 8)
    residual = np.sum((offsets[:, :, None, :] - along[..., None] * directions) ** 2, axis=-1)
    return np.argmin(residual, axis=-1) + 1


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """8-neighbourhood dilation by `steps` pixels."""
    height, width = mask.shape
    for _ in range(steps):
        padded = np.pad(mask, 1)
        grown = np.zeros_like(mask)
        for dy in range(3):
            for dx in range(3):
                grown |= padded[dy : dy + height, dx : dx + width]
        mask = grown
    return mask


def detect_objects(image: np.ndarray) -> list[dict[str, Any]]:
    """Objects in an (S, S, 3) uint8 image, largest first: dicts with color, shape ("unknown" if no shape
    fits), size, position, box [x0, y0, x1, y1], center [x, y], area (soft pixels), shape_distance."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    pixels = image.astype(np.float32)
    height, width, _ = pixels.shape
    image_size = max(height, width)

    squared = (
        np.sum(pixels**2, axis=-1, keepdims=True) - 2 * pixels @ _PALETTE.T + np.sum(_PALETTE**2, axis=-1)
    )  # (H, W, 9) squared distances to white and the colours
    nearest = np.argmin(squared, axis=-1)
    within = np.take_along_axis(squared, nearest[..., None], axis=-1)[..., 0] <= ASSIGN_DISTANCE**2
    assigned = np.where(within, nearest, -1)  # 0 = white, -1 = none
    labels = _connected_components(assigned)

    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    small, large = size_px("small", image_size), size_px("large", image_size)
    kept = ids[counts >= MIN_AREA_FRACTION * small**2]
    kept_mask = np.isin(labels, kept)

    objects = []
    for component in kept:
        mask = labels == component
        color_index = int(assigned.flat[component])
        rows, cols = np.nonzero(mask)
        # Work in a crop three pixels wider than the component on every side.
        r0, c0 = max(rows.min() - 3, 0), max(cols.min() - 3, 0)
        r1, c1 = min(rows.max() + 4, height), min(cols.max() + 4, width)
        crop = (slice(r0, r1), slice(c0, c1))
        own, others = mask[crop], kept_mask[crop] & ~mask[crop]
        # Anti-aliased edges lie too far from the colour to be assigned, so the object also takes the
        # pixels next to it (noise specks of a neighbouring colour inside it included), and, two steps away
        # (a triangle's apex row), pixels that blend white with this same colour and are not next to
        # another object.
        near = _dilate(own, 1)
        second_ring = _dilate(near, 1) & ~near & ~_dilate(others, 1)
        region = (near | (second_ring & (_fringe_color(pixels[crop]) == color_index))) & ~others
        direction = _PALETTE[color_index] - _PALETTE[0]
        alpha = np.clip((pixels[crop] - _PALETTE[0]) @ direction / float(direction @ direction), 0.0, 1.0)
        coverage = np.pad(np.where(region, alpha, 0.0), 1)
        bx0, by0, bx1, by1 = _box_of(coverage)
        x0, y0 = int(bx0 + c0 - 1), int(by0 + r0 - 1)
        x1, y1 = int(bx1 + c0 - 1), int(by1 + r0 - 1)
        side = max(x1 - x0, y1 - y0)
        shape, shape_distance = _classify_shape(coverage, round((x1 - x0 + y1 - y0) / 2))
        center = [(x0 + x1) / 2, (y0 + y1) / 2]
        objects.append(
            {
                "color": _PALETTE_NAMES[color_index],
                "shape": shape,
                "size": "large" if side > (small + large) / 2 else "small",
                "position": classify_position(center, image_size),
                "box": [x0, y0, x1, y1],
                "center": center,
                "area": float(coverage.sum()),
                "shape_distance": shape_distance,
            }
        )
    objects.sort(key=lambda obj: -obj["area"])
    return objects


# ------------------------------------------------------------------------------------------------ score


def score(image: np.ndarray, caption: str) -> dict[str, bool]:
    """Which stated attributes of the caption the image shows.

    Keys: "count" (as many objects as named), "color", "shape", "color_shape" (both right for every object),
    plus "size" / "position" / "relation" when the caption states them, and "all".
    """
    return match(image, caption)[0]


def match(image: np.ndarray, caption: str) -> tuple[dict[str, bool], list[dict[str, Any]]]:
    """`score`'s verdict and the detected objects it matched to the caption's objects, in caption order (empty
    when the image has fewer objects than the caption names). Their "shape_distance" says how cleanly a shape
    judged right is drawn: exact renders measure ~0, a dVAE round trip of a small object 0.09 (median), and
    anything up to SHAPE_MAX_DISTANCE passes."""
    parsed = parse_caption(caption)
    wanted = parsed["objects"]
    keys = ["count", "color", "shape", "color_shape"]
    keys += [key for key in ("size", "position") if any(key in obj for obj in wanted)]
    if parsed["relation"] is not None:
        keys.append("relation")

    detected = detect_objects(image)
    if len(detected) < len(wanted):
        return dict.fromkeys([*keys, "all"], False), []

    def agreement(assignment: tuple[int, ...]) -> tuple[int, float]:
        matches = sum(
            (detected[d]["color"] == w["color"]) + (detected[d]["shape"] == w["shape"])
            for d, w in zip(assignment, wanted, strict=True)
        )
        return matches, sum(detected[d]["area"] for d in assignment)

    candidates = range(min(len(detected), 6))  # largest few; more would only be noise
    best = max(itertools.permutations(candidates, len(wanted)), key=agreement)
    pairs = [(w, detected[d]) for w, d in zip(wanted, best, strict=True)]

    result = {
        "count": len(detected) == len(wanted),
        "color": all(w["color"] == d["color"] for w, d in pairs),
        "shape": all(w["shape"] == d["shape"] for w, d in pairs),
        "color_shape": all(w["color"] == d["color"] and w["shape"] == d["shape"] for w, d in pairs),
    }
    for key in ("size", "position"):
        if key in keys:
            result[key] = all(w[key] == d[key] for w, d in pairs if key in w)
    if "relation" in keys:
        result["relation"] = relation_between(pairs[0][1]["center"], pairs[1][1]["center"]) == parsed["relation"]
    result["all"] = all(result.values())
    return result, [d for _, d in pairs]
