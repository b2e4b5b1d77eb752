"""CVAT for images 1.1 XML: one ``<mask>`` per 8-connected region of each class, in CVAT's mask
RLE (run lengths over the region's bounding box, row by row, starting with a run of 0s).

CVAT matches ``<image name>`` to a task's frames by name: a task made from a zip or a shared folder
with sub-folders names its frames by their path relative to that root, which is the image's name
here (`io.naming`: ``trip/street.png``), unique in the file. Frames are numbered from 0, as CVAT
does, in `io.naming.image_order`. Labels are matched by name; CVAT keeps at most 64 characters of a
label name, so longer class names are refused up front (`_common.check_cvat_labels`)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..files import atomic_path
from ..naming import image_order
from ._common import ClassTable, ExportImage, Region, check_cvat_labels, connected_regions

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


def cvat_document(images: dict[str, tuple[ExportImage, list[dict[str, str]]]], classes: ClassTable) -> ET.Element:
    """The ``<annotations>`` of a run: ``images`` maps each image's name to the image and its masks'
    attributes; ``<image>`` elements in `io.naming.image_order`, ``id`` 0, 1, … (CVAT's frame numbers)."""
    root = ET.Element("annotations")
    ET.SubElement(root, "version").text = "1.1"
    _meta(root, classes, len(images))
    for frame, name in enumerate(image_order(images)):
        image, masks = images[name]
        element = ET.SubElement(root, "image", id=str(frame), name=name, width=str(image.width),
                                height=str(image.height))
        for attributes in masks:
            ET.SubElement(element, "mask", attributes)
    ET.indent(root)
    return root


class CvatWriter:
    """Collects each image's regions; ``finish`` writes ``cvat.xml`` for the whole run."""

    name = "cvat"
    keeps_images = True  # the run-level files hold a part of each image

    def __init__(self, out_dir: Path, classes: ClassTable) -> None:
        check_cvat_labels(classes)
        self.path = out_dir / RUN_FILE
        self.classes = classes
        self._images: dict[str, tuple[ExportImage, list[dict[str, str]]]] = {}

    def image_outputs(self, stem: str) -> dict[str, Path]:
        return {}

    def image_folders(self, stem: str) -> dict[str, Path]:
        return {}

    def write_image(self, image: ExportImage, labels: np.ndarray) -> dict[str, Path]:
        return {}

    def remember(self, image: ExportImage, labels: np.ndarray) -> None:
        masks = [region_mask_attributes(r, self.classes) for r in connected_regions(labels, self.classes)]
        self._images[image.name] = (image, masks)

    def forget(self, name: str) -> None:
        self._images.pop(name, None)

    def payload(self, name: str) -> list[dict[str, str]]:
        """The attributes of the image's ``<mask>`` elements, as ``cvat_document`` takes them."""
        return self._images[name][1]

    def restore(self, image: ExportImage, payload: list[dict[str, str]]) -> None:
        self._images[image.name] = (image, payload)

    def finish(self) -> dict[str, Path]:
        root = cvat_document(self._images, self.classes)
        with atomic_path(self.path) as tmp:
            ET.ElementTree(root).write(tmp, encoding="utf-8", xml_declaration=True)
        return {self.name: self.path}
