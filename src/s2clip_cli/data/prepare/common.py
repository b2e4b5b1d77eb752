"""What every preparation shares: the unit of work (:class:`Job`), the plan, and the checks and
encodings of label files.

A job turns the input files of one sample into that sample's output files. Its ``convert`` is a
module-level function (so a worker process can run it) returning, for each output path relative
to the output root, either encoded bytes or the input :class:`Blob` to copy unchanged.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from ...errors import S2ClipError, one_line
from .archives import Blob, Container, DirHit, RawIndex, read_blob

Payload = bytes | Blob


@dataclass(frozen=True)
class Job:
    """One sample: named inputs, extra parameters, and the outputs it writes (relative paths)."""

    key: str
    convert: Callable[[Job], dict[str, Payload]]
    inputs: dict[str, Blob]
    outputs: tuple[str, ...]
    params: Any = None


@dataclass
class Plan:
    """Everything a preparation will write, found in RAW before any work starts."""

    preparation: str
    route: str  # how labels are made, one line for the manifest
    jobs: list[Job]
    extras: dict[str, bytes] = field(default_factory=dict)  # small files written last (split lists)
    sources: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # more manifest fields (versions, ...)


def source_entry(role: str, box: Container, blobs: Sequence[Blob], folder: str = "") -> dict[str, Any]:
    """The manifest's record of one source: the archive (with its size) or the folder or file on disk,
    and how many of its files (bytes) were used."""
    entry: dict[str, Any] = {"role": role, "kind": box.kind}
    if box.kind != "folder":
        entry.update(path=str(box.path), size=box.size)
        if folder:
            entry["member_dir"] = folder
    elif folder or len(blobs) != 1:
        entry["path"] = str(box.path / folder)
    else:
        entry["path"] = blobs[0].path
    entry["files_used"] = len(blobs)
    entry["bytes_used"] = sum(b.size for b in blobs)
    return entry


def find_one_dir(raw: RawIndex, what: str, dir_suffix: str, pattern: str, expected: str) -> DirHit:
    """The best folder ending in ``dir_suffix`` with files matching ``pattern``, or an error saying
    which download was expected."""
    hits = raw.find_dirs(dir_suffix, pattern)
    if not hits:
        raise S2ClipError(f"{what}: found no {dir_suffix}/ folder with {_pattern_hint(pattern)} files "
                          f"(expected {expected}); {raw.describe_search()}")
    return hits[0]


def _pattern_hint(pattern: str) -> str:
    return pattern.replace("[^/]+", "*").replace("\\d{12}", "<12 digits>").replace("\\.", ".")


def pair_files(what: str, images: dict[str, Blob], labels: dict[str, Blob], image_hit: DirHit,
               label_hit: DirHit) -> list[tuple[str, Blob, Blob]]:
    """(key, image, label) for matching keys; an image without a label (or the reverse) is an error
    naming the file."""
    lonely_images = sorted(set(images) - set(labels))
    if lonely_images:
        more = f" (and {len(lonely_images) - 1} more)" if len(lonely_images) > 1 else ""
        raise S2ClipError(f"{what}: image {images[lonely_images[0]].describe()} has no label in "
                          f"{label_hit.where()}{more}")
    lonely_labels = sorted(set(labels) - set(images))
    if lonely_labels:
        more = f" (and {len(lonely_labels) - 1} more)" if len(lonely_labels) > 1 else ""
        raise S2ClipError(f"{what}: label {labels[lonely_labels[0]].describe()} has no image in "
                          f"{image_hit.where()}{more}")
    return [(key, images[key], labels[key]) for key in sorted(images)]


def open_image_bytes(data: bytes, where: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise S2ClipError(f"cannot decode {where}: {one_line(exc)}") from None


def image_size(blob: Blob) -> tuple[tuple[int, int], Payload]:
    """(width, height) of an image input from its header, and the payload that copies it: the blob
    itself for a plain file (linked or copied), else its bytes (already read)."""
    try:
        if blob.kind == "file":
            with Image.open(blob.path) as img:
                return img.size, blob
        data = read_blob(blob)
        with Image.open(io.BytesIO(data)) as img:
            return img.size, data
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise S2ClipError(f"cannot read image {blob.describe()}: {one_line(exc)}") from None


def read_index_label(blob: Blob, modes: tuple[str, ...] = ("P", "L")) -> tuple[np.ndarray, bytes]:
    """A label PNG's pixel values as stored (palette indices for ``P``, never colours) and its bytes."""
    data = read_blob(blob)
    img = open_image_bytes(data, blob.describe())
    if img.mode not in modes:
        raise S2ClipError(f"label {blob.describe()} is a {img.mode} image; expected an index PNG "
                          f"(mode {' or '.join(modes)})")
    return np.asarray(img), data


def check_same_size(label_hw: tuple[int, int], image_wh: tuple[int, int], label: str, image: str) -> None:
    h, w = label_hw
    if (w, h) != tuple(image_wh):
        raise S2ClipError(f"label {label} is {w}x{h} but its image {image} is {image_wh[0]}x{image_wh[1]}")


def apply_lut(values: np.ndarray, lut: np.ndarray, where: str, what: str) -> np.ndarray:
    """Map ``values`` through ``lut`` (-1 = a value that cannot occur); an impossible value is an
    error naming the file and the value."""
    values = np.asarray(values)
    if values.size and (values.min() < 0 or values.max() >= len(lut)):
        bad = int(values.min() if values.min() < 0 else values.max())
        raise S2ClipError(f"{where}: raw value {bad} cannot occur in {what}")
    mapped = lut[values]
    if (mapped < 0).any():
        bad = int(np.unique(values[mapped < 0])[0])
        raise S2ClipError(f"{where}: raw value {bad} cannot occur in {what}")
    return mapped.astype(np.uint8)


def check_values(values: np.ndarray, allowed: np.ndarray, where: str, what: str) -> None:
    """Error naming the file and value unless every value is allowed (``allowed``: 256 booleans)."""
    present = np.unique(values)
    bad = present[~allowed[present]]
    if bad.size:
        raise S2ClipError(f"{where}: raw value {int(bad[0])} cannot occur in {what}")


def copy_checked(job: Job, allowed: np.ndarray, what: str, modes: tuple[str, ...] = ("P", "L")) -> dict[str, Payload]:
    """Check one image + index-label pair (label mode, equal sizes, values in ``allowed``) and copy
    both unchanged: the outputs ``job.outputs[0]`` (image) and ``job.outputs[1]`` (label)."""
    image, label = job.inputs["image"], job.inputs["label"]
    size, image_payload = image_size(image)
    values, data = read_index_label(label, modes)
    check_same_size(values.shape, size, label.describe(), image.describe())
    check_values(values, allowed, label.describe(), what)
    return {job.outputs[0]: image_payload, job.outputs[1]: label if label.kind == "file" else data}


def encode_png(label: np.ndarray) -> bytes:
    """An 8-bit single-channel (``L``) PNG of ``label``, as the reference converters save it."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def lines_file(names: Sequence[str]) -> bytes:
    """A split list: one name per line, each ending in a newline."""
    return "".join(f"{n}\n" for n in names).encode("utf-8")
