"""One binary PNG per class present: ``<stem>_masks/<id>_<class>.png`` (255 = the class; ``id`` the
category id, from 1) plus an ``index.json`` giving each file's category id, mask value and class
name (written last: its presence marks the folder complete)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_path, write_json
from ._common import ClassTable, ExportImage, class_file_names, export_path, make_folders

INDEX_FILE = "index.json"
_OWN_FILE = re.compile(r"^\d+(_[\w\-]+)?\.png$")  # the names class_file_names gives, nothing else


def _previous_files(index_path: Path) -> set[str]:
    """Mask files a previous run listed in ``index_path`` (only names this module could have written)."""
    try:
        listed = json.loads(index_path.read_text(encoding="utf-8")).get("files", {})
    except (OSError, ValueError, AttributeError):
        return set()
    return {name for name in listed if isinstance(name, str) and _OWN_FILE.match(name)}


class MasksWriter:
    """Per image, a folder of binary class PNGs and their ``index.json``."""

    name = "masks"
    keeps_images = False  # the run-level files hold a part of each image

    def __init__(self, out_dir: Path, classes: ClassTable) -> None:
        self.out_dir = out_dir
        self.classes = classes
        objects = classes.object_ids()
        names = class_file_names([classes.names[c] for c in objects], first=classes.category_id(objects[0])) \
            if objects else []
        self.file_names = {value: f"{stem}.png" for value, stem in zip(objects, names, strict=True)}

    def folder(self, stem: str) -> Path:
        return export_path(self.out_dir, stem, "_masks")

    def image_outputs(self, stem: str) -> dict[str, Path]:
        return {self.name: self.folder(stem) / INDEX_FILE}

    def image_folders(self, stem: str) -> dict[str, Path]:
        return {self.name: self.folder(stem)}

    def write_image(self, image: ExportImage, labels: np.ndarray) -> dict[str, Path]:
        folder = self.folder(image.stem)
        make_folders(self.out_dir, folder)  # refuses a link or a file in its place
        index_path = folder / INDEX_FILE
        stale = _previous_files(index_path)
        files = {}
        for class_id in self.classes.present(labels):
            name = self.file_names[class_id]
            mask = np.where(labels == class_id, np.uint8(255), np.uint8(0))
            with atomic_path(folder / name) as tmp:
                Image.fromarray(mask).save(tmp, format="PNG")
            files[name] = {"category_id": self.classes.category_id(class_id), "mask_value": class_id,
                           "class_name": self.classes.names[class_id], "pixels": int(np.count_nonzero(mask))}
        for name in stale - set(files):  # a class of an earlier run that is absent now
            path = folder / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
        write_json(index_path, {"image": image.name, "width": image.width, "height": image.height,
                                "value": 255, "files": files})
        return {self.name: index_path}

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
