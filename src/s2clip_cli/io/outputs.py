"""Result pictures: class palettes, palette mask PNGs, overlays with a legend."""

from __future__ import annotations

import colorsys
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import S2ClipError
from .files import atomic_path

BOUNDARY_COLOUR = (255, 255, 255)
LEGEND_BACKGROUND = (255, 255, 255)
LEGEND_TEXT = (0, 0, 0)

# tab10 followed by its light tab20 companions: distinct, colour-blind-friendlier first colours.
_BASE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)
_GOLDEN = 0.618033988749895


# --------------------------------------------------------------------------- palettes and masks


def _golden_colour(index: int) -> tuple[int, int, int]:
    """The ``index``-th colour of a golden-ratio hue walk with alternating saturation/value."""
    hue = (index * _GOLDEN) % 1.0
    saturation = (0.85, 0.55, 0.95, 0.7)[index % 4]
    value = (0.95, 0.8, 0.65, 0.9)[(index // 4) % 4]
    r, g, b = colorsys.hsv_to_rgb(hue, saturation, value)
    return round(r * 255), round(g * 255), round(b * 255)


def _unique_colour(colour: tuple[int, int, int], used: set[tuple[int, int, int]]) -> tuple[int, int, int]:
    """``colour`` nudged (deterministically) until it differs from every colour in ``used``."""
    r, g, b = colour
    step = 0
    while (r, g, b) in used:
        step += 1
        r, g, b = (r + 7 * step) % 256, (g + 13 * step) % 256, (b + 29 * step) % 256
    return r, g, b


def make_palette(num_classes: int, has_background: bool) -> np.ndarray:
    """A deterministic ``[num_classes, 3]`` uint8 palette of pairwise distinct colours.

    With ``has_background`` class 0 is black. The other classes take tab10, then the light tab20
    colours, then a golden-ratio HSV sequence; black is never given to a non-background class.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    colours: list[tuple[int, int, int]] = []
    used: set[tuple[int, int, int]] = {(0, 0, 0)}
    if has_background and num_classes > 0:
        colours.append((0, 0, 0))
    index = 0
    while len(colours) < num_classes:
        if index < len(_BASE_COLOURS):
            candidate = _BASE_COLOURS[index]
        else:
            candidate = _golden_colour(index - len(_BASE_COLOURS))
        colour = _unique_colour(candidate, used)
        used.add(colour)
        colours.append(colour)
        index += 1
    return np.array(colours, dtype=np.uint8).reshape(num_classes, 3)


def _check_labels(labels: np.ndarray, num_classes: int | None = None) -> None:
    """Raise ``ValueError`` unless ``labels`` is a 2-D integer array of non-negative labels
    (below ``num_classes`` when given)."""
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got {int(labels.min())}")
    if num_classes is not None and labels.size and int(labels.max()) >= num_classes:
        raise ValueError(f"label {int(labels.max())} is out of range for {num_classes} classes")


def save_mask_png(path: str | Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """Save ``labels`` (H x W ints in 0..255) as an indexed ('P' mode) PNG coloured by ``palette``.

    Pixel values are the labels themselves, so ``np.array(Image.open(path))`` gives them back.
    The palette is padded with black to cover every label. Written atomically.
    """
    path = Path(path)
    _check_labels(labels)
    top = int(labels.max()) if labels.size else 0
    if top > 255:
        raise S2ClipError(f"cannot save {path} as a palette PNG: label {top} is above 255 (too many classes)")
    colours = np.zeros((max(len(palette), top + 1), 3), dtype=np.uint8)
    colours[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
    h, w = labels.shape
    image = Image.frombytes("P", (w, h), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
    image.putpalette(colours[:256].ravel().tolist())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


# --------------------------------------------------------------------------- overlays


def class_shares(labels: np.ndarray, num_classes: int) -> list[float]:
    """Fraction of pixels of each class ``0..num_classes-1`` (all zeros for an empty map)."""
    _check_labels(labels, num_classes)
    if labels.size == 0:
        return [0.0] * num_classes
    counts = np.bincount(labels.ravel().astype(np.intp), minlength=num_classes)[:num_classes]
    return [float(c) / labels.size for c in counts]


def blend_labels(image: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` blended with the colour of each pixel's class (weight ``alpha``), with thin
    boundary lines (white) between classes; H x W x 3 uint8."""
    colours = np.asarray(palette, dtype=np.float32)[labels]
    blended = image.astype(np.float32) * (1.0 - alpha) + colours * alpha
    out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    edges = np.zeros(labels.shape, dtype=np.uint8)
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edges[1:, :] |= labels[1:, :] != labels[:-1, :]
    thickness = max(1, round(min(labels.shape) / 400))
    if thickness > 1:
        edges = cv2.dilate(edges, np.ones((thickness, thickness), np.uint8))
    out[edges.astype(bool)] = BOUNDARY_COLOUR
    return out


def _format_share(share: float) -> str:
    """A pixel share as a percentage; tiny non-zero shares read ``<0.1%``."""
    percent = 100.0 * share
    return "<0.1%" if 0 < percent < 0.05 else f"{percent:.1f}%"


def _legend_font(h: int, w: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at a size that grows with the image (12..40 px)."""
    size = int(np.clip(round(max(h, w) / 45), 12, 40))
    return ImageFont.load_default(size=size)


def _legend_entries(labels: np.ndarray, class_names: list[str], palette: np.ndarray
                    ) -> list[tuple[str, tuple[int, int, int]]]:
    """``(text, colour)`` of every class present, largest share first."""
    shares = class_shares(labels, len(class_names))
    order = sorted((i for i, s in enumerate(shares) if s > 0), key=lambda i: (-shares[i], i))
    return [(f"{class_names[i]}  {_format_share(shares[i])}", tuple(int(c) for c in palette[i]))
            for i in order]


def _draw_legend(entries: list[tuple[str, tuple[int, int, int]]], font: Any, columns: int,
                 size: tuple[int, int], cell: tuple[int, int], pad: int) -> Image.Image:
    """A white legend panel of ``size`` with entries laid out column-major in ``columns``."""
    panel = Image.new("RGB", size, LEGEND_BACKGROUND)
    draw = ImageDraw.Draw(panel)
    swatch = int(font.size) if hasattr(font, "size") else 12
    rows = math.ceil(len(entries) / columns)
    for k, (text, colour) in enumerate(entries):
        x = pad + (k // rows) * cell[0]
        y = pad + (k % rows) * cell[1]
        draw.rectangle([x, y, x + swatch, y + swatch], fill=colour, outline=LEGEND_TEXT)
        if isinstance(font, ImageFont.FreeTypeFont):
            draw.text((x + swatch + pad, y + swatch // 2), text, fill=LEGEND_TEXT, font=font, anchor="lm")
        else:  # bitmap fallback font (Pillow without FreeType): no anchors
            draw.text((x + swatch + pad, y), text, fill=LEGEND_TEXT, font=font)
    return panel


def render_overlay(image: np.ndarray, labels: np.ndarray, class_names: list[str], palette: np.ndarray,
                   alpha: float = 0.5) -> Image.Image:
    """The overlay picture: blended image plus a legend of the classes present.

    The legend sits on the right when its rows fit beside the image (or the image is at least as
    tall as wide); otherwise (wide, short images) it goes below, in as many columns as fit. The
    canvas grows where the legend needs more room than the image offers.
    """
    if image.shape[:2] != labels.shape or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image {image.shape} and labels {labels.shape} do not match")
    _check_labels(labels, len(class_names))
    h, w = labels.shape
    picture = Image.fromarray(blend_labels(image, labels, palette, alpha))
    entries = _legend_entries(labels, class_names, palette)
    font = _legend_font(h, w)
    size = int(font.size) if hasattr(font, "size") else 12
    pad = max(4, size // 2)
    text_w = max(int(font.getlength(text)) for text, _ in entries)
    cell = (size + pad + text_w + 2 * pad, size + pad)
    column_h = len(entries) * cell[1] + 2 * pad
    if column_h <= h or h >= w:
        panel = _draw_legend(entries, font, 1, (cell[0] + pad, max(h, column_h)), cell, pad)
        canvas = Image.new("RGB", (w + panel.width, panel.height), LEGEND_BACKGROUND)
        canvas.paste(panel, (w, 0))
    else:
        columns = max(1, min(len(entries), (w - 2 * pad) // cell[0]))
        rows = math.ceil(len(entries) / columns)
        panel = _draw_legend(entries, font, columns, (max(w, columns * cell[0] + 2 * pad),
                                                      rows * cell[1] + 2 * pad), cell, pad)
        canvas = Image.new("RGB", (panel.width, h + panel.height), LEGEND_BACKGROUND)
        canvas.paste(panel, (0, h))
    canvas.paste(picture, (0, 0))
    return canvas


def save_overlay(path: str | Path, image: np.ndarray, labels: np.ndarray, class_names: list[str],
                 palette: np.ndarray, alpha: float = 0.5) -> None:
    """Write :func:`render_overlay`'s picture as a PNG, atomically."""
    canvas = render_overlay(image, labels, class_names, palette, alpha)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
