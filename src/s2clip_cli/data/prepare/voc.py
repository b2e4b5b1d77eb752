"""PASCAL VOC 2012 (voc21 and voc20): the val images and ``SegmentationClass`` labels, unchanged.

Source: ``VOCtrainval_11-May-2012.tar`` (or its extracted ``VOCdevkit/VOC2012``), found by its
``VOC2012/ImageSets/Segmentation/val.txt``. The labels are palette PNGs whose indices are
0 = background, 1..20 = classes, 255 = the void border; they are checked and copied as they are
(voc20's reduce-zero-label is applied by eval, not here).
"""

from __future__ import annotations

import numpy as np

from ...errors import S2ClipError
from .archives import DirHit, RawIndex, read_blob
from .common import Job, Payload, Plan, copy_checked, lines_file, plain_id, source_entry

VAL_LIST = "ImageSets/Segmentation/val.txt"
MAX_LIST_BYTES = 4 << 20  # val.txt: 1449 ids of 12 characters (17 KiB)
ALLOWED = np.zeros(256, dtype=bool)
ALLOWED[:21] = True
ALLOWED[255] = True


def convert(job: Job) -> dict[str, Payload]:
    """Check one sample (label mode, size, values) and copy both files."""
    return copy_checked(job, ALLOWED, "VOC labels (0..20 and 255)")


def plan(raw: RawIndex) -> Plan:
    """The val samples listed in ``val.txt``; a listed id without its image or label is an error."""
    found = raw.find_files(f"VOC2012/{VAL_LIST}")
    if not found:
        raise S2ClipError(f"voc: found no VOC2012/{VAL_LIST} (expected VOCtrainval_11-May-2012.tar or its "
                          f"extracted VOCdevkit/VOC2012/); {raw.describe_search()}")
    box, name = found[0]
    split_blob = box.files[name]
    root = DirHit(box, name[: -len(VAL_LIST) - 1], {})
    where = split_blob.describe()
    try:
        lines = read_blob(split_blob, MAX_LIST_BYTES).decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise S2ClipError(f"cannot read {where}: {exc}") from None
    ids: list[str] = []
    warnings: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        if line.strip():
            sample = plain_id(line.strip(), f"{where}, line {lineno}")
            if sample in ids:
                warnings.append(f"{where} lists {sample} more than once (line {lineno}); prepared once")
            else:
                ids.append(sample)
    if not ids:
        raise S2ClipError(f"voc: {where} lists no images")
    jobs, used = [], [split_blob]
    for sample in ids:
        image, label = root.get(f"JPEGImages/{sample}.jpg"), root.get(f"SegmentationClass/{sample}.png")
        for blob, rel in ((image, f"JPEGImages/{sample}.jpg"), (label, f"SegmentationClass/{sample}.png")):
            if blob is None:
                raise box.missing(f"voc: {sample} is listed in {where} but {root.where()}/{rel} is missing")
        assert image is not None and label is not None
        used += [image, label]
        jobs.append(Job(sample, convert, {"image": image, "label": label},
                        (f"JPEGImages/{sample}.jpg", f"SegmentationClass/{sample}.png")))
    return Plan("voc", "VOC2012 val: images and SegmentationClass labels copied unchanged (values checked)",
                jobs, extras={VAL_LIST: lines_file(ids)}, sources=[source_entry("VOC2012", box, used, root.dir)],
                warnings=warnings)
