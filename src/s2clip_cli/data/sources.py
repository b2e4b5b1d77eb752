"""Where each benchmark comes from: the official downloads a preparation needs, and where it goes.

One *preparation* serves the presets that share files: ``voc`` (voc21, voc20), ``context``
(context60, context59), ``coco`` (coco_stuff164k, coco_object), ``cityscapes`` and ``ade20k``.
Only the val split is prepared (it is what ``s2clip eval`` reads). Download sizes are the
approximate figures of the download pages, for planning disk space; nothing checks them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import S2ClipError
from .presets import PRESETS

DATA_DIR_ENV = "S2CLIP_DATA_DIR"
MANIFEST_NAME = "s2clip-data.json"


@dataclass(frozen=True)
class Download:
    """One official file: its name as downloaded, approximate size, URL and what it provides."""

    file: str
    size: str  # approximate, as the download page states it
    url: str
    provides: str


@dataclass(frozen=True)
class DatasetSource:
    """A preparation: the presets it serves, its downloads, its default folder and val size."""

    preparation: str
    title: str
    presets: tuple[str, ...]
    downloads: tuple[Download, ...]
    official_val: int
    page: str
    note: str = ""


SOURCES: dict[str, DatasetSource] = {
    s.preparation: s
    for s in [
        DatasetSource(
            "voc", "PASCAL VOC 2012", ("voc21", "voc20"),
            (Download("VOCtrainval_11-May-2012.tar", "≈2.0 GB",
                      "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
                      "VOCdevkit/VOC2012: JPEGImages, SegmentationClass, ImageSets/Segmentation/val.txt"),),
            1449, "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/",
            "labels copied unchanged (palette PNGs: 0 background, 1..20, 255 border)"),
        DatasetSource(
            "context", "PASCAL Context (VOC 2010 images)", ("context60", "context59"),
            (Download("VOCtrainval_03-May-2010.tar", "≈1.3 GB",
                      "http://host.robots.ox.ac.uk/pascal/VOC/voc2010/VOCtrainval_03-May-2010.tar",
                      "VOCdevkit/VOC2010/JPEGImages"),
             Download("trainval_merged.json", "(single JSON file)",
                      "https://codalabuser.blob.core.windows.net/public/trainval_merged.json",
                      "PASCAL in Detail annotations (RLE masks, 459-class ids, train/val phases)")),
            5104, "https://www.cs.stanford.edu/~roozbeh/pascal-context/",
            "RLE masks painted in JSON order, 60 ids mapped to 0..59 (MMSeg pascal_context.py)"),
        DatasetSource(
            "coco", "COCO-Stuff 164k and COCO-Object (val2017)", ("coco_stuff164k", "coco_object"),
            (Download("val2017.zip", "≈0.8 GB", "http://images.cocodataset.org/zips/val2017.zip",
                      "val2017/*.jpg (5000 images)"),
             Download("stuffthingmaps_trainval2017.zip", "≈659 MB",
                      "http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/"
                      "stuffthingmaps_trainval2017.zip",
                      "val2017/*.png stuff+thing maps (raw COCO-Stuff ids - 1, 255 unlabeled)")),
            5000, "https://github.com/nightrome/cocostuff",
            "one pass writes both *_labelTrainIds.png (171 classes) and *_instanceTrainIds.png (81)"),
        DatasetSource(
            "cityscapes", "Cityscapes (fine annotations)", ("cityscapes",),
            (Download("leftImg8bit_trainvaltest.zip", "≈11 GB", "https://www.cityscapes-dataset.com/downloads/",
                      "leftImg8bit/val/<city>/*_leftImg8bit.png (login required)"),
             Download("gtFine_trainvaltest.zip", "≈241 MB", "https://www.cityscapes-dataset.com/downloads/",
                      "gtFine/val/<city>/*_gtFine_polygons.json (login required)")),
            500, "https://www.cityscapes-dataset.com/",
            "polygons filled with Pillow's ImageDraw in file order (cityscapesScripts json2labelImg)"),
        DatasetSource(
            "ade20k", "ADE20K SceneParsing (150 classes)", ("ade20k",),
            (Download("ADEChallengeData2016.zip", "≈923 MB",
                      "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
                      "ADEChallengeData2016/{images,annotations}/validation"),),
            2000, "http://sceneparsing.csail.mit.edu/",
            "labels copied unchanged (0 other, 1..150)"),
    ]
}

PRESET_PREPARATION: dict[str, str] = {p: s.preparation for s in SOURCES.values() for p in s.presets}
OFFICIAL_VAL_COUNTS: dict[str, int] = {p: SOURCES[prep].official_val for p, prep in PRESET_PREPARATION.items()}


def source_for(name: str) -> DatasetSource:
    """The preparation that serves preset ``name`` (or the preparation of that name)."""
    if name in SOURCES:
        return SOURCES[name]
    if name in PRESET_PREPARATION:
        return SOURCES[PRESET_PREPARATION[name]]
    raise S2ClipError(f"unknown dataset {name!r}; choose one of: {', '.join(PRESETS)}")


def data_dir() -> Path:
    """``$S2CLIP_DATA_DIR``, default ``~/.cache/s2clip/data``: where prepared datasets go by default."""
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "s2clip" / "data"


def default_data_root(name: str) -> Path:
    """The data root of preset ``name`` when none is given: the data dir + the preset's usual folder
    (``VOCdevkit/VOC2012``, ``VOCdevkit/VOC2010``, ``coco_stuff164k``, ``cityscapes``,
    ``ade/ADEChallengeData2016``)."""
    return data_dir() / PRESETS[source_for(name).presets[0]].subdir


def prepare_command(name: str) -> str:
    """The command line that prepares preset ``name`` into its default data root."""
    return f"s2clip data prepare {name} --from DOWNLOADS_DIR"
