"""Polygons with holes (OpenCV contours, simplified by ``approxPolyDP``), one JSON per image
(``<stem>_polygons.json``); each object has its ``category_id`` (from 1, as COCO's) and ``mask_value``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..files import write_json
from ._common import ClassTable, ExportImage, categories, export_path, make_folders

COORDINATES = "pixel indices (x = column, y = row) of boundary pixels, as OpenCV findContours"


@dataclass(frozen=True)
class Polygon:
    """One 8-connected region of one class: its outer boundary and the boundaries of its holes,
    each an ``[N, 2]`` int array of (x, y) boundary-pixel indices."""

    class_id: int
    exterior: np.ndarray
    holes: tuple[np.ndarray, ...]


def _simplify(contour: np.ndarray, tolerance: float) -> np.ndarray:
    points = cv2.approxPolyDP(contour, tolerance, True) if tolerance > 0 else contour
    return points.reshape(-1, 2)


def class_polygons(binary: np.ndarray, class_id: int, tolerance: float) -> list[Polygon]:
    """The polygons of one class's mask: ``findContours`` with ``RETR_CCOMP`` (outer boundaries and
    their holes), each simplified by ``approxPolyDP`` to within ``tolerance`` pixels (0: exact)."""
    contours, hierarchy = cv2.findContours(binary.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    links = hierarchy[0]  # [next, previous, first child, parent]
    polygons = []
    for index, contour in enumerate(contours):
        if links[index][3] != -1:
            continue
        holes, child = [], int(links[index][2])
        while child != -1:
            holes.append(_simplify(contours[child], tolerance))
            child = int(links[child][0])
        polygons.append(Polygon(class_id, _simplify(contour, tolerance), tuple(holes)))
    return polygons


def labels_to_polygons(labels: np.ndarray, classes: ClassTable, tolerance: float) -> list[Polygon]:
    """Polygons of every object class present in ``labels``, by class."""
    polygons: list[Polygon] = []
    for class_id in classes.present(labels):
        polygons.extend(class_polygons(labels == class_id, class_id, tolerance))
    return polygons


def rasterize(polygons: list[Polygon], height: int, width: int) -> np.ndarray:
    """The [H, W] int label map the polygons draw (0 elsewhere): each polygon filled, its holes
    cleared except their boundary pixels (which belong to the region), on its own canvas so a
    region inside another's hole survives. With tolerance 0 this gives the labels back exactly."""
    out = np.zeros((height, width), dtype=np.intp)
    for polygon in polygons:
        canvas = np.zeros((height, width), dtype=np.uint8)
        cv2.fillPoly(canvas, [polygon.exterior.reshape(-1, 1, 2).astype(np.int32)], 1)
        for hole in polygon.holes:
            points = hole.reshape(-1, 1, 2).astype(np.int32)
            cv2.fillPoly(canvas, [points], 0)
            cv2.polylines(canvas, [points], True, 1)
        cv2.polylines(canvas, [polygon.exterior.reshape(-1, 1, 2).astype(np.int32)], True, 1)
        out[canvas.astype(bool)] = polygon.class_id
    return out


def polygons_document(image: ExportImage, polygons: list[Polygon], classes: ClassTable,
                      tolerance: float) -> dict[str, Any]:
    """The per-image JSON document: the image's name and size, the categories (as COCO's, with their
    mask values), and per object its category, mask value, class name, exterior and holes."""
    return {
        "image": image.name,
        "width": image.width,
        "height": image.height,
        "categories": categories(classes),
        "tolerance_px": tolerance,
        "coordinates": COORDINATES,
        "objects": [
            {"category_id": classes.category_id(p.class_id), "mask_value": p.class_id,
             "class_name": classes.names[p.class_id], "exterior": p.exterior.tolist(),
             "holes": [h.tolist() for h in p.holes]}
            for p in polygons
        ],
    }


def read_polygons(document: dict[str, Any]) -> list[Polygon]:
    """The polygons of a document written by this module (for loading it back), each with its mask
    value as ``class_id`` (so `rasterize` draws the mask PNG's values)."""
    return [Polygon(int(o["mask_value"]), np.asarray(o["exterior"], dtype=np.int32).reshape(-1, 2),
                    tuple(np.asarray(h, dtype=np.int32).reshape(-1, 2) for h in o["holes"]))
            for o in document["objects"]]


class PolygonsWriter:
    """``<stem>_polygons.json`` per image."""

    name = "polygons"
    keeps_images = False  # the run-level files hold a part of each image

    def __init__(self, out_dir: Path, classes: ClassTable, tolerance: float) -> None:
        self.out_dir = out_dir
        self.classes = classes
        self.tolerance = tolerance

    def image_outputs(self, stem: str) -> dict[str, Path]:
        return {self.name: export_path(self.out_dir, stem, "_polygons.json")}

    def image_folders(self, stem: str) -> dict[str, Path]:
        return {}

    def write_image(self, image: ExportImage, labels: np.ndarray) -> dict[str, Path]:
        path = self.image_outputs(image.stem)[self.name]
        make_folders(self.out_dir, path.parent)
        polygons = labels_to_polygons(labels, self.classes, self.tolerance)
        write_json(path, polygons_document(image, polygons, self.classes, self.tolerance))
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
        return {}
