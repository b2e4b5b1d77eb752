"""CVAT for images 1.1 XML: one ``<mask>`` per 8-connected region of each class, in CVAT's mask
RLE (run lengths over the region's bounding box, row by row, starting with a run of 0s)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..files import atomic_path
from ._common import ClassTable, ExportImage, Region, check_xml_names, connected_regions

RUN_FILE = "cvat.xml"

def cvat_rle(mask: np.ndarray) -> list[int]:
    """CVAT's mask RLE of a 2-D boolean mask: alternating run lengths of 0s and 1s over the mask read
    row by row, the first run being of 0s (0 when the first pixel is set)."""
    flat = np.ascontiguousarray(mask, dtype=bool).ravel()
    if flat.size == 0:
        return []
    starts = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs = np.diff(np.concatenate(([0], starts, [flat.size])))
    return ([0] if flat[0] else []) + [int(v) for v in runs]


def region_mask_attributes(region: Region, classes: ClassTable) -> dict[str, str]:
    """The attributes of a region's ``<mask>`` element (CVAT's order)."""
    return {
        "label": classes.names[region.class_id], "source": "auto", "occluded": "0",
        "rle": ", ".join(str(v) for v in cvat_rle(region.mask)),
        "left": str(region.left), "top": str(region.top),
        "width": str(region.width), "height": str(region.height), "z_order": "0",
    }


def _meta(root: ET.Element, classes: ClassTable, size: int) -> None:
    meta = ET.SubElement(root, "meta")
    task = ET.SubElement(meta, "task")
    for tag, text in (("id", "0"), ("name", "s2clip"), ("size", str(size)), ("mode", "annotation"),
                      ("overlap", "0"), ("bugtracker", ""), ("flipped", "False")):
        ET.SubElement(task, tag).text = text
    labels = ET.SubElement(task, "labels")
    for class_id in classes.object_ids():
        label = ET.SubElement(labels, "label")
        ET.SubElement(label, "name").text = classes.names[class_id]
        ET.SubElement(label, "type").text = "mask"
        ET.SubElement(label, "attributes")
    ET.SubElement(meta, "dumped").text = datetime.now(UTC).isoformat(sep=" ", timespec="seconds")


class CvatWriter:
    """Collects each image's regions; ``finish`` writes ``cvat.xml`` for the whole run."""

    name = "cvat"

    def __init__(self, out_dir: Path, classes: ClassTable) -> None:
        check_xml_names(classes)
        self.path = out_dir / RUN_FILE
        self.classes = classes
        self._images: dict[str, tuple[ExportImage, list[dict[str, str]]]] = {}

    def image_outputs(self, stem: str) -> dict[str, Path]:
        return {}

    def write_image(self, image: ExportImage, labels: np.ndarray) -> dict[str, Path]:
        return {}

    def remember(self, image: ExportImage, labels: np.ndarray) -> None:
        masks = [region_mask_attributes(r, self.classes) for r in connected_regions(labels, self.classes)]
        self._images[image.stem] = (image, masks)

    def finish(self) -> dict[str, Path]:
        root = ET.Element("annotations")
        ET.SubElement(root, "version").text = "1.1"
        _meta(root, self.classes, len(self._images))
        for image_id, (image, masks) in enumerate(self._images.values()):
            element = ET.SubElement(root, "image", id=str(image_id), name=image.path.name,
                                    width=str(image.width), height=str(image.height))
            for attributes in masks:
                ET.SubElement(element, "mask", attributes)
        ET.indent(root)
        with atomic_path(self.path) as tmp:
            ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
        return {self.name: self.path}
