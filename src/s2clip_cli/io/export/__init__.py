"""Export formats for label maps, shared by `segment` and `serve`.

``parse_formats`` reads a ``--format`` list; an ``ExportSession`` writes the chosen formats for the
images of one run: per-image files as each image is done (``write_image``), run-level files at the
end (``finish``). "png" (the palette mask, overlay and JSON that `segment` writes itself) is a
format name here but the session writes nothing for it.

Images are keyed by their name (`io.naming`: the path relative to the input root, ``trip/street.png``);
per-image files are named after its stem (``trip/street``) with the folders mirrored under the output
folder. Run-level files list images in `io.naming.image_order` and number them with
`io.naming.image_ids`; category ids start at 1 (`io.naming.category_id`), YOLO indices at 0.

================  ======================================================  ==========
format            files (in the output folder)                            written
================  ======================================================  ==========
coco              ``coco.json``: one annotation per 8-connected region,   per run
                  compressed RLE (pycocotools)
polygons          ``<stem>_polygons.json``: contours with holes           per image
masks             ``<stem>_masks/<id>_<class>.png`` + ``index.json``      per image
yolo              ``yolo/labels/<stem>.txt`` + ``yolo/data.yaml``          per image + run
labelstudio       ``labelstudio.json`` (brush predictions) +              per run
                  ``labelstudio_config.xml``
cvat              ``cvat.xml`` (CVAT for images 1.1, ``<mask>`` per region) per run
================  ======================================================  ==========
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ...errors import S2ClipError
from ..files import prepare_output_dir
from ..naming import check_name, name_stem
from ._common import ClassTable, ExportImage, check_cvat_labels, check_labels, check_xml_names, check_xml_text

FORMATS: tuple[str, ...] = ("png", "coco", "polygons", "masks", "yolo", "labelstudio", "cvat")

__all__ = ["FORMATS", "ExportSession", "RunRecord", "check_class_names", "parse_formats"]


def parse_formats(text: str) -> list[str]:
    """The formats of a comma-separated list (``"png,coco"``), in the order given; `S2ClipError`
    for an empty list or item, an unknown name (the message lists the valid ones) or a repeat."""
    valid = ", ".join(FORMATS)
    items = [item.strip().lower() for item in text.split(",")]
    if not text.strip():
        raise S2ClipError(f"--format is empty: give one or more of {valid}")
    formats: list[str] = []
    for item in items:
        if not item:
            raise S2ClipError(f"--format {text!r} has an empty entry: give names from {valid}, separated by commas")
        if item not in FORMATS:
            raise S2ClipError(f"unknown export format {item!r}: choose from {valid}")
        if item in formats:
            raise S2ClipError(f"--format names {item!r} twice")
        formats.append(item)
    return formats


def check_class_names(formats: Sequence[str], class_names: Sequence[str], has_background: bool) -> None:
    """Each chosen format's limits on class names, as one-line `S2ClipError`s (call it before
    anything is loaded or written): XML text for ``cvat`` and ``labelstudio``, CVAT's 64-character
    label names. (Masks shorten names in their file names themselves, uniquely, and keep the full
    name in ``index.json``; JSON and YAML carry any name.)"""
    classes = ClassTable(tuple(class_names), has_background)
    if "cvat" in formats:
        check_cvat_labels(classes)
    if "labelstudio" in formats:
        check_xml_names(classes)


class _Writer(Protocol):
    name: str
    keeps_images: bool  # the run-level files hold a part of each image (`payload`)

    def image_outputs(self, stem: str) -> dict[str, Path]: ...
    def image_folders(self, stem: str) -> dict[str, Path]: ...
    def write_image(self, image: ExportImage, labels: np.ndarray) -> dict[str, Path]: ...
    def remember(self, image: ExportImage, labels: np.ndarray) -> None: ...
    def forget(self, name: str) -> None: ...
    def payload(self, name: str) -> Any: ...  # what the run-level files keep of an image (`keeps_images`)
    def restore(self, image: ExportImage, payload: Any) -> None: ...
    def finish(self) -> dict[str, Path]: ...


@dataclass(frozen=True)
class RunRecord:
    """What a session's run-level files keep of one image (`ExportSession.run_records`): its path and
    name, its size, and each run-level format's part (lists, tuples, dicts, strings and numbers: it
    pickles). Another session of the same formats and classes takes
    it back with `ExportSession.add_record`, so the ranks of a run can merge their images into one
    set of run-level files."""

    path: str
    name: str
    width: int
    height: int
    payloads: dict[str, Any]


def _writer(name: str, out_dir: Path, classes: ClassTable, tolerance: float) -> _Writer:
    """The writer of one format (its module imported only when chosen)."""
    if name == "coco":
        from .coco import CocoWriter
        return CocoWriter(out_dir, classes)
    if name == "polygons":
        from .polygons import PolygonsWriter
        return PolygonsWriter(out_dir, classes, tolerance)
    if name == "masks":
        from .masks import MasksWriter
        return MasksWriter(out_dir, classes)
    if name == "yolo":
        from .yolo import YoloWriter
        return YoloWriter(out_dir, classes, tolerance)
    if name == "labelstudio":
        from .labelstudio import LabelStudioWriter
        return LabelStudioWriter(out_dir, classes)
    if name == "cvat":
        from .cvat import CvatWriter
        return CvatWriter(out_dir, classes)
    raise ValueError(f"no writer for format {name!r}")


class ExportSession:
    """The export formats of one run into ``out_dir``.

    ``class_names``: the label values' names (index 0 is the background when ``has_background``;
    the background is never exported as an object). ``polygon_tolerance``: the largest distance in
    pixels (``cv2.approxPolyDP``) between a simplified polygon and the exact boundary (0: exact),
    for polygons and yolo. Call ``write_image`` for each image segmented, ``add_existing`` for each
    image skipped because its outputs exist (so run-level files still cover it), ``discard`` for an
    image whose outputs were then given up, and ``finish`` at the end.

    Each image is given by its ``name`` (`io.naming`; ``trip/street.png``): the run-level files key
    it by that name, its per-image files are named after the name's stem. Two names with one stem
    (``a.png``, ``a.jpg``) are refused. The run-level files do not depend on the order images came in.
    """

    def __init__(self, out_dir: Path, formats: Sequence[str], class_names: list[str], has_background: bool,
                 *, polygon_tolerance: float = 1.0) -> None:
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise S2ClipError(f"unknown export format {unknown[0]!r}: choose from {', '.join(FORMATS)}")
        if not class_names:
            raise S2ClipError("cannot export labels without class names")
        if not polygon_tolerance >= 0:  # also rejects NaN
            raise S2ClipError(f"--polygon-tolerance must be >= 0 pixels, got {polygon_tolerance}")
        check_class_names(formats, class_names, has_background)
        self.out_dir = Path(out_dir)
        self.formats = list(dict.fromkeys(formats))
        self.classes = ClassTable(tuple(class_names), has_background)
        self._writers = [_writer(name, self.out_dir, self.classes, float(polygon_tolerance))
                         for name in self.formats if name != "png"]
        self._names: dict[str, str] = {}  # stem -> the image name that uses it
        self._kept: dict[str, ExportImage] = {}  # the images the run-level files will list, by name

    def _stem(self, name: str) -> str:
        """The stem of ``name``, refused when another image of this session has it."""
        stem = name_stem(name)
        other = self._names.setdefault(stem, name)
        if other != name:
            raise S2ClipError(f"images {other!r} and {name!r} would write the same export files ({stem}); "
                              "rename one of them")
        return stem

    def image_outputs(self, name: str) -> dict[str, Path]:
        """The per-image files the chosen formats write for the image ``name`` (their presence means
        done), by format."""
        stem = name_stem(name)
        outputs: dict[str, Path] = {}
        for writer in self._writers:
            outputs.update(writer.image_outputs(stem))
        return outputs

    def image_folders(self, name: str) -> dict[str, Path]:
        """Folders that hold files of the image ``name`` only (the class masks'), by format."""
        stem = name_stem(name)
        folders: dict[str, Path] = {}
        for writer in self._writers:
            folders.update(writer.image_folders(stem))
        return folders

    def _image(self, image_path: Path, name: str, labels: np.ndarray) -> tuple[ExportImage, np.ndarray]:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # a file name of bytes that are not UTF-8 (os.fsdecode's surrogates)
            raise S2ClipError(f"cannot export {name!r}: its name holds bytes that are not UTF-8") from None
        stem = self._stem(check_name(name))
        labels = check_labels(np.asarray(labels), len(self.classes.names), name)
        if "cvat" in self.formats:
            check_xml_text(name, "image name")
        height, width = labels.shape
        return ExportImage(Path(image_path), name, stem, width, height), labels

    def write_image(self, image_path: Path, name: str, labels: np.ndarray) -> dict[str, Path]:
        """Write the per-image files of ``labels`` ([H, W] class indices) and keep the image for the
        run-level files; returns the files written, by format."""
        image, labels = self._image(image_path, name, labels)
        if self._writers:
            prepare_output_dir(self.out_dir)
        written: dict[str, Path] = {}
        for writer in self._writers:
            written.update(writer.write_image(image, labels))
            writer.remember(image, labels)
        self._kept[image.name] = image
        return written

    def add_existing(self, image_path: Path, name: str, labels: np.ndarray) -> None:
        """Keep an image skipped in this run (labels read back from its mask) for the run-level files."""
        image, labels = self._image(image_path, name, labels)
        for writer in self._writers:
            writer.remember(image, labels)
        self._kept[image.name] = image

    def discard(self, name: str) -> None:
        """Leave the image ``name`` out of the run-level files (its outputs were given up); its
        per-image files are the caller's to remove."""
        for writer in self._writers:
            writer.forget(name)
        self._kept.pop(name, None)

    def run_records(self) -> list[RunRecord]:
        """What the run-level files would keep of each image written or added so far (in the order
        they came), for `add_record` on another session: the parts are the writers' own objects, not
        copies."""
        records = []
        for name, image in self._kept.items():
            payloads = {writer.name: writer.payload(name) for writer in self._writers if writer.keeps_images}
            records.append(RunRecord(str(image.path), name, image.width, image.height, payloads))
        return records

    def add_record(self, record: RunRecord) -> None:
        """Keep an image that another session of the same formats and classes wrote or added (its
        `run_records`) for this session's run-level files, as if it had come here. The name is
        checked as `write_image` checks it; a record whose parts are not this session's run-level
        formats is a `ValueError` (the sessions differ)."""
        try:
            record.name.encode("utf-8")
        except UnicodeEncodeError:
            raise S2ClipError(f"cannot export {record.name!r}: its name holds bytes that are not UTF-8") from None
        stem = self._stem(check_name(record.name))
        if "cvat" in self.formats:
            check_xml_text(record.name, "image name")
        if not (isinstance(record.width, int) and isinstance(record.height, int) and record.width >= 0
                and record.height >= 0):
            raise ValueError(f"record of {record.name!r}: size {record.width}x{record.height} is not a size")
        expected = {writer.name for writer in self._writers if writer.keeps_images}
        if set(record.payloads) != expected:
            raise ValueError(f"record of {record.name!r} holds {sorted(record.payloads)}, this session keeps "
                             f"{sorted(expected)}")
        image = ExportImage(Path(record.path), record.name, stem, record.width, record.height)
        for writer in self._writers:
            if writer.name in record.payloads:
                writer.restore(image, record.payloads[writer.name])
        self._kept[image.name] = image

    def finish(self) -> dict[str, Path]:
        """Write the run-level files (each atomically) and return them, by name."""
        if self._writers:
            prepare_output_dir(self.out_dir)
        written: dict[str, Path] = {}
        for writer in self._writers:
            written.update(writer.finish())
        return written
