"""Tiny synthetic datasets in each preset's exact on-disk layout, for tests and benchmarks.

Label maps are blocky (cells of a few classes) with on-disk values as the real benchmark stores
them: 0 .. num_classes (reduce-zero-label presets, 0 = "other"/background) or
0 .. num_classes - 1, plus a line of 255 (ignore / VOC border) pixels. Image ``i``'s pixel colour
is a fixed colour per on-disk label value plus a little noise, so a predictor that knows the
colours can recover the labels. VOC labels are palette PNGs, like the real ``SegmentationClass``.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ..errors import S2ClipError
from .datasets import label_colours
from .presets import Layout, get_preset

_CITIES = ("frankfurt", "lindau", "munster")
_GENERIC_CLASSES = ("sky; heaven", "tree", "road; street", "car", "person; pedestrian", "building", "grass",
                    "water", "dog", "cat")


def _ids(preset_name: str, n: int) -> list[str]:
    if preset_name in ("voc21", "voc20", "context60", "context59"):
        return [f"2008_{i:06d}" for i in range(n)]
    if preset_name in ("coco_object", "coco_stuff164k"):
        return [f"{i + 1:012d}" for i in range(n)]
    if preset_name == "cityscapes":
        return [f"{_CITIES[i % len(_CITIES)]}/{_CITIES[i % len(_CITIES)]}_000000_{i:06d}" for i in range(n)]
    return [f"ADE_val_{i + 1:08d}" for i in range(n)]


def synthetic_pair(rng: np.random.Generator, size: tuple[int, int], max_value: int,
                   cell: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """A blocky label map with values in ``0..max_value`` plus a 255 line, and its image.

    Each image uses a handful of classes (always including 0) so regions are larger than a cell.
    """
    h, w = size
    gh, gw = -(-h // cell), -(-w // cell)
    k = min(max_value + 1, 5)
    classes = np.concatenate([[0], rng.choice(np.arange(1, max_value + 1), size=k - 1, replace=False)])
    grid = rng.choice(classes, size=(gh, gw))
    label = np.kron(grid, np.ones((cell, cell), dtype=np.int64))[:h, :w].astype(np.uint8)
    label[h // 2, :] = 255  # ignore pixels (VOC draws 255 on object borders)
    colours = label_colours(256).astype(np.int16)
    noise = rng.integers(-8, 9, size=(h, w, 3))
    image = np.clip(colours[label] + noise, 0, 255).astype(np.uint8)
    return image, label


def _save_image(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        Image.fromarray(image).save(path, quality=95)
    else:
        Image.fromarray(image).save(path)


def _as_palette(label: np.ndarray) -> Image.Image:
    img = Image.fromarray(label).convert("P")
    img.putpalette(label_colours(256).reshape(-1).tolist())
    return img


def write_synthetic_dataset(preset_name: str, root: Path, n_images: int = 4, size: tuple[int, int] = (64, 96),
                            seed: int = 0) -> Path:
    """Write ``n_images`` samples of ``preset_name`` in its exact layout under ``root``; return ``root``.

    ``size`` is (height, width) of every image and label.
    """
    preset = get_preset(preset_name)
    layout = preset.layout
    max_value = preset.num_classes if preset.reduce_zero_label else preset.num_classes - 1
    root = Path(root)
    _write_layout(layout, root, _ids(preset_name, n_images), size, seed, max_value,
                  palette=layout.ann_dir == "SegmentationClass")
    return root


def _write_layout(layout: Layout, root: Path, ids: list[str], size: tuple[int, int], seed: int, max_value: int,
                  palette: bool) -> None:
    (root / layout.img_dir).mkdir(parents=True, exist_ok=True)
    (root / layout.ann_dir).mkdir(parents=True, exist_ok=True)
    for i, sample_id in enumerate(ids):
        image, label = synthetic_pair(np.random.default_rng([seed, i]), size, max_value)
        _save_image(image, root / layout.img_dir / f"{sample_id}{layout.img_suffix}")
        path = root / layout.ann_dir / f"{sample_id}{layout.seg_suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        (_as_palette(label) if palette else Image.fromarray(label)).save(path)
    if layout.split_file:
        split = root / layout.split_file
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("".join(f"{i}\n" for i in ids), encoding="utf-8")


class GenericPaths(NamedTuple):
    """What :func:`write_synthetic_generic` wrote: ``--images``, ``--masks`` and ``--class-names``."""

    images: Path
    masks: Path
    class_names: Path


def write_synthetic_generic(root: Path, n_images: int = 4, size: tuple[int, int] = (64, 96), seed: int = 0,
                            num_classes: int = 5) -> GenericPaths:
    """Write a generic dataset under ``root``: ``images/`` (alternating .jpg/.png), ``masks/<stem>.png``
    (values ``0..num_classes-1`` and 255) and ``classes.txt`` (``num_classes`` lines, some with synonyms)."""
    if not 2 <= num_classes <= len(_GENERIC_CLASSES):
        raise S2ClipError(f"num_classes must be in 2..{len(_GENERIC_CLASSES)}, got {num_classes}")
    root = Path(root)
    paths = GenericPaths(root / "images", root / "masks", root / "classes.txt")
    paths.images.mkdir(parents=True, exist_ok=True)
    paths.masks.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        image, label = synthetic_pair(np.random.default_rng([seed, i]), size, num_classes - 1)
        _save_image(image, paths.images / f"img_{i:03d}{'.png' if i % 2 else '.jpg'}")
        Image.fromarray(label).save(paths.masks / f"img_{i:03d}.png")
    paths.class_names.write_text("".join(f"{c}\n" for c in _GENERIC_CLASSES[:num_classes]), encoding="utf-8")
    return paths
