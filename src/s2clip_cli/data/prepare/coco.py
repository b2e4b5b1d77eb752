"""COCO-Stuff 164k and COCO-Object (val2017) from the COCO-Stuff stuffthingmaps, in one pass.

Raw maps (``stuffthingmaps_trainval2017.zip`` → ``val2017/<12 digits>.png``) hold the COCO-Stuff
class id − 1 (0..181) and 255 = unlabeled. Eleven thing ids are never annotated, so their raw
values cannot occur and are an error here (the reference passes them through).

* ``<id>_labelTrainIds.png`` (coco_stuff164k, MMSeg ``coco_stuff164k.py``): the 171 raw values
  that occur → their rank 0..170; 255 stays 255.
* ``<id>_instanceTrainIds.png`` (coco_object, GroupViT ``convert_coco_object.py``): things →
  rank + 1 = 1..80, stuff → 0, and unlabeled 255 → 0 as well (no ignore pixels).

Images come from ``val2017.zip`` (``val2017/<12 digits>.jpg``).
"""

from __future__ import annotations

import numpy as np

from ...errors import S2ClipError
from .archives import RawIndex
from .common import (
    Job,
    Payload,
    Plan,
    apply_lut,
    check_same_size,
    encode_png,
    find_one_dir,
    image_size,
    pair_files,
    read_index_label,
    source_entry,
)

ABSENT_THINGS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)  # raw values of the never-annotated things
LAST_THING = 90  # raw 0..90 are things (ids 1..91), 91..181 stuff


def _luts() -> tuple[np.ndarray, np.ndarray]:
    stuff = np.full(256, -1, dtype=np.int16)
    objects = np.full(256, -1, dtype=np.int16)
    present = [v for v in range(182) if v not in ABSENT_THINGS]
    for rank, value in enumerate(present):
        stuff[value] = rank
        objects[value] = rank + 1 if value <= LAST_THING else 0
    stuff[255], objects[255] = 255, 0
    return stuff, objects


STUFF_LUT, OBJECT_LUT = _luts()
STUFF_SUFFIX, OBJECT_SUFFIX = "_labelTrainIds.png", "_instanceTrainIds.png"


def convert(job: Job) -> dict[str, Payload]:
    """Map one stuffthingmap to both label files; copy the image."""
    image, label = job.inputs["image"], job.inputs["label"]
    size, image_payload = image_size(image)
    raw, _ = read_index_label(label)
    check_same_size(raw.shape, size, label.describe(), image.describe())
    what = "COCO-Stuff stuffthingmaps (0..181 without the 11 unused thing ids, and 255)"
    stuff = apply_lut(raw, STUFF_LUT, label.describe(), what)
    objects = apply_lut(raw, OBJECT_LUT, label.describe(), what)
    img_rel, stuff_rel, object_rel = job.outputs
    return {img_rel: image_payload, stuff_rel: encode_png(stuff), object_rel: encode_png(objects)}


def plan(raw: RawIndex) -> Plan:
    """One job per val2017 image; it must have its stuffthingmap (and the reverse)."""
    images_hit = find_one_dir(raw, "coco", "val2017", r"\d{12}\.jpg", "val2017.zip or its extracted val2017/")
    labels_hit = find_one_dir(raw, "coco", "val2017", r"\d{12}\.png",
                              "stuffthingmaps_trainval2017.zip or its extracted val2017/*.png")
    images = {rel[:-4]: blob for rel, blob in images_hit.files.items()}
    labels = {rel[:-4]: blob for rel, blob in labels_hit.files.items()}
    pairs = pair_files("coco", images, labels, images_hit, labels_hit)
    if not pairs:
        raise S2ClipError("coco: no val2017 images found")
    jobs = [Job(stem, convert, {"image": img, "label": lab},
                (f"images/val2017/{stem}.jpg", f"annotations/val2017/{stem}{STUFF_SUFFIX}",
                 f"annotations/val2017/{stem}{OBJECT_SUFFIX}")) for stem, img, lab in pairs]
    return Plan("coco", "stuffthingmaps val2017 → *_labelTrainIds.png (171 train ids, MMSeg coco_stuff164k.py) "
                "and *_instanceTrainIds.png (0 background + 80 things, GroupViT convert_coco_object.py)",
                jobs, sources=[source_entry("val2017 images", images_hit.container, [p[1] for p in pairs],
                                            images_hit.dir),
                               source_entry("stuffthingmaps val2017", labels_hit.container,
                                            [p[2] for p in pairs], labels_hit.dir)])
