"""Tiny fake official downloads for every preparation, as archives or as extracted folders.

Each builder returns a :class:`RawSample`: the *parts* of the download (an archive name, the
folder it is usually extracted into, and its members) and the expected prepared label of every
sample, written from the recipes of ``shared/notes/dataset-preparation.md`` (values spelled out
by hand, not computed by the code under test). :func:`pack` writes the parts under a RAW folder
either as the official archives or as the extracted tree.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from s2clip_cli.data.datasets import label_colours


@dataclass
class Part:
    """One download: ``archive`` (None: a plain file, never archived), the folder its members sit in
    when extracted (relative to RAW), and its members (path -> bytes)."""

    archive: str | None
    folder: str
    members: dict[str, bytes]


@dataclass
class RawSample:
    parts: list[Part]
    labels: dict[str, np.ndarray]  # output label path (relative to the data root) -> expected values
    images: dict[str, bytes] = field(default_factory=dict)  # output image path -> expected bytes

    def member(self, suffix: str) -> tuple[Part, str]:
        """The part and member name ending with ``suffix``."""
        for part in self.parts:
            for name in part.members:
                if name.endswith(suffix):
                    return part, name
        raise KeyError(suffix)


def jpeg(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def png(values: np.ndarray, *, palette: bool = False, rgb: bool = False) -> bytes:
    buf = io.BytesIO()
    values = np.ascontiguousarray(values, dtype=np.uint8)
    if palette:  # indices stored as such, VOC colours in the palette
        img = Image.frombytes("P", (values.shape[1], values.shape[0]), values.tobytes())
        img.putpalette(label_colours(256).reshape(-1).tolist())
    else:
        img = Image.fromarray(values)
    if rgb:
        img = img.convert("RGB")
    img.save(buf, format="PNG")
    return buf.getvalue()


def pack(sample: RawSample, raw: Path, *, archives: bool, gz: bool = False, subdir: str = "") -> Path:
    """Write ``sample`` under ``raw`` (created): official archives (``gz``: tar → tar.gz) or the
    extracted folders; ``subdir`` puts everything one level deeper (prepare must search)."""
    base = raw / subdir if subdir else raw
    base.mkdir(parents=True, exist_ok=True)
    for part in sample.parts:
        if part.archive is None or not archives:
            folder = base / part.folder if part.archive is not None or not archives else base
            for name, data in part.members.items():
                path = folder / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)
            continue
        name = part.archive + (".gz" if gz and part.archive.endswith(".tar") else "")
        path = base / name
        if name.endswith(".zip"):
            with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
                for member, data in part.members.items():
                    zf.writestr(member, data)
        else:
            with tarfile.open(path, "w:gz" if name.endswith(".gz") else "w") as tf:
                for member, data in part.members.items():
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return raw


def mutate(sample: RawSample, change: Callable[[dict[str, bytes]], None], suffix: str) -> RawSample:
    """``sample`` with ``change`` applied to the members of the part holding ``suffix``."""
    part, _ = sample.member(suffix)
    change(part.members)
    return sample


# ------------------------------------------------------------------------------------------- VOC
def voc_sample() -> RawSample:
    """VOC2012: 2007_000032 (16x12; 0, a block of 1, a block of 15, a 255 border), two more val
    samples, and a decoy 2007_000039 that val.txt does not list."""
    root = "VOCdevkit/VOC2012"
    lab = np.zeros((12, 16), dtype=np.uint8)
    lab[2:6, 9:14] = 1
    lab[7:10, 9:14] = 15
    lab[0, :] = lab[-1, :] = lab[:, 0] = lab[:, -1] = 255
    rng = np.random.default_rng(3)
    labels = {"2007_000032": lab}
    for i, (w, h) in zip(("2007_000033", "2007_000042"), ((10, 7), (9, 9)), strict=True):
        labels[i] = rng.choice(np.array([0, 3, 7, 20, 255], dtype=np.uint8), size=(h, w))
    members: dict[str, bytes] = {f"{root}/ImageSets/Segmentation/val.txt": b"2007_000032\n2007_000033\n2007_000042\n",
                                 f"{root}/ImageSets/Segmentation/train.txt": b"2007_000039\n",
                                 f"{root}/Annotations/2007_000032.xml": b"<annotation/>"}
    images = {}
    for n, (sid, values) in enumerate([*labels.items(), ("2007_000039", np.full((5, 6), 4, np.uint8))]):
        members[f"{root}/JPEGImages/{sid}.jpg"] = jpeg(values.shape[1], values.shape[0], n)
        members[f"{root}/SegmentationClass/{sid}.png"] = png(values, palette=True)
        if sid in labels:
            images[f"JPEGImages/{sid}.jpg"] = members[f"{root}/JPEGImages/{sid}.jpg"]
    return RawSample([Part("VOCtrainval_11-May-2012.tar", "", members)],
                     {f"SegmentationClass/{k}.png": v for k, v in labels.items()}, images)


# ------------------------------------------------------------------------------------------- Context
# The note's fixed 4x5 vectors: counts string -> mask (h=4, w=5).
RLE_ROWS_01, RLE_ROWS_12, RLE_ROW3_COLS01, RLE_ALL = "02200000000", "1220000000O", "31309", "0d0"


def context_sample(extra_annotations: list[dict] | None = None) -> RawSample:
    """VOC2010 images 2008_000002/3/4 (5x4) + 2008_000005/6, and a trainval_merged.json whose val
    images are 2, 3, 5, 6 (4 is train)."""
    root = "VOCdevkit/VOC2010"
    ids = {"2008_000002": "val", "2008_000003": "val", "2008_000004": "train", "2008_000005": "val",
           "2008_000006": "val"}
    images = [{"image_id": int(i.replace("_", "")), "file_name": f"{i}.jpg", "height": 4, "width": 5, "phase": ph}
              for i, ph in ids.items()]

    def ann(n: int, image: str, cat: int, counts: str, crowd: int = 0) -> dict:
        return {"id": n, "image_id": int(image.replace("_", "")), "category_id": cat, "iscrowd": crowd,
                "segmentation": {"size": [4, 5], "counts": counts}}

    annotations = [ann(1, "2008_000002", 360, RLE_ROWS_01), ann(2, "2008_000002", 440, RLE_ROWS_12),
                   ann(3, "2008_000002", 284, RLE_ROW3_COLS01, crowd=1), ann(4, "2008_000004", 2, RLE_ALL),
                   ann(5, "2008_000005", 458, RLE_ALL), ann(6, "2008_000005", 0, RLE_ROW3_COLS01),
                   ann(7, "2008_000006", 59, RLE_ROWS_12)]
    annotations += extra_annotations or []
    doc = {"info": {"version": "3.0"}, "images": images, "annos_segmentation": annotations, "categories": [],
           "annos_occlusion": [], "annos_boundary": [], "parts": []}
    members = {f"{root}/JPEGImages/{i}.jpg": jpeg(5, 4, n) for n, i in enumerate(ids)}
    members[f"{root}/JPEGImages/2009_000001.jpg"] = jpeg(6, 4, 99)  # an image Pascal Context does not annotate
    expected = {
        "2008_000002": np.array([[47] * 5, [56] * 5, [56] * 5, [37, 37, 0, 0, 0]]),  # later wall wins; crowd kept
        "2008_000003": np.zeros((4, 5)),
        "2008_000005": np.array([[59] * 5, [59] * 5, [59] * 5, [0, 0, 59, 59, 59]]),  # wood, then background 0
        "2008_000006": np.array([[0] * 5, [14] * 5, [14] * 5, [0] * 5]),  # car
    }
    json_part = Part(None, root, {"trainval_merged.json": json.dumps(doc).encode()})
    return RawSample([Part("VOCtrainval_03-May-2010.tar", "", members), json_part],
                     {f"SegmentationClassContext/{k}.png": v.astype(np.uint8) for k, v in expected.items()},
                     {f"JPEGImages/{k}.jpg": members[f"{root}/JPEGImages/{k}.jpg"] for k in expected})


# ------------------------------------------------------------------------------------------- COCO
def coco_sample() -> RawSample:
    """val2017 000000000139 (8x6, raw {0, 12, 89, 91, 181, 255}) and 000000000285 (8x6, more raw
    values from the note's thing table and the stuff range), a stale *_labelTrainIds.png and a
    train2017 map that must be ignored."""
    raw_139 = np.resize(np.array([0, 12, 89, 91, 181, 255], dtype=np.uint8), (6, 8))
    stuff_139 = np.resize(np.array([0, 11, 79, 80, 170, 255], dtype=np.uint8), (6, 8))
    object_139 = np.resize(np.array([1, 12, 80, 0, 0, 0], dtype=np.uint8), (6, 8))
    # raw -> (stuff train id, object value): thing rows of the note's table, stuff = raw - 11
    table = {26: (24, 25), 43: (39, 40), 66: (60, 61), 71: (62, 63), 83: (73, 74), 100: (89, 0), 150: (139, 0)}
    raw_285 = np.resize(np.array(list(table), dtype=np.uint8), (6, 8))
    stuff_285 = np.vectorize(lambda v: table[v][0])(raw_285).astype(np.uint8)
    object_285 = np.vectorize(lambda v: table[v][1])(raw_285).astype(np.uint8)
    img_139, img_285 = jpeg(8, 6, 1), jpeg(8, 6, 2)
    images = Part("val2017.zip", "images", {"val2017/000000000139.jpg": img_139, "val2017/000000000285.jpg": img_285})
    maps = Part("stuffthingmaps_trainval2017.zip", "annotations", {
        "val2017/000000000139.png": png(raw_139, palette=True),
        "val2017/000000000285.png": png(raw_285),
        "val2017/000000000139_labelTrainIds.png": png(np.full((6, 8), 7)),  # stale output: ignored
        "train2017/000000000009.png": png(np.full((6, 8), 11)),  # train: not prepared (and invalid)
    })
    labels = {"annotations/val2017/000000000139_labelTrainIds.png": stuff_139,
              "annotations/val2017/000000000139_instanceTrainIds.png": object_139,
              "annotations/val2017/000000000285_labelTrainIds.png": stuff_285,
              "annotations/val2017/000000000285_instanceTrainIds.png": object_285}
    return RawSample([images, maps], labels, {"images/val2017/000000000139.jpg": img_139,
                                              "images/val2017/000000000285.jpg": img_285})


# ------------------------------------------------------------------------------------------- Cityscapes
def rect(x0: int, y0: int, x1: int, y1: int) -> list[list[int]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def city_polygons(objects: list[tuple[str, list[list[int]], int]], width: int = 16, height: int = 8) -> bytes:
    objs = [{"label": label, "polygon": poly, **({"deleted": 1} if deleted else {})} for label, poly, deleted in objects]
    return json.dumps({"imgHeight": height, "imgWidth": width, "objects": objs}).encode()


def cityscapes_sample(extra_object: tuple[str, list[list[int]], int] | None = None) -> RawSample:
    """frankfurt_000000_000294 (16x8, the note's seven objects), lindau and munster samples."""
    stem = "frankfurt/frankfurt_000000_000294"
    objects = [("out of roi", rect(0, 0, 15, 7), 0), ("road", rect(0, 4, 15, 7), 0), ("sky", rect(0, 0, 15, 3), 0),
               ("cargroup", rect(4, 2, 9, 5), 0), ("license plate", rect(6, 4, 7, 5), 0),
               ("person", rect(0, 0, 3, 7), 1), ("polegroup", rect(14, 0, 15, 1), 0)]
    if extra_object:
        objects.append(extra_object)
    expected = np.zeros((8, 16), dtype=np.uint8)
    expected[0:4] = 10
    expected[2:6, 4:10] = 13
    expected[0:2, 14:16] = 255
    lindau = np.full((8, 16), 8, dtype=np.uint8)  # vegetation everywhere, a bicycle, a caravan (255)
    lindau[1:4, 2:6] = 18
    lindau[5:8, 10:13] = 255
    munster = np.full((6, 10), 255, dtype=np.uint8)  # no objects at all: unlabeled
    polygons = {
        stem: city_polygons(objects),
        "lindau/lindau_000000_000019": city_polygons([("vegetation", rect(0, 0, 15, 7), 0),
                                                      ("bicycle", rect(2, 1, 5, 3), 0),
                                                      ("caravan", rect(10, 5, 12, 7), 0)]),
        "munster/munster_000000_000019": city_polygons([], 10, 6),
    }
    sizes = {stem: (16, 8), "lindau/lindau_000000_000019": (16, 8), "munster/munster_000000_000019": (10, 6)}
    images = {k: png(np.random.default_rng(n).integers(0, 255, (h, w, 3))) for n, (k, (w, h)) in enumerate(sizes.items())}
    left = Part("leftImg8bit_trainvaltest.zip", "", {f"leftImg8bit/val/{k}_leftImg8bit.png": v for k, v in images.items()})
    left.members["leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"] = images[stem]
    gt = Part("gtFine_trainvaltest.zip", "", {f"gtFine/val/{k}_gtFine_polygons.json": v for k, v in polygons.items()})
    gt.members[f"gtFine/val/{stem}_gtFine_labelIds.png"] = png(np.zeros((8, 16)))
    gt.members["gtFine/train/aachen/aachen_000000_000019_gtFine_polygons.json"] = city_polygons([("unicorn", rect(0, 0, 1, 1), 0)])
    labels = {f"gtFine/val/{stem}_gtFine_labelTrainIds.png": expected,
              "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png": lindau,
              "gtFine/val/munster/munster_000000_000019_gtFine_labelTrainIds.png": munster}
    return RawSample([left, gt], labels, {f"leftImg8bit/val/{k}_leftImg8bit.png": v for k, v in images.items()})


# ------------------------------------------------------------------------------------------- ADE20K
def ade20k_sample() -> RawSample:
    """ADE_val_00000001 (8x6, L values {0, 1, 150}) and ADE_val_00000002 (7x5)."""
    top = "ADEChallengeData2016"
    one = np.resize(np.array([0, 1, 150], dtype=np.uint8), (6, 8))
    two = np.resize(np.array([5, 0, 77, 149], dtype=np.uint8), (5, 7))
    members = {f"{top}/objectInfo150.txt": b"Idx\tRatio\tTrain\tVal\tName\n", f"{top}/sceneCategories.txt": b""}
    images = {}
    for n, (sid, values) in enumerate((("ADE_val_00000001", one), ("ADE_val_00000002", two))):
        members[f"{top}/images/validation/{sid}.jpg"] = images[f"images/validation/{sid}.jpg"] = \
            jpeg(values.shape[1], values.shape[0], n)
        members[f"{top}/annotations/validation/{sid}.png"] = png(values)
    members[f"{top}/images/training/ADE_train_00000001.jpg"] = jpeg(4, 4, 7)
    members[f"{top}/annotations/training/ADE_train_00000001.png"] = png(np.full((4, 4), 200))
    return RawSample([Part("ADEChallengeData2016.zip", "", members)],
                     {"annotations/validation/ADE_val_00000001.png": one,
                      "annotations/validation/ADE_val_00000002.png": two}, images)


SAMPLES: dict[str, Callable[[], RawSample]] = {
    "voc21": voc_sample, "context60": context_sample, "coco_stuff164k": coco_sample,
    "cityscapes": cityscapes_sample, "ade20k": ade20k_sample,
}
