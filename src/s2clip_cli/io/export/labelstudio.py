"""Label Studio tasks with predictions: one brush mask per class present, encoded with Label Studio's
own brush RLE (``label_studio_converter.brush.mask2rle``), and the labeling config that names the
classes. Import ``labelstudio.json`` into a project set up with ``labelstudio_config.xml``. Each
task's ``data.image`` is the image's name (`io.naming`: ``trip/street.png``), to be prefixed with the
URL Label Studio serves the input folder from; tasks come in `io.naming.image_order`."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import S2ClipError
from ..files import JsonText, atomic_write_text, json_text, write_json_items
from ..naming import image_order
from ._common import ClassTable, ExportImage, check_xml_names

TASKS_FILE = "labelstudio.json"
CONFIG_FILE = "labelstudio_config.xml"
FROM_NAME = "label"
TO_NAME = "image"
MODEL_VERSION = "s2clip"

EncodedResult = tuple[str, str]
"""A brush result encoded once, when its image is done: (its own id, its other fields as JSON text)."""


def brush_encoder() -> Callable[[np.ndarray], list[int]]:
    """``label_studio_converter.brush.mask2rle`` (a uint8 0/255 mask -> Label Studio RLE)."""
    try:
        from label_studio_converter.brush import mask2rle
    except ImportError as exc:
        raise S2ClipError("the labelstudio format needs the label-studio-converter package: "
                          "pip install 's2clip[labelstudio]'") from exc
    return mask2rle


def brush_results(labels: np.ndarray, classes: ClassTable, encode: Callable[[np.ndarray], list[int]],
                  prefix: str = "") -> list[dict[str, Any]]:
    """One ``brushlabels`` result per class present in ``labels``, its ``id`` ``<prefix>c<category id>``."""
    height, width = labels.shape
    results = []
    for class_id in classes.present(labels):
        mask = np.where(labels == class_id, np.uint8(255), np.uint8(0))
        results.append({
            "id": f"{prefix}c{classes.category_id(class_id)}",
            "from_name": FROM_NAME, "to_name": TO_NAME, "type": "brushlabels",
            "original_width": width, "original_height": height, "image_rotation": 0,
            "value": {"format": "rle", "rle": [int(v) for v in encode(mask)],
                      "brushlabels": [classes.names[class_id]]},
        })
    return results


def labeling_config(classes: ClassTable) -> str:
    """The ``<View>`` config with an image and a ``BrushLabels`` control listing the object classes."""
    view = ET.Element("View")
    ET.SubElement(view, "Image", name=TO_NAME, value=f"${TO_NAME}", zoom="true")
    brush = ET.SubElement(view, "BrushLabels", name=FROM_NAME, toName=TO_NAME)
    for class_id in classes.object_ids():
        ET.SubElement(brush, "Label", value=classes.names[class_id])
    ET.indent(view)
    return ET.tostring(view, encoding="unicode") + "\n"


def encode_results(results: list[dict[str, Any]]) -> list[EncodedResult]:
    """Brush results (`brush_results`) as the run's tasks file will hold them, encoded once: a mask's
    run lengths are thousands of numbers, and a run of 10 000 images writes (and merges, across
    ranks) them far faster, and holds them in half the memory, as text."""
    return [(result["id"], json_text({k: v for k, v in result.items() if k != "id"})[1:-1]) for result in results]


def tasks_document(tasks: dict[str, list[EncodedResult]]) -> list[JsonText]:
    """The tasks of a run, each one line of JSON: ``tasks`` maps each image's name to its encoded
    brush results (`encode_results`); tasks come in `io.naming.image_order`, result ids prefixed
    ``i<position>`` so they are unique in the file. Each line is ``{"data": {"image": <name>},
    "predictions": [{"model_version": "s2clip", "result": [{"id": …, …}]}]}``."""
    document = []
    for position, name in enumerate(image_order(tasks)):
        results = ", ".join(f'{{"id": {json_text(f"i{position}{own_id}")}, {fields}}}' for own_id, fields in tasks[name])
        document.append(JsonText(f'{{"data": {{{json_text(TO_NAME)}: {json_text(name)}}}, "predictions": '
                                 f'[{{"model_version": {json_text(MODEL_VERSION)}, "result": [{results}]}}]}}'))
    return document


class LabelStudioWriter:
    """Collects each image's brush results; ``finish`` writes the tasks and the config."""

    name = "labelstudio"
    keeps_images = True  # the run-level files hold a part of each image

    def __init__(self, out_dir: Path, classes: ClassTable) -> None:
        check_xml_names(classes)
        self.out_dir = out_dir
        self.classes = classes
        self.encode = brush_encoder()
        self._tasks: dict[str, list[EncodedResult]] = {}

    def image_outputs(self, stem: str) -> dict[str, Path]:
        return {}

    def image_folders(self, stem: str) -> dict[str, Path]:
        return {}

    def write_image(self, image: ExportImage, labels: np.ndarray) -> dict[str, Path]:
        return {}

    def remember(self, image: ExportImage, labels: np.ndarray) -> None:
        self._tasks[image.name] = encode_results(brush_results(labels, self.classes, self.encode))

    def forget(self, name: str) -> None:
        self._tasks.pop(name, None)

    def payload(self, name: str) -> list[EncodedResult]:
        """The image's encoded brush results, as ``tasks_document`` takes them (ids prefixed there)."""
        return self._tasks[name]

    def restore(self, image: ExportImage, payload: list[EncodedResult]) -> None:
        self._tasks[image.name] = payload

    def finish(self) -> dict[str, Path]:
        tasks = write_json_items(self.out_dir / TASKS_FILE, tasks_document(self._tasks), depth=1)  # a task a line
        config = atomic_write_text(self.out_dir / CONFIG_FILE, labeling_config(self.classes))
        return {self.name: tasks, "labelstudio_config": config}
