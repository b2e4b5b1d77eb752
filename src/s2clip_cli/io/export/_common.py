"""What every export format shares: the images of a run, label checks, class file names, regions."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ...errors import S2ClipError

_UNSAFE = re.compile(r"[^\w\-]+")  # \w is Unicode-aware: letters of any script stay
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")  # not in XML 1.0
_NAME_CHARS = 40  # at most 40 characters of the class name (<= 160 UTF-8 bytes) in a file name


@dataclass(frozen=True)
class ExportImage:
    """One image of a run: where it came from, the stem its outputs are named after, its size."""

    path: Path
    stem: str
    width: int
    height: int


@dataclass(frozen=True)
class ClassTable:
    """The run's classes: names (index = label value) and whether index 0 is the background."""

    names: tuple[str, ...]
    has_background: bool

    def object_ids(self) -> list[int]:
        """Label values that are exported as objects (every class but the background)."""
        return list(range(1 if self.has_background else 0, len(self.names)))

    def present(self, labels: np.ndarray) -> list[int]:
        """Object classes with at least one pixel in ``labels``, in label order."""
        if labels.size == 0:
            return []
        counts = np.bincount(labels.ravel(), minlength=len(self.names))
        return [c for c in self.object_ids() if counts[c] > 0]


def check_stem(stem: str) -> str:
    """``stem`` if it names a single file inside the output folder (no separators, not '.' or '..')."""
    if not stem or stem in (".", "..") or "/" in stem or "\\" in stem or "\0" in stem:
        raise S2ClipError(f"cannot name export files after {stem!r}: not a plain file name")
    return stem


def check_xml_names(classes: ClassTable) -> None:
    """One-line error for a class name holding a character that XML 1.0 cannot carry at all."""
    for name in classes.names:
        if _NOT_XML.search(name):
            raise S2ClipError(f"class name {name!r} holds a control character that XML cannot carry")


def check_labels(labels: np.ndarray, num_classes: int, stem: str) -> np.ndarray:
    """``labels`` as a C-contiguous 2-D integer array of class indices below ``num_classes`` (its own
    dtype kept, so a photo-sized uint8 map is not copied to 8 bytes a pixel; uint64 becomes int64)."""
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise S2ClipError(f"labels of {stem} hold class {bad}, outside the {num_classes} classes of this run")
    if labels.dtype.kind == "u" and labels.dtype.itemsize == 8:  # np.bincount casts to intp safely only
        labels = labels.astype(np.int64)
    return np.ascontiguousarray(labels)


def class_file_names(class_names: list[str] | tuple[str, ...]) -> list[str]:
    """A file-name stem per class, safe and pairwise distinct whatever the names are.

    ``<index>_<name>`` with the index zero-padded (3 digits at least) and the name NFKC-normalised,
    runs of characters other than letters, digits, ``_`` and ``-`` replaced by ``_``, leading dots
    and separators stripped and cut to 40 characters; an empty result leaves just the index. The
    index makes names distinct (also on case-insensitive file systems) and keeps ``..`` or
    ``a/b`` inside the folder.
    """
    width = max(3, len(str(max(len(class_names) - 1, 0))))
    names = []
    for index, name in enumerate(class_names):
        text = _UNSAFE.sub("_", unicodedata.normalize("NFKC", name)).strip("._-")[:_NAME_CHARS].rstrip("._-")
        names.append(f"{index:0{width}d}_{text}" if text else f"{index:0{width}d}")
    return names


@dataclass(frozen=True)
class Region:
    """One 8-connected region of one class: its bounding box and its pixels within that box."""

    class_id: int
    left: int
    top: int
    width: int
    height: int
    mask: np.ndarray  # bool [height, width]


def connected_regions(labels: np.ndarray, classes: ClassTable) -> Iterator[Region]:
    """Every 8-connected region of every object class in ``labels`` (OpenCV connected components),
    by class, then in OpenCV's scan order."""
    for class_id in classes.present(labels):
        binary = (labels == class_id).view(np.uint8)
        count, components, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8, ltype=cv2.CV_32S)
        for k in range(1, count):
            x, y, w, h = (int(v) for v in stats[k, :4])
            yield Region(class_id, x, y, w, h, components[y : y + h, x : x + w] == k)
