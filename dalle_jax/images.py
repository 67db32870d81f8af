"""PNG grids with captions: how every stage shows people what it did."""

from __future__ import annotations

import math
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


CURVE_COLORS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (127, 127, 127), (148, 103, 189), (255, 127, 14))


def plot_curves(out: str | Path, rows: Sequence[dict], keys: Sequence[str], *, title: str = "",
                size: tuple[int, int] = (640, 400)) -> Path | None:
    """Line plot of `keys` against step from metric rows ({"step": ..., key: value}, as metrics.jsonl holds
    them), as a PNG (no plotting library needed).

    Keys absent from the rows are skipped; returns None when none is present.
    """
    # metrics.jsonl writes a non-finite value as a string ("nan"); such points are left out of the plot
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and math.isfinite(r[k])]
              for k in keys}
    series = {k: v for k, v in series.items() if v}
    if not series:
        return None
    width, height = size
    left, right, top, bottom = 60, 16, 28, 40 + 14 * len(series)
    steps = [s for v in series.values() for s, _ in v]
    values = [y for v in series.values() for _, y in v]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(values), max(values)
    y0, y1 = (y0 - 0.05 * (y1 - y0 or 1), y1 + 0.05 * (y1 - y0 or 1))
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(11)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(step: float, value: float) -> tuple[float, float]:
        return left + (step - x0) / (x1 - x0) * plot_w, top + (1 - (value - y0) / (y1 - y0)) * plot_h

    draw.rectangle((left, top, left + plot_w, top + plot_h), outline=(0, 0, 0))
    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        _, y = xy(x0, value)
        draw.line((left - 4, y, left, y), fill=(0, 0, 0))
        draw.text((4, y - 6), f"{value:.3g}", fill=(0, 0, 0), font=font)
        step = x0 + (x1 - x0) * i / 4
        x, _ = xy(step, y0)
        draw.line((x, top + plot_h, x, top + plot_h + 4), fill=(0, 0, 0))
        draw.text((x - 12, top + plot_h + 6), f"{step:.0f}", fill=(0, 0, 0), font=font)
    draw.text((left, 8), title or "metrics", fill=(0, 0, 0), font=font)
    draw.text((left + plot_w - 30, top + plot_h + 6 + 12), "step", fill=(0, 0, 0), font=font)
    for i, (key, points) in enumerate(series.items()):
        color = CURVE_COLORS[i % len(CURVE_COLORS)]
        coords = [xy(s, v) for s, v in points]
        if len(coords) > 1:
            draw.line(coords, fill=color, width=2)
        for x, y in coords if len(coords) < 30 else coords[-1:]:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        legend_y = top + plot_h + 34 + 14 * i
        draw.line((left, legend_y + 6, left + 20, legend_y + 6), fill=color, width=2)
        draw.text((left + 26, legend_y), key, fill=(0, 0, 0), font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


def plot_intervals(out: str | Path, panels: dict[str, dict[str, dict]], *, title: str = "",
                   panel_size: tuple[int, int] = (300, 260)) -> Path | None:
    """One panel per metric, one column per variant: each seed's value as a dot, the mean as a bar and its
    interval as a whisker. `panels` = {metric: {variant: {"values": [...], "mean", "low", "high"}}}; non-finite
    values are left out. Returns None when no panel has a finite value."""
    def finite(xs):
        return [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]

    panels = {m: v for m, v in panels.items() if any(finite(c["values"]) for c in v.values())}
    if not panels:
        return None
    pw, ph = panel_size
    left, top, bottom = 58, 40, 46
    font = _font(11)
    columns = min(3, len(panels))
    rows = (len(panels) + columns - 1) // columns
    image = Image.new("RGB", (columns * pw, rows * ph + 24), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), title, fill=(0, 0, 0), font=font)
    for p, (metric, cells) in enumerate(panels.items()):
        ox, oy = (p % columns) * pw, 24 + (p // columns) * ph
        values = [x for c in cells.values() for x in finite([*c["values"], c.get("low"), c.get("high")])]
        y0, y1 = min(values), max(values)
        y0, y1 = y0 - 0.08 * (y1 - y0 or 1), y1 + 0.08 * (y1 - y0 or 1)
        plot_w, plot_h = pw - left - 12, ph - top - bottom

        def y_of(v: float, oy=oy, y0=y0, y1=y1, plot_h=plot_h) -> float:
            return oy + top + (1 - (v - y0) / (y1 - y0)) * plot_h

        draw.text((ox + left, oy + 10), metric, fill=(0, 0, 0), font=font)
        draw.rectangle((ox + left, oy + top, ox + left + plot_w, oy + top + plot_h), outline=(0, 0, 0))
        for i in range(5):
            v = y0 + (y1 - y0) * i / 4
            draw.line((ox + left - 4, y_of(v), ox + left, y_of(v)), fill=(0, 0, 0))
            draw.text((ox + 4, y_of(v) - 6), f"{v:.3g}", fill=(0, 0, 0), font=font)
        step = plot_w / len(cells)
        for i, (variant, cell) in enumerate(cells.items()):
            color = CURVE_COLORS[i % len(CURVE_COLORS)]
            x = ox + left + step * (i + 0.5)
            if finite([cell.get("low"), cell.get("high")]) == [cell.get("low"), cell.get("high")]:
                draw.line((x, y_of(cell["low"]), x, y_of(cell["high"])), fill=color, width=2)
                for end in (cell["low"], cell["high"]):
                    draw.line((x - 5, y_of(end), x + 5, y_of(end)), fill=color, width=2)
            if finite([cell.get("mean")]):
                draw.line((x - 10, y_of(cell["mean"]), x + 10, y_of(cell["mean"])), fill=(0, 0, 0), width=2)
            for j, v in enumerate(finite(cell["values"])):
                dx = (j - (len(cell["values"]) - 1) / 2) * 4
                draw.ellipse((x + 14 + dx - 2, y_of(v) - 2, x + 14 + dx + 2, y_of(v) + 2), fill=color)
            for k, line in enumerate(textwrap.wrap(variant, max(6, int(step / 6)))[:3]):
                draw.text((x - step / 2 + 2, oy + top + plot_h + 6 + 12 * k), line, fill=color, font=font)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out
