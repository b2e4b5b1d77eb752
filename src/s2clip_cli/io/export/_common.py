"""What every export format shares: the images of a run, their paths, label and class-name checks,
class file names, regions."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ...errors import S2ClipError
from ..naming import category_id, check_name

_UNSAFE = re.compile(r"[^\w\-]+")  # \w is Unicode-aware: letters of any script stay
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")  # not in XML 1.0
_NAME_CHARS = 40  # at most 40 characters of the class name (<= 160 UTF-8 bytes) in a file name


CVAT_LABEL_CHARS = 64  # CVAT keeps a label name in a 64-character field (and cuts a longer one)


@dataclass(frozen=True)
class ExportImage:
    """One image of a run: where it came from, its name (`io.naming`: ``trip/street.png``, the key of
    the run-level files), the stem its per-image files are named after (``trip/street``), its size."""

    path: Path
    name: str
    stem: str
    width: int
    height: int


@dataclass(frozen=True)
class ClassTable:
    """The run's classes: names (index = mask value) and whether index 0 is the background."""

    names: tuple[str, ...]
    has_background: bool

    def object_ids(self) -> list[int]:
        """Mask values that are exported as objects (every class but the background)."""
        return list(range(1 if self.has_background else 0, len(self.names)))

    def category_id(self, value: int) -> int:
        """The category id (from 1) of the object class with mask value ``value`` (`io.naming`)."""
        return category_id(value, self.has_background)

    def present(self, labels: np.ndarray) -> list[int]:
        """Object classes with at least one pixel in ``labels``, in label order."""
        if labels.size == 0:
            return []
        counts = np.bincount(labels.ravel(), minlength=len(self.names))
        return [c for c in self.object_ids() if counts[c] > 0]


def categories(classes: ClassTable) -> list[dict[str, object]]:
    """The object classes as COCO categories: ``id`` from 1 (`io.naming.category_id`), ``name``,
    ``supercategory`` and ``mask_value``, the class's value in the mask PNG."""
    return [{"id": classes.category_id(c), "name": classes.names[c], "supercategory": "object", "mask_value": c}
            for c in classes.object_ids()]


def export_path(out_dir: Path, stem: str, ending: str) -> Path:
    """``out_dir/<stem><ending>`` for an image stem checked by `io.naming.check_name` (its folders
    mirrored under ``out_dir``)."""
    *folders, leaf = check_name(stem).split("/")
    return out_dir.joinpath(*folders, f"{leaf}{ending}")


def make_folders(out_dir: Path, folder: Path) -> None:
    """Create ``folder`` (inside ``out_dir``) and its parents, refusing a part that is a link or a
    file: what a run writes stays inside the output folder."""
    current = out_dir
    for part in folder.relative_to(out_dir).parts:
        current = current / part
        if current.is_symlink() or (current.exists() and not current.is_dir()):
            raise S2ClipError(f"cannot write into {current}: it is not a folder")
        current.mkdir(exist_ok=True)


def check_xml_names(classes: ClassTable) -> None:
    """One-line error for a class name holding a character that XML 1.0 cannot carry at all."""
    for name in classes.names:
        if _NOT_XML.search(name):
            raise S2ClipError(f"class name {name!r} holds a control character that XML cannot carry")


def check_xml_text(text: str, what: str) -> str:
    """``text`` if XML 1.0 can carry it, else a one-line error naming ``what``."""
    if _NOT_XML.search(text):
        raise S2ClipError(f"{what} {text!r} holds a control character that XML cannot carry")
    return text


def check_cvat_labels(classes: ClassTable) -> None:
    """CVAT's limits on label names: XML text, at most `CVAT_LABEL_CHARS` characters."""
    check_xml_names(classes)
    for value in classes.object_ids():
        name = classes.names[value]
        if len(name) > CVAT_LABEL_CHARS:
            raise S2ClipError(
                f"class name {name!r} has {len(name)} characters; CVAT label names hold at most "
                f"{CVAT_LABEL_CHARS} (--format cvat): put a shorter name first and keep the long one as a "
                "synonym ('short; long name')")


def check_labels(labels: np.ndarray, num_classes: int, name: str) -> np.ndarray:
    """``labels`` as a C-contiguous 2-D integer array of class indices below ``num_classes`` (its own
    dtype kept, so a photo-sized uint8 map is not copied to 8 bytes a pixel; uint64 becomes int64)."""
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise S2ClipError(f"labels of {name} hold class {bad}, outside the {num_classes} classes of this run")
    if labels.dtype.kind == "u" and labels.dtype.itemsize == 8:  # np.bincount casts to intp safely only
        labels = labels.astype(np.int64)
    return np.ascontiguousarray(labels)


def class_file_names(class_names: list[str] | tuple[str, ...], first: int = 0) -> list[str]:
    """A file-name stem per class, safe and pairwise distinct whatever the names are.

    ``<index>_<name>`` with the index (``first``, ``first`` + 1, …: the `masks` format passes the
    category ids) zero-padded (3 digits at least) and the name NFKC-normalised,
    runs of characters other than letters, digits, ``_`` and ``-`` replaced by ``_``, leading dots
    and separators stripped and cut to 40 characters; an empty result leaves just the index. The
    index makes names distinct (also on case-insensitive file systems) and keeps ``..`` or
    ``a/b`` inside the folder.
    """
    width = max(3, len(str(max(first + len(class_names) - 1, 0))))
    names = []
    for index, name in enumerate(class_names, start=first):
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
