"""One binary PNG per class present: ``<stem>_masks/<index>_<class>.png`` (255 = the class) plus an
``index.json`` naming the class of each file (written last: its presence marks the folder complete)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

from ...errors import S2ClipError
from ..files import atomic_path, write_json
from ._common import ClassTable, ExportImage, class_file_names

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

    def __init__(self, out_dir: Path, classes: ClassTable) -> None:
        self.out_dir = out_dir
        self.classes = classes
        self.file_names = [f"{stem}.png" for stem in class_file_names(classes.names)]

    def folder(self, stem: str) -> Path:
        return self.out_dir / f"{stem}_masks"

    def image_outputs(self, stem: str) -> dict[str, Path]:
        return {self.name: self.folder(stem) / INDEX_FILE}

    def write_image(self, image: ExportImage, labels: np.ndarray) -> dict[str, Path]:
        folder = self.folder(image.stem)
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            raise S2ClipError(f"cannot write class masks into {folder}: it is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        index_path = folder / INDEX_FILE
        stale = _previous_files(index_path)
        files = {}
        for class_id in self.classes.present(labels):
            name = self.file_names[class_id]
            mask = np.where(labels == class_id, np.uint8(255), np.uint8(0))
            with atomic_path(folder / name) as tmp:
                Image.fromarray(mask).save(tmp, format="PNG")
            files[name] = {"class_id": class_id, "class_name": self.classes.names[class_id],
                           "pixels": int(np.count_nonzero(mask))}
        for name in stale - set(files):  # a class of an earlier run that is absent now
            path = folder / name
            if path.is_file() and not path.is_symlink():
                path.unlink()
        write_json(index_path, {"image": str(image.path), "width": image.width, "height": image.height,
                                "value": 255, "files": files})
        return {self.name: index_path}

    def remember(self, image: ExportImage, labels: np.ndarray) -> None:
        pass

    def finish(self) -> dict[str, Path]:
        return {}
