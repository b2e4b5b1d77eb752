"""PASCAL Context (context60 and context59) from ``trainval_merged.json``, as MMSeg's
``pascal_context.py`` makes it, without the ``detail`` API.

For each val image of the JSON: a zero canvas of the JSON's height x width; each
``annos_segmentation`` entry of that image, in JSON order (crowd included), writes its
``category_id`` (459-class space) where its RLE mask is set, so a later entry wins; then the
60 ids {0} + the 59 classes map to their rank 0..59. Any other id left on the canvas is an error
(MMSeg asserts the same). Images come from ``VOCtrainval_03-May-2010.tar`` (``VOC2010/JPEGImages``).
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from ...errors import S2ClipError, one_line
from .archives import RawIndex, read_blob
from .common import (
    Job,
    Payload,
    Plan,
    apply_lut,
    encode_png,
    find_one_dir,
    image_size,
    lines_file,
    plain_id,
    source_entry,
)
from .rle import decode_rle

JSON_NAME = "trainval_merged.json"
VAL_LIST = "ImageSets/SegmentationContext/val.txt"
# The 60 ids (background 0 + 59 classes, 459-class space) in rank order: out value = position.
CONTEXT_IDS = (0, 2, 9, 18, 19, 22, 23, 25, 31, 33, 34, 44, 45, 46, 59, 65, 68, 72, 80, 85, 98, 104, 105, 113,
               115, 144, 158, 159, 162, 187, 189, 207, 220, 232, 258, 259, 260, 284, 295, 296, 308, 324, 326,
               347, 349, 354, 355, 360, 366, 368, 397, 415, 416, 420, 424, 427, 440, 445, 454, 458)
LUT = np.full(460, -1, dtype=np.int16)
LUT[list(CONTEXT_IDS)] = np.arange(len(CONTEXT_IDS))
# The PASCAL in Detail JSON is one file of several hundred MB, read whole (as the reference does);
# a member declaring more than this is refused before it is read.
MAX_JSON_BYTES = 2 << 30


def convert(job: Job) -> dict[str, Payload]:
    """Paint one image's annotations, map to 0..59, check the image size; write label + image."""
    image = job.inputs["image"]
    file_name, height, width, annotations, json_where = job.params
    size, image_payload = image_size(image)
    if size != (width, height):
        raise S2ClipError(f"image {image.describe()} is {size[0]}x{size[1]} but {json_where} says "
                          f"{width}x{height}")
    canvas = np.zeros((height, width), dtype=np.int16)  # the image's size (at most MAX_PIXELS), checked above
    for ann_id, category, rle_size, counts in annotations:
        where = f"{json_where} (annotation {ann_id} of {file_name})"
        if not 0 <= category < len(LUT):
            raise S2ClipError(f"{json_where} (image {file_name}): raw value {category} cannot occur in Pascal "
                              "Context's 60-class table (0 and the 59 class ids)")
        if list(rle_size) != [height, width]:
            raise S2ClipError(f"{where}: RLE size {one_line(rle_size)[:40]} differs from the image's "
                              f"[{height}, {width}]")
        canvas[decode_rle(counts, height, width, where)] = category
    label = apply_lut(canvas, LUT, f"{json_where} (image {file_name})",
                      "Pascal Context's 60-class table (0 and the 59 class ids)")
    return {job.outputs[0]: image_payload, job.outputs[1]: encode_png(label)}


def _load_json(raw: RawIndex) -> tuple[dict[str, Any], Any]:
    found = raw.find_files(JSON_NAME)
    if not found:
        raise S2ClipError(f"context: found no {JSON_NAME} (the PASCAL in Detail annotations, "
                          f"https://codalabuser.blob.core.windows.net/public/{JSON_NAME}); {raw.describe_search()}")
    box, name = found[0]
    blob = box.files[name]
    try:
        data = json.loads(read_blob(blob, MAX_JSON_BYTES))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise S2ClipError(f"cannot parse {blob.describe()}: {one_line(exc)} (truncated download?)") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annos_segmentation"), list):
        raise S2ClipError(f"{blob.describe()} has no 'images' and 'annos_segmentation' lists; is it "
                          f"the PASCAL in Detail {JSON_NAME}?")
    return data, (box, blob)


def _val_images(data: dict[str, Any], where: str) -> list[dict[str, Any]]:
    images = []
    for img in data["images"]:
        try:
            if img["phase"] == "val":
                images.append({"image_id": int(img["image_id"]), "file_name": str(img["file_name"]),
                               "height": int(img["height"]), "width": int(img["width"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise S2ClipError(f"{where}: image entry {one_line(img)[:120]} lacks {one_line(exc)}") from None
    return sorted(images, key=lambda i: i["file_name"])


def _annotations(data: dict[str, Any], wanted: set[int], where: str) -> dict[int, list[tuple]]:
    by_image: dict[int, list[tuple]] = {}
    for ann in data["annos_segmentation"]:
        try:
            image_id = int(ann["image_id"])
            if image_id not in wanted:
                continue
            seg = ann["segmentation"]
            size = seg["size"]
            if not isinstance(size, list) or len(size) != 2:
                raise ValueError(f"'size' of 2 numbers (found {one_line(size)[:40]})")
            by_image.setdefault(image_id, []).append(
                (ann.get("id"), int(ann["category_id"]), size, seg["counts"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise S2ClipError(f"{where}: annotation {one_line(ann)[:120]} lacks {one_line(exc)}") from None
    return by_image


def plan(raw: RawIndex) -> Plan:
    """One job per val image of the JSON (all of them, including images without annotations)."""
    data, (json_box, json_blob) = _load_json(raw)
    where = json_blob.describe()
    images = _val_images(data, where)
    if not images:
        raise S2ClipError(f"context: {where} lists no image with phase 'val'")
    annotations = _annotations(data, {i["image_id"] for i in images}, where)
    del data
    hit = find_one_dir(raw, "context", "VOC2010/JPEGImages", r"[^/]+\.jpg",
                       "VOCtrainval_03-May-2010.tar or its extracted VOCdevkit/VOC2010/")
    jobs, used, names, warnings = [], [], [], []
    for img in images:
        file_name = plain_id(img["file_name"], f"{where}, image {img['image_id']}")
        stem = PurePosixPath(file_name).stem
        if stem in names:
            warnings.append(f"{where} lists val image {file_name} more than once; prepared once")
            continue
        blob = hit.files.get(file_name)
        if blob is None:
            raise hit.container.missing(f"context: {where} lists val image {file_name} but {hit.where()}/{file_name} "
                                        "is missing")
        names.append(stem)
        used.append(blob)
        params = (file_name, img["height"], img["width"], tuple(annotations.get(img["image_id"], ())), where)
        jobs.append(Job(stem, convert, {"image": blob}, (f"JPEGImages/{file_name}",
                                                         f"SegmentationClassContext/{stem}.png"), params))
    return Plan("context", "trainval_merged.json val: RLE masks painted in JSON order (crowd included), "
                "60 ids mapped to 0..59 (MMSeg pascal_context.py without detail)",
                jobs, extras={VAL_LIST: lines_file(names)},
                sources=[source_entry("VOC2010 JPEGImages", hit.container, used, hit.dir),
                         source_entry(JSON_NAME, json_box, [json_blob])], warnings=warnings)

