"""Cityscapes val: ``*_gtFine_labelTrainIds.png`` rasterised from the polygon JSON files, as
cityscapesScripts' ``json2labelImg(..., "trainIds")`` does (MMSeg ``cityscapes.py`` calls it).

An ``L`` image filled with 255 (unlabeled); the objects in file order: skip ``deleted`` ones,
strip a ``group`` suffix from an unknown label (``cargroup`` → car; ``polegroup`` is a label of
its own), fail on any other unknown label, skip labels with a negative id (license plate), and
fill the polygon with its trainId using Pillow's ``ImageDraw.polygon`` (no outline), so later
objects win. The result depends on Pillow's polygon fill, so the manifest records Pillow's version.
"""

from __future__ import annotations

import io
import json

import PIL
from PIL import Image, ImageDraw

from ...errors import S2ClipError, one_line
from .archives import RawIndex, read_blob
from .common import Job, Payload, Plan, find_one_dir, image_size, pair_files, source_entry

# name -> (id, trainId), cityscapesScripts helpers/labels.py
LABELS: dict[str, tuple[int, int]] = {
    "unlabeled": (0, 255), "ego vehicle": (1, 255), "rectification border": (2, 255), "out of roi": (3, 255),
    "static": (4, 255), "dynamic": (5, 255), "ground": (6, 255), "road": (7, 0), "sidewalk": (8, 1),
    "parking": (9, 255), "rail track": (10, 255), "building": (11, 2), "wall": (12, 3), "fence": (13, 4),
    "guard rail": (14, 255), "bridge": (15, 255), "tunnel": (16, 255), "pole": (17, 5), "polegroup": (18, 255),
    "traffic light": (19, 6), "traffic sign": (20, 7), "vegetation": (21, 8), "terrain": (22, 9),
    "sky": (23, 10), "person": (24, 11), "rider": (25, 12), "car": (26, 13), "truck": (27, 14),
    "bus": (28, 15), "caravan": (29, 255), "trailer": (30, 255), "train": (31, 16), "motorcycle": (32, 17),
    "bicycle": (33, 18), "license plate": (-1, -1),
}
# A gtFine polygons file is at most a few hundred KiB; filling costs time per point, so more is refused.
MAX_POLYGONS_BYTES = 16 << 20
IMAGE_SUFFIX, POLYGON_SUFFIX, LABEL_SUFFIX = "_leftImg8bit.png", "_gtFine_polygons.json", "_gtFine_labelTrainIds.png"


def polygons_to_train_ids(doc: dict, where: str, size: tuple[int, int], image: str = "its image") -> Image.Image:
    """The trainId label image of one parsed ``*_gtFine_polygons.json`` for an image of ``size``
    (width, height). The canvas is the image's size: the file's own ``imgWidth``/``imgHeight`` must
    equal it, and are checked before anything is allocated."""
    try:
        width, height = int(doc["imgWidth"]), int(doc["imgHeight"])
        objects = doc["objects"]
        if not isinstance(objects, list):
            raise TypeError("'objects' list")
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise S2ClipError(f"{where}: not a Cityscapes polygons file (missing {one_line(exc)})") from None
    if (width, height) != tuple(size):
        raise S2ClipError(f"{where} is for a {width}x{height} image but {image} is {size[0]}x{size[1]}")
    label = Image.new("L", tuple(size), LABELS["unlabeled"][1])
    drawer = ImageDraw.Draw(label)
    for obj in objects:
        if not isinstance(obj, dict):
            raise S2ClipError(f"{where}: an object is {type(obj).__name__}, not a JSON object")
        name = str(obj.get("label", ""))
        if obj.get("deleted", 0):
            continue
        if name not in LABELS and name.endswith("group"):
            name = name[: -len("group")]
        if name not in LABELS:
            raise S2ClipError(f"{where}: unknown label {str(obj.get('label'))!r}")
        label_id, train_id = LABELS[name]
        if label_id < 0:
            continue
        try:
            drawer.polygon([(float(p[0]), float(p[1])) for p in obj["polygon"]], fill=train_id)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise S2ClipError(f"{where}: cannot draw the polygon of a {name!r} object: {one_line(exc)}") from None
    return label


def convert(job: Job) -> dict[str, Payload]:
    """Rasterise one polygons file; check it against the image size; copy the image."""
    image, polygons = job.inputs["image"], job.inputs["polygons"]
    size, image_payload = image_size(image)
    try:
        doc = json.loads(read_blob(polygons, MAX_POLYGONS_BYTES))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise S2ClipError(f"cannot parse {polygons.describe()}: {one_line(exc)}") from None
    if not isinstance(doc, dict):
        raise S2ClipError(f"{polygons.describe()}: not a Cityscapes polygons file (a JSON {type(doc).__name__})")
    label = polygons_to_train_ids(doc, polygons.describe(), size, image.describe())
    buf = io.BytesIO()
    label.save(buf, format="PNG")
    return {job.outputs[0]: image_payload, job.outputs[1]: buf.getvalue()}


def plan(raw: RawIndex) -> Plan:
    """One job per val image (cities frankfurt, lindau, munster); each needs its polygons file."""
    images_hit = find_one_dir(raw, "cityscapes", "leftImg8bit/val", r"[^/]+/[^/]+_leftImg8bit\.png",
                              "leftImg8bit_trainvaltest.zip or its extracted leftImg8bit/val/")
    polygons_hit = find_one_dir(raw, "cityscapes", "gtFine/val", r"[^/]+/[^/]+_gtFine_polygons\.json",
                                "gtFine_trainvaltest.zip or its extracted gtFine/val/")
    images = {rel[: -len(IMAGE_SUFFIX)]: blob for rel, blob in images_hit.files.items()}
    polygons = {rel[: -len(POLYGON_SUFFIX)]: blob for rel, blob in polygons_hit.files.items()}
    pairs = pair_files("cityscapes", images, polygons, images_hit, polygons_hit)
    jobs = [Job(key, convert, {"image": img, "polygons": poly},
                (f"leftImg8bit/val/{key}{IMAGE_SUFFIX}", f"gtFine/val/{key}{LABEL_SUFFIX}"))
            for key, img, poly in pairs]
    return Plan("cityscapes", "gtFine val polygons filled with Pillow ImageDraw.polygon in file order "
                "(cityscapesScripts json2labelImg, trainIds)", jobs,
                sources=[source_entry("leftImg8bit val", images_hit.container, [p[1] for p in pairs],
                                      images_hit.dir),
                         source_entry("gtFine val polygons", polygons_hit.container, [p[2] for p in pairs],
                                      polygons_hit.dir)],
                info={"pillow_version": PIL.__version__})
