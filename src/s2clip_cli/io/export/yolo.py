"""YOLO segmentation labels (Ultralytics): ``yolo/labels/<stem>.txt`` (sub-folders mirrored, as
Ultralytics finds the labels of ``yolo/images/<stem>.<suffix>``), one object per line as
``<class> x1 y1 x2 y2 ...`` (polygon vertices divided by the image width and height), and
``yolo/data.yaml`` with the class names. Class indices are YOLO's own, from 0 (`io.naming.yolo_index`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import atomic_write_text
from ..naming import yolo_index
from ._common import ClassTable, ExportImage, export_path, make_folders
from .polygons import labels_to_polygons

FOLDER = "yolo"


def yolo_class_ids(classes: ClassTable) -> dict[int, int]:
    """Mask value -> YOLO class index: the object classes numbered from 0 (no background class)."""
    return {label: yolo_index(label, classes.has_background) for label in classes.object_ids()}


def yolo_lines(labels: np.ndarray, classes: ClassTable, tolerance: float) -> list[str]:
    """One line per region's outer boundary, its vertices divided by the image's width and height.
    YOLO polygons have no holes, and a region whose outline has fewer than 3 vertices (a pixel, a
    straight one-pixel line) is left out, both as Ultralytics' ``convert_segment_masks_to_yolo_seg``
    does."""
    height, width = labels.shape
    ids = yolo_class_ids(classes)
    lines = []
    for polygon in labels_to_polygons(labels, classes, tolerance):
        if len(polygon.exterior) < 3:
            continue
        points = polygon.exterior.astype(np.float64) / np.array([width, height], dtype=np.float64)
        coords = " ".join(f"{v:.6f}" for v in np.clip(points, 0.0, 1.0).ravel())
        lines.append(f"{ids[polygon.class_id]} {coords}")
    return lines


def yaml_quoted(text: str) -> str:
    """``text`` as a YAML double-quoted scalar: quotes and backslashes escaped, characters that are
    not printable written as ``\\u``/``\\U`` escapes, so any class name reads back unchanged."""
    parts = []
    for char in text:
        if char in '"\\':
            parts.append("\\" + char)
        elif char.isprintable() and char != "\ufeff":
            parts.append(char)
        else:
            code = ord(char)
            parts.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
    return '"' + "".join(parts) + '"'


def data_yaml(classes: ClassTable, folder: Path) -> str:
    """Ultralytics' dataset file: the folder, ``images`` for train/val and the class names (a comment
    says which mask value each index is)."""
    shift = "+ 1 " if classes.has_background else ""
    lines = [f"# s2clip: class i is the value i {shift}in the *_mask.png masks", f"path: {yaml_quoted(str(folder.resolve()))}",
             "train: images", "val: images", "names:"]
    lines += [f"  {index}: {yaml_quoted(classes.names[label])}" for label, index in yolo_class_ids(classes).items()]
    return "\n".join(lines) + "\n"


class YoloWriter:
    """Per image a label file; at the end ``data.yaml``."""

    name = "yolo"
    keeps_images = False  # the run-level files hold a part of each image

    def __init__(self, out_dir: Path, classes: ClassTable, tolerance: float) -> None:
        self.out_dir = out_dir
        self.folder = out_dir / FOLDER
        self.classes = classes
        self.tolerance = tolerance

    def image_outputs(self, stem: str) -> dict[str, Path]:
        return {self.name: export_path(self.folder / "labels", stem, ".txt")}

    def image_folders(self, stem: str) -> dict[str, Path]:
        return {}

    def write_image(self, image: ExportImage, labels: np.ndarray) -> dict[str, Path]:
        path = self.image_outputs(image.stem)[self.name]
        make_folders(self.out_dir, path.parent)
        lines = yolo_lines(labels, self.classes, self.tolerance)
        atomic_write_text(path, "".join(line + "\n" for line in lines))
        return {self.name: path}

    def remember(self, image: ExportImage, labels: np.ndarray) -> None:
        pass

    def forget(self, name: str) -> None:
        pass

    def payload(self, name: str) -> None:
        return None

    def restore(self, image: ExportImage, payload: object) -> None:
        pass

    def finish(self) -> dict[str, Path]:
        make_folders(self.out_dir, self.folder)
        path = atomic_write_text(self.folder / "data.yaml", data_yaml(self.classes, self.folder))
        return {"yolo_data": path}
