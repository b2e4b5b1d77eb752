"""Reading the user's images: decoding any common format to RGB uint8, and expanding inputs.

Every failure becomes one ``S2ClipError`` line naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import S2ClipError, one_line

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
"""Suffixes (lower-case) that a directory given as input is expanded to."""


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
        reason = one_line(exc) or type(exc).__name__
        raise S2ClipError(f"cannot read image {path}: not a supported image ({reason})") from exc


# --------------------------------------------------------------------------- collecting inputs


def _images_in_directory(directory: Path) -> list[Path]:
    """Image files directly inside ``directory`` (sorted by name; hidden files skipped)."""
    try:
        entries = list(directory.iterdir())
    except OSError as exc:
        raise S2ClipError(f"cannot list directory {directory}: {one_line(exc.strerror or exc)}") from exc
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
