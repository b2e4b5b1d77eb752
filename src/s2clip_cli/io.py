"""Image input and result output: decoding, collecting, resizing, palettes, masks, overlays, JSON.

Everything that touches the user's files lives here so that every failure becomes one
``S2ClipError`` line naming the file, and every output is written atomically (a temporary file in
the same directory, renamed into place only once it is complete).
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError

from .errors import S2ClipError

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
"""Suffixes (lower-case) that a directory given as input is expanded to."""

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


# --------------------------------------------------------------------------- reading images


def _one_line(text: object) -> str:
    """``str(text)`` with line breaks collapsed, for one-line error messages."""
    return " ".join(str(text).split())


def _check_readable_file(path: Path) -> None:
    """Raise ``S2ClipError`` unless ``path`` is an existing, non-empty regular file."""
    if not path.exists():
        raise S2ClipError(f"cannot read image {path}: no such file")
    if path.is_dir():
        raise S2ClipError(f"cannot read image {path}: it is a directory")
    if path.stat().st_size == 0:
        raise S2ClipError(f"cannot read image {path}: the file is empty (0 bytes)")


def _scale_16bit(array: np.ndarray) -> np.ndarray:
    """16-bit integer samples (0..65535, clipped) to 8 bits by keeping the high byte."""
    return (np.clip(array.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def _scale_float(array: np.ndarray) -> np.ndarray:
    """Float samples to 8 bits: ``[0, 1]`` data is scaled by 255, ``[0, 255]`` data is taken as
    is, anything wider is min-max normalised; NaN becomes 0."""
    array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(array.min(initial=0.0)), float(array.max(initial=0.0))
    if lo >= 0.0 and hi <= 1.0:
        array = array * 255.0
    elif lo < 0.0 or hi > 255.0:
        array = (array - lo) * (255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def _composite_on_white(image: Image.Image) -> Image.Image:
    """Flatten an image with transparency onto a white background (RGB result)."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _has_transparency(image: Image.Image) -> bool:
    """True for modes with an alpha channel and palette/grey images with a transparent colour."""
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_rgb_array(image: Image.Image) -> np.ndarray:
    """Any decoded PIL image to an H x W x 3 uint8 RGB array (see :func:`read_image`)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        grey = _scale_16bit(np.asarray(image))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if image.mode == "F":
        grey = _scale_float(np.asarray(image))
        return np.repeat(grey[:, :, None], 3, axis=2)
    if _has_transparency(image):
        image = _composite_on_white(image)
    elif image.mode != "RGB":
        image = image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
    return np.array(image, dtype=np.uint8)


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to an ``H x W x 3`` uint8 RGB array.

    Reads whatever Pillow decodes (JPEG, PNG, WebP, BMP, TIFF, ...; the first frame of a
    multi-frame file) and applies the EXIF orientation. Greyscale, palette, CMYK and YCbCr
    images are converted to RGB; images with transparency (RGBA, LA, palette or grey with a
    transparent colour) are composited on **white**, so transparent areas look as in a viewer on
    a white page. 16-bit images (``I;16`` PNG/TIFF, 32-bit ``I``) keep their high byte
    (``v >> 8``); float TIFFs in ``[0, 1]`` are scaled by 255 (see ``_scale_float``).

    Raises ``S2ClipError`` (one line naming the file) for a missing file, a directory, an empty
    file and anything Pillow cannot decode completely, truncated files included.
    """
    path = Path(path)
    _check_readable_file(path)
    try:
        with Image.open(path) as image:
            image.load()  # decode now: truncated data raises here, not later
            image = ImageOps.exif_transpose(image)
            return _to_rgb_array(image)
    except UnidentifiedImageError:
        raise S2ClipError(f"cannot read image {path}: not a supported image (unknown format)") from None
    except PermissionError as exc:
        raise S2ClipError(f"cannot read image {path}: permission denied") from exc
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        reason = _one_line(exc) or type(exc).__name__
        raise S2ClipError(f"cannot read image {path}: not a supported image ({reason})") from exc


# --------------------------------------------------------------------------- collecting inputs


def _images_in_directory(directory: Path) -> list[Path]:
    """Image files directly inside ``directory`` (sorted by name; hidden files skipped)."""
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        raise S2ClipError(f"cannot list directory {directory}: {_one_line(exc.strerror or exc)}") from exc
    found = [
        p for p in entries
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    ]
    if not found:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise S2ClipError(f"directory {directory} contains no images ({suffixes})")
    return sorted(found, key=lambda p: p.name)


def collect_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand the user's inputs into the list of image files to process.

    Files are kept as given whatever their suffix (:func:`read_image` reports one it cannot
    decode); directories are expanded, non-recursively, to their files with an image suffix
    (:data:`IMAGE_SUFFIXES`, case-insensitive), sorted by name, hidden files skipped. A file named
    twice (also via a directory) is kept once, at its first position.

    Raises ``S2ClipError`` for no inputs, a path that does not exist, or a directory without
    images.
    """
    if not inputs:
        raise S2ClipError("no input images given")
    result: list[Path] = []
    seen: set[Path] = set()
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            candidates = _images_in_directory(path)
        elif path.exists():
            candidates = [path]
        else:
            raise S2ClipError(f"input {path} does not exist")
        for candidate in candidates:
            key = candidate.resolve()
            if key not in seen:
                seen.add(key)
                result.append(candidate)
    return result


# --------------------------------------------------------------------------- resizing


def rescale_size(h: int, w: int, short_side: int, max_long: int = 2048) -> tuple[int, int]:
    """``(new_h, new_w)`` of mmseg's ``Resize(scale=(max_long, short_side), keep_ratio=True)``.

    As ``mmcv.rescale_size``: ``f = min(long_edge / max(h, w), short_edge / min(h, w))`` where the
    edges are the larger and smaller of the two scale values, and each side becomes
    ``int(side * f + 0.5)`` (clamped to at least 1).
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    if short_side <= 0 or max_long <= 0:
        raise ValueError(f"resize scale must be positive, got short {short_side}, long {max_long}")
    long_edge, short_edge = max(max_long, short_side), min(max_long, short_side)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def resize_short_side(image: np.ndarray, short_side: int, max_long: int = 2048) -> np.ndarray:
    """Resize as mmseg's test pipeline: short side to ``short_side`` unless that would push the
    long side past ``max_long`` (see :func:`rescale_size`), bilinear (``cv2.INTER_LINEAR``).

    Returns the input array itself when the size does not change.
    """
    if image.ndim not in (2, 3) or 0 in image.shape[:2]:
        raise ValueError(f"expected a non-empty H x W (x C) image, got shape {image.shape}")
    h, w = image.shape[:2]
    new_h, new_w = rescale_size(h, w, short_side, max_long)
    if (new_h, new_w) == (h, w):
        return image
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


# --------------------------------------------------------------------------- atomic writing


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    The temporary name keeps the suffix (so writers that pick the format from it work) and is
    hidden (``.name.tmp-XXXX.suffix``). If the body raises, the temporary file is removed and
    ``path`` is left untouched; an ``OSError`` (disk full, permission denied, missing
    directory...) is reported as ``S2ClipError`` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise S2ClipError(f"cannot write {path}: {_one_line(exc.strerror or exc)}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _jsonable(obj: Any) -> Any:
    """Plain-JSON copy of ``obj``: NaN/inf become ``None``, numpy values and paths are converted."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically; NaN and infinities are written as ``null``."""
    text = json.dumps(_jsonable(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def prepare_output_dir(path: str | Path) -> Path:
    """Create the output directory (and its parents) if needed and return it."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise S2ClipError(f"output path {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise S2ClipError(f"cannot create output directory {path}: {_one_line(exc.strerror or exc)}") from exc
    return path


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
