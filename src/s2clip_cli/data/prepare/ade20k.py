"""ADE20K SceneParsing val (ade20k): images and ``L`` annotations (0 other, 1..150), unchanged.

Source: ``ADEChallengeData2016.zip`` (or its extracted folder): ``images/validation/*.jpg`` and
``annotations/validation/*.png``. Eval applies reduce-zero-label; preparation never does.
"""

from __future__ import annotations

import numpy as np

from .archives import RawIndex
from .common import Job, Payload, Plan, copy_checked, find_one_dir, pair_files, source_entry

ALLOWED = np.zeros(256, dtype=bool)
ALLOWED[:151] = True


def convert(job: Job) -> dict[str, Payload]:
    """Check one sample (label mode, size, values 0..150) and copy both files."""
    return copy_checked(job, ALLOWED, "ADE20K annotations (0..150)", modes=("L", "P"))


def plan(raw: RawIndex) -> Plan:
    """One job per validation image; each needs its annotation (and the reverse)."""
    expected = "ADEChallengeData2016.zip or its extracted ADEChallengeData2016/"
    images_hit = find_one_dir(raw, "ade20k", "images/validation", r"[^/]+\.jpg", expected)
    labels_hit = find_one_dir(raw, "ade20k", "annotations/validation", r"[^/]+\.png", expected)
    images = {rel[:-4]: blob for rel, blob in images_hit.files.items()}
    labels = {rel[:-4]: blob for rel, blob in labels_hit.files.items()}
    pairs = pair_files("ade20k", images, labels, images_hit, labels_hit)
    jobs = [Job(stem, convert, {"image": img, "label": lab},
                (f"images/validation/{stem}.jpg", f"annotations/validation/{stem}.png")) for stem, img, lab in pairs]
    return Plan("ade20k", "ADEChallengeData2016 validation: images and annotations copied unchanged (values checked)",
                jobs, sources=[source_entry("images/validation", images_hit.container, [p[1] for p in pairs],
                                            images_hit.dir),
                               source_entry("annotations/validation", labels_hit.container, [p[2] for p in pairs],
                                            labels_hit.dir)])
