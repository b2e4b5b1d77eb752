"""Result pictures and how they are written: class palettes, mask PNGs (palette or 16-bit), overlays
with a legend, and an image's output files written as one set (`OutputSet`)."""

from __future__ import annotations

import colorsys
import math
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import S2ClipError, one_line
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


PALETTE_CLASSES = 256
"""Up to this many classes a mask is an indexed (palette) PNG; above it a 16-bit greyscale PNG."""
MAX_MASK_CLASSES = 65536
"""The most classes a mask PNG can hold (16-bit labels)."""


def mask_png_kind(num_classes: int) -> str:
    """``"palette"`` (8-bit indexed PNG, coloured) for up to 256 classes, ``"16-bit"`` (greyscale
    PNG whose pixel values are the labels) above; `S2ClipError` above 65536 classes. Decided from
    the number of classes, so every mask of a run has the same kind."""
    if num_classes > MAX_MASK_CLASSES:
        raise S2ClipError(f"{num_classes} classes: a mask PNG holds at most {MAX_MASK_CLASSES} (16-bit labels)")
    return "palette" if num_classes <= PALETTE_CLASSES else "16-bit"


def save_mask_png(path: str | Path, labels: np.ndarray, palette: np.ndarray) -> None:
    """Save ``labels`` (H x W ints) as a PNG whose pixel values are the labels themselves, so
    ``np.array(Image.open(path))`` gives them back.

    Up to 256 classes (``len(palette)``; see :func:`mask_png_kind`) and labels up to 255 it is an
    indexed ('P' mode) PNG coloured by ``palette`` (padded with black to cover every label); with
    more classes, or a label above 255, a 16-bit greyscale PNG (mode ``I;16``, no colours: the
    overlay shows them). Labels above 65535 are an `S2ClipError`. Written atomically.
    """
    path = Path(path)
    _check_labels(labels)
    top = int(labels.max()) if labels.size else 0
    if top >= MAX_MASK_CLASSES:
        raise S2ClipError(f"cannot save {path}: label {top} is above {MAX_MASK_CLASSES - 1} (too many classes)")
    h, w = labels.shape
    if mask_png_kind(max(len(palette), top + 1)) == "16-bit":
        image = Image.fromarray(np.ascontiguousarray(labels, dtype=np.uint16))
    else:
        colours = np.zeros((PALETTE_CLASSES, 3), dtype=np.uint8)
        colours[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        image = Image.frombytes("P", (w, h), np.ascontiguousarray(labels, dtype=np.uint8).tobytes())
        image.putpalette(colours[: max(len(palette), top + 1)].ravel().tolist())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def read_mask_png(path: str | Path, num_classes: int) -> np.ndarray:
    """Labels ``[H, W]`` int64 of a mask written by :func:`save_mask_png` (palette, greyscale or
    16-bit PNG); `S2ClipError` naming the file for anything else, or a label not below
    ``num_classes``."""
    path = Path(path)
    if not path.is_file():
        raise S2ClipError(f"cannot read mask {path}: not a regular file")
    try:
        with Image.open(path) as image:
            if image.format != "PNG" or image.mode not in ("P", "L", "I;16", "I"):
                raise S2ClipError(f"cannot read mask {path}: not a label PNG ({image.format} {image.mode})")
            labels = np.array(image).astype(np.int64)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise S2ClipError(f"cannot read mask {path}: {one_line(exc)}") from exc
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise S2ClipError(f"mask {path} holds label {int(labels.max())}, not one of the {num_classes} classes")
    return labels


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


# --------------------------------------------------------------------------- output sets


def _remove(path: Path) -> None:
    """Remove a file or a folder tree (nothing when absent)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class OutputSet:
    """One input's output files, written as a set: all of them or none.

    Each target (a file, or a folder such as a video's frame masks) is written under a hidden
    temporary name from :meth:`tmp`; when the body ends without error they are renamed into place
    in the order given, the ``marker`` (the JSON record) last — so a marker on disk means the set
    is complete. Files written in place by someone else (an exporter's atomic writes) are handed
    over with :meth:`adopt`. If anything fails, every temporary file, every adopted file, every
    target already renamed and every folder the set created is removed; with ``replace`` (``--overwrite``) the earlier marker is removed
    on entry and the targets' earlier files on failure, so no mixed or partial set remains. Failures
    to write are `S2ClipError`.
    """

    def __init__(self, targets: list[Path], marker: Path, *, replace: bool = False) -> None:
        self.targets = [Path(t) for t in targets if Path(t) != Path(marker)] + [Path(marker)]
        self.marker = Path(marker)
        self.replace = replace
        self._staged: dict[Path, Path] = {}
        self._adopted: list[Path] = []
        self._created: list[Path] = []

    def tmp(self, target: Path) -> Path:
        """The temporary path to write ``target`` to (same folder and suffix, hidden)."""
        target = Path(target)
        if target not in self.targets:
            raise ValueError(f"{target} is not one of this set's targets")
        if target not in self._staged:
            self._staged[target] = target.with_name(
                f".{target.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{target.suffix}")
        return self._staged[target]

    def adopt(self, paths: Any) -> None:
        """Files already written in place that belong to this set (removed if the set fails)."""
        self._adopted.extend(Path(p) for p in paths)

    def __enter__(self) -> OutputSet:
        for folder in sorted({t.parent for t in self.targets}):
            missing = [f for f in (folder, *folder.parents) if not f.exists()]
            if missing:
                self._created.append(missing[-1])  # the topmost new folder: removed if the set fails
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise S2ClipError(f"cannot create output directory {folder}: {one_line(exc.strerror or exc)}") from exc
        if self.replace:
            _remove(self.marker)  # the earlier set stops counting as complete before any of it is replaced
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self._discard([])
            if isinstance(exc, S2ClipError):  # name the files the user knows, not their temporary names
                message = str(exc)
                for target, tmp in self._staged.items():
                    message = message.replace(str(tmp), str(target))
                if message != str(exc):
                    raise S2ClipError(message) from exc
            return
        committed: list[Path] = []
        try:
            for target in self.targets:
                if target in self._staged:
                    if target.is_dir() and not target.is_symlink():
                        shutil.rmtree(target)  # only with replace: the caller checked the set before
                    os.replace(self._staged[target], target)
                    committed.append(target)
        except OSError as failure:
            self._discard(committed)
            raise S2ClipError(f"cannot write {target}: {one_line(failure.strerror or failure)}") from failure

    def _discard(self, committed: list[Path]) -> None:
        for path in [*self._staged.values(), *self._adopted, *committed, *self._created]:
            _remove(path)
        if self.replace:
            for target in self.targets:
                _remove(target)
