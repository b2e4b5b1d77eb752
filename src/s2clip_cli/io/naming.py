"""How outputs name and number the images of a run, in one place (`segment`, the export formats,
and any merge of per-run export files use these and nothing else).

- An image's **name** is its path relative to its input root, POSIX, with its suffix
  (``trip/street.png``), as CVAT names the frames of a zip or a shared folder with sub-folders. Its
  **stem** is the name without the last suffix (``trip/street``): the part of every per-image output
  path after the output folder (``trip/street_mask.png``). Both are checked with `check_name`: a
  relative path whose every part is a plain file name, so no output ever leaves the output folder.
- Run-level files list images in `image_order` (by path parts, as a folder walk lists them) and
  number them with `image_ids` (1, 2, … in that order), whatever order they were segmented in.
- Category ids start at 1 with or without a background (`category_id`); the mask value is the label
  in ``<stem>_mask.png``. YOLO's class indices are its own 0-based ones (`yolo_index`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import PurePosixPath

from ..errors import S2ClipError


def split_suffix(file_name: str) -> tuple[str, str]:
    """``(stem, suffix)`` of one file name (``street.png`` → ``street``, ``.png``); a name whose
    stem would be empty, ``.`` or ``..`` (``..png``, ``.x``) keeps its whole name as the stem."""
    path = PurePosixPath(file_name)
    if path.stem in ("", ".", ".."):
        return file_name, ""
    return path.stem, path.suffix


def check_name(name: str) -> str:
    """``name`` if it is a relative POSIX path of plain parts (none empty, ``.`` or ``..``, no
    backslash or NUL), so that joined to the output folder it stays inside; else `S2ClipError`."""
    parts = name.split("/")
    if not name or any(part in ("", ".", "..") or "\\" in part or "\0" in part for part in parts):
        raise S2ClipError(f"cannot name outputs after {name!r}: not a relative path inside the output folder")
    return name


def name_stem(name: str) -> str:
    """The stem of an image name: its folders and its file name without the last suffix."""
    folder, _, file_name = check_name(name).rpartition("/")
    stem = split_suffix(file_name)[0]
    return f"{folder}/{stem}" if folder else stem


def image_order(names: Iterable[str]) -> list[str]:
    """Image names in the order of every run-level file: by path parts (``a.png``, ``trip/b.png``,
    ``trip.png``), the order a sorted folder walk gives."""
    return sorted(names, key=lambda name: name.split("/"))


def image_ids(names: Iterable[str]) -> dict[str, int]:
    """Image id per name: 1, 2, … in `image_order`."""
    return {name: number for number, name in enumerate(image_order(names), start=1)}


def category_id(mask_value: int, has_background: bool) -> int:
    """The category id of an object class: its mask value with a background (which is value 0 and
    no category), its mask value + 1 without one, so ids start at 1 either way."""
    if has_background and mask_value == 0:
        raise ValueError("the background (mask value 0) is not a category")
    return mask_value if has_background else mask_value + 1


def mask_value(category: int, has_background: bool) -> int:
    """The mask value of a category id (the inverse of `category_id`)."""
    if category < 1:
        raise ValueError(f"category ids start at 1, got {category}")
    return category if has_background else category - 1


def yolo_index(mask_value: int, has_background: bool) -> int:
    """YOLO's class index of an object class: 0-based over the object classes (category id - 1)."""
    return category_id(mask_value, has_background) - 1
