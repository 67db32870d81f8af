"""PNG grids with captions: how every stage shows people what it did."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [0, 1] or uint8 (H, W, 3) -> uint8 (H, W, 3)."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError):  # Pillow built without FreeType: the bitmap font ignores size
        return ImageFont.load_default()


def make_grid(images: Sequence[np.ndarray], captions: Sequence[str] | None = None, *, columns: int = 8,
              scale: int = 2, padding: int = 4, font_size: int = 11, row_titles: Sequence[str] | None = None
              ) -> Image.Image:
    """Tiles images (all the same size) left to right, top to bottom, each with its caption below.

    Args:
      images: uint8 or float [0, 1] arrays (H, W, 3).
      captions: one per image (wrapped to the tile width), or None.
      columns: tiles per row.
      scale: nearest-neighbour upscaling so small images (32-64 px) stay readable.
      row_titles: optional text drawn above each row (e.g. the prompt for a row of samples).
    """
    if len(images) == 0:
        raise ValueError("make_grid: no images")
    tiles = [Image.fromarray(to_uint8(im)) for im in images]
    w, h = tiles[0].size
    w, h = w * scale, h * scale
    font = _font(font_size)
    line_h = font_size + 3
    chars = max(4, int(w / (font_size * 0.55)))
    wrapped = [textwrap.wrap(c, chars)[:4] for c in captions] if captions else None
    caption_h = (max(len(lines) for lines in wrapped) * line_h + 2) if wrapped else 0
    title_h = line_h + 2 if row_titles else 0
    columns = min(columns, len(tiles))
    rows = (len(tiles) + columns - 1) // columns
    cell_w, cell_h = w + padding, h + caption_h + padding
    grid = Image.new("RGB", (columns * cell_w + padding, rows * (cell_h + title_h) + padding), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        x = padding + c * cell_w
        y = padding + r * (cell_h + title_h)
        if row_titles and c == 0 and r < len(row_titles):
            draw.text((padding, y), row_titles[r], fill=(0, 0, 0), font=font)
        y += title_h
        grid.paste(tile.resize((w, h), Image.NEAREST), (x, y))
        draw.rectangle([x - 1, y - 1, x + w, y + h], outline=(200, 200, 200))
        for j, line in enumerate(wrapped[i] if wrapped else []):
            draw.text((x, y + h + 2 + j * line_h), line, fill=(0, 0, 0), font=font)
    return grid


def save_grid(path: str | Path, images: Sequence[np.ndarray], captions: Sequence[str] | None = None,
              **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(images, captions, **kwargs).save(path)
    return path
