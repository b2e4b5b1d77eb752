"""What every preparation shares: the unit of work (:class:`Job`), the plan, and the checks and
encodings of label files.

A job turns the input files of one sample into that sample's output files. Its ``convert`` is a
module-level function (so a worker process can run it) returning, for each output path relative
to the output root, either encoded bytes or the input :class:`Blob` to copy unchanged.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from ...errors import S2ClipError, one_line
from ..untrusted import open_regular
from .archives import Blob, Container, DirHit, RawIndex, check_readable, read_blob

Payload = bytes | Blob
# The most pixels an image or label of a benchmark sample may have (the largest, Cityscapes, has
# 2048x1024): a header declaring more is refused before anything of that size is allocated.
MAX_PIXELS = 8192 * 4096
MAX_ID_LENGTH = 200


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


def plain_id(sample: str, where: str) -> str:
    """``sample`` when it is a plain file name (or stem): not empty, no folder separator, not
    hidden (so neither ``.`` nor ``..``), printable, at most ``MAX_ID_LENGTH`` characters. Anything
    else — ``../../x``, ``/abs``, ``a/b`` — is an ``S2ClipError`` naming ``where`` and the id: an id
    read from a download becomes a path in the output, and must stay a name in its folder."""
    if (not sample or sample.startswith(".") or "/" in sample or "\\" in sample or not sample.isprintable()
            or len(sample) > MAX_ID_LENGTH):
        raise S2ClipError(f"{where}: id {sample!r} is not a plain file name (no folders, no leading '.', no "
                          "control characters); refusing it")
    return sample


def pair_files(what: str, images: dict[str, Blob], labels: dict[str, Blob], image_hit: DirHit,
               label_hit: DirHit) -> list[tuple[str, Blob, Blob]]:
    """(key, image, label) for matching keys; an image without a label (or the reverse) is an error
    naming the file (and the archive, if it is truncated). Every part of every key (``city/stem``
    for Cityscapes) must be a plain name (:func:`plain_id`)."""
    for found in (images, labels):
        for key, blob in found.items():
            for part in key.split("/"):
                plain_id(part, blob.describe())
    lonely_images = sorted(set(images) - set(labels))
    if lonely_images:
        more = f" (and {len(lonely_images) - 1} more)" if len(lonely_images) > 1 else ""
        raise label_hit.container.missing(f"{what}: image {images[lonely_images[0]].describe()} has no label in "
                                          f"{label_hit.where()}{more}")
    lonely_labels = sorted(set(labels) - set(images))
    if lonely_labels:
        more = f" (and {len(lonely_labels) - 1} more)" if len(lonely_labels) > 1 else ""
        raise image_hit.container.missing(f"{what}: label {labels[lonely_labels[0]].describe()} has no image in "
                                          f"{image_hit.where()}{more}")
    return [(key, images[key], labels[key]) for key in sorted(images)]


IMAGE_FORMATS = ("JPEG", "PNG")  # what benchmark images are; never a format with an external decoder (EPS)
LABEL_FORMATS = ("PNG",)


def _open_image(source: BinaryIO, where: str, formats: tuple[str, ...] = IMAGE_FORMATS) -> Image.Image:
    """Open an image (header only) of one of ``formats``, refusing more than ``MAX_PIXELS``; Pillow's
    own bomb warning becomes the same one-line error instead of a multi-line warning."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(source, formats=list(formats))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise S2ClipError(f"image {where} declares more pixels than a benchmark image can hold "
                          f"({one_line(exc)}); refusing it") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise S2ClipError(f"cannot read image {where}: {one_line(exc)}") from None
    w, h = img.size
    if w * h > MAX_PIXELS:
        img.close()
        raise S2ClipError(f"image {where} declares {w}x{h} pixels, more than the {MAX_PIXELS} a benchmark image "
                          "can hold (damaged or hostile file?); refusing it")
    return img


def open_image_bytes(data: bytes, where: str, modes: tuple[str, ...] | None = None) -> Image.Image:
    """Decode an image from ``data``; with ``modes``, a header of another mode is refused before
    any pixel is decoded."""
    img = _open_image(io.BytesIO(data), where, LABEL_FORMATS if modes is not None else IMAGE_FORMATS)
    if modes is not None and img.mode not in modes:
        img.close()
        raise S2ClipError(f"label {where} is a {img.mode} image; expected an index PNG (mode {' or '.join(modes)})")
    try:
        img.load()
        return img
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise S2ClipError(f"cannot decode {where}: {one_line(exc)}") from None


def image_size(blob: Blob) -> tuple[tuple[int, int], Payload]:
    """(width, height) of an image input from its header (at most ``MAX_PIXELS``), and the payload
    that copies it: the blob itself for a plain file (linked or copied), else its bytes (already read)."""
    if blob.kind == "file":  # the header only: a big image folder is linked, not read
        check_readable(blob)
        with open_regular(blob.path) as fh, _open_image(fh, blob.describe()) as img:
            return img.size, blob
    data = read_blob(blob)
    with _open_image(io.BytesIO(data), blob.describe()) as img:
        return img.size, data


def read_index_label(blob: Blob, modes: tuple[str, ...] = ("P", "L")) -> tuple[np.ndarray, bytes]:
    """A label PNG's pixel values as stored (palette indices for ``P``, never colours) and its bytes."""
    data = read_blob(blob)
    img = open_image_bytes(data, blob.describe(), modes)
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
