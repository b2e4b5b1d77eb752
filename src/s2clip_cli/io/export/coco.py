"""COCO-style instance annotations: one annotation per 8-connected region of each class, masks as
compressed RLE (pycocotools), one JSON per run that ``pycocotools.coco.COCO`` loads. Category ids
start at 1 (`io.naming.category_id`); each category names its ``mask_value``. ``file_name`` is the
image's name (`io.naming`), relative to the input root as an ``image_root`` expects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from ..files import write_json_items
from ..naming import image_ids, image_order
from ._common import ClassTable, ExportImage, Region, categories, connected_regions

__all__ = ["ClassTable", "annotations_from_labels", "categories", "coco_document", "encode_rle"]

RUN_FILE = "coco.json"


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of a 2-D boolean mask: ``{"size": [h, w], "counts": str}`` (JSON-ready)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": rle["counts"].decode("ascii")}


def _region_annotation(region: Region, canvas: np.ndarray, classes: ClassTable) -> dict[str, Any]:
    """The annotation of one region, encoded on the image-sized Fortran ``canvas`` (left zeroed)."""
    window = canvas[region.top : region.top + region.height, region.left : region.left + region.width]
    window[...] = region.mask
    rle = mask_utils.encode(canvas)
    window[...] = 0
    return {
        "category_id": classes.category_id(region.class_id),
        "segmentation": {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")},
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def annotations_from_labels(labels: np.ndarray, class_count: int, has_background: bool, *,
                            image_id: int = 1, first_id: int = 1) -> list[dict[str, Any]]:
    """COCO annotations of a label map: one per 8-connected region of each class present (the
    background, label 0 when ``has_background``, is not an object). Each has ``id`` (from
    ``first_id``), ``image_id``, ``category_id`` (from 1: `categories` maps it to the label value),
    ``segmentation`` (compressed
    RLE of the whole image, counts as str), ``area`` (pixels), ``bbox`` ``[x, y, w, h]`` and
    ``iscrowd`` 0. ``labels``: [H, W] integer class indices below ``class_count``."""
    classes = ClassTable(tuple(str(i) for i in range(class_count)), has_background)
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got {labels.dtype} {labels.shape}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= class_count):
        raise ValueError(f"labels must lie in 0..{class_count - 1}")
    return _annotations(np.ascontiguousarray(labels, dtype=np.intp), classes, image_id, first_id)


def _annotations(labels: np.ndarray, classes: ClassTable, image_id: int, first_id: int) -> list[dict[str, Any]]:
    canvas = np.zeros(labels.shape, dtype=np.uint8, order="F")
    annotations = []
    for number, region in enumerate(connected_regions(labels, classes)):
        annotation = {"id": first_id + number, "image_id": image_id}
        annotation.update(_region_annotation(region, canvas, classes))
        annotations.append(annotation)
    return annotations


def coco_document(entries: dict[str, tuple[ExportImage, list[dict[str, Any]]]], classes: ClassTable
                  ) -> dict[str, Any]:
    """The COCO document of a run's images: ``entries`` maps each image's name to the image and its
    annotations (``id`` and ``image_id`` are set here: images numbered by `io.naming.image_ids`, in
    `io.naming.image_order`, annotations 1, 2, … in that order)."""
    ids = image_ids(entries)
    images, annotations = [], []
    for name in image_order(entries):
        image, regions = entries[name]
        images.append({"id": ids[name], "file_name": name, "width": image.width, "height": image.height})
        for annotation in regions:
            annotations.append(annotation | {"id": len(annotations) + 1, "image_id": ids[name]})
    return {
        "info": {"description": "s2clip segmentation", "version": "1.0"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": categories(classes),
    }


class CocoWriter:
    """Collects each image's annotations; ``finish`` writes ``coco.json`` for the whole run."""

    name = "coco"
    keeps_images = True  # the run-level files hold a part of each image

    def __init__(self, out_dir: Path, classes: ClassTable) -> None:
        self.path = out_dir / RUN_FILE
        self.classes = classes
        self._images: dict[str, tuple[ExportImage, list[dict[str, Any]]]] = {}

    def image_outputs(self, stem: str) -> dict[str, Path]:
        return {}

    def image_folders(self, stem: str) -> dict[str, Path]:
        return {}

    def write_image(self, image: ExportImage, labels: np.ndarray) -> dict[str, Path]:
        return {}

    def remember(self, image: ExportImage, labels: np.ndarray) -> None:
        self._images[image.name] = (image, _annotations(labels, self.classes, 0, 0))

    def forget(self, name: str) -> None:
        self._images.pop(name, None)

    def payload(self, name: str) -> list[dict[str, Any]]:
        """The image's annotations as ``coco_document`` takes them (ids set there)."""
        return self._images[name][1]

    def restore(self, image: ExportImage, payload: list[dict[str, Any]]) -> None:
        self._images[image.name] = (image, payload)

    def finish(self) -> dict[str, Path]:
        write_json_items(self.path, coco_document(self._images, self.classes), depth=2)  # an image, an annotation a line
        return {self.name: self.path}
