"""Export formats (io.export): each format read back with its own tools gives the labels again
(exactly where the format is lossless), the files have the structure their tools expect, and
hostile class names, empty and 16-bit label maps are handled."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from skimage.measure import label as skimage_label
from skimage.measure import regionprops

from s2clip_cli.errors import S2ClipError
from s2clip_cli.io.export import FORMATS, ExportSession, parse_formats
from s2clip_cli.io.export._common import class_file_names
from s2clip_cli.io.export.coco import annotations_from_labels, encode_rle
from s2clip_cli.io.export.cvat import cvat_rle
from s2clip_cli.io.export.polygons import rasterize, read_polygons

CLASSES = ["background", "cat", "dog", "wire"]
ALL = [f for f in FORMATS if f != "png"]


def _scene() -> np.ndarray:
    """A 64 x 80 map with the hard cases: a ring (a hole) with an island of its own class inside
    the hole, two squares touching at a corner (one 8-connected region), a one-pixel region, a
    one-pixel-wide line and a ragged blob."""
    labels = np.zeros((64, 80), np.uint8)
    labels[5:35, 5:35] = 1
    labels[12:28, 12:28] = 0
    labels[17:22, 17:22] = 1
    labels[40:45, 40:45] = 2
    labels[45:50, 45:50] = 2
    labels[60, 70] = 3
    labels[55, 50:76] = 3
    noise = cv2.GaussianBlur(np.random.default_rng(1).random((24, 30)).astype(np.float32), (0, 0), 2)
    labels[40:64, 0:30][noise > 0.5] = 2
    return labels


def _smooth_labels(h: int, w: int, classes: int, seed: int) -> np.ndarray:
    """Random blobby labels in 0..classes-1 (argmax of blurred noise)."""
    noise = np.random.default_rng(seed).random((classes, h, w)).astype(np.float32)
    blurred = np.stack([cv2.GaussianBlur(n, (0, 0), 3) for n in noise])
    return blurred.argmax(0).astype(np.uint16 if classes > 255 else np.uint8)


def _export(tmp_path: Path, images: dict[str, np.ndarray], formats: list[str] = ALL,
            classes: list[str] = CLASSES, has_background: bool = True, **kwargs) -> dict[str, Path]:
    """Export ``images`` (image name -> labels, read from photos/<name>) and return the run files."""
    session = ExportSession(tmp_path, formats, classes, has_background, **kwargs)
    for name, labels in images.items():
        written = session.write_image(Path("photos") / name, name, labels)
        assert written == session.image_outputs(name)
        assert all(path.is_file() for path in written.values())
    return session.finish()


def _coco_labels(coco: COCO, image_id: int) -> np.ndarray:
    """The mask values an image's annotations draw (each category's ``mask_value``)."""
    info = coco.loadImgs([image_id])[0]
    values = {c["id"]: c["mask_value"] for c in coco.loadCats(coco.getCatIds())}
    out = np.zeros((info["height"], info["width"]), np.intp)
    for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id])):
        mask = coco.annToMask(ann).astype(bool)
        assert not out[mask].any(), "regions overlap"
        out[mask] = values[ann["category_id"]]
    return out


# --------------------------------------------------------------------------- --format parsing


def test_parse_formats_accepts_lists_in_order() -> None:
    assert parse_formats("png") == ["png"]
    assert parse_formats(" COCO , png,cvat ") == ["coco", "png", "cvat"]
    assert parse_formats(",".join(FORMATS)) == list(FORMATS)


@pytest.mark.parametrize(("text", "message"), [
    ("", "--format is empty"), ("  ", "--format is empty"), ("png,,coco", "empty entry"),
    ("png,coco,png", "names 'png' twice"), ("coco,json", "unknown export format 'json'"),
])
def test_parse_formats_rejects_bad_lists_in_one_line(text: str, message: str) -> None:
    with pytest.raises(S2ClipError, match=message) as info:
        parse_formats(text)
    assert "\n" not in str(info.value)
    if "unknown" in message or "empty" in message:
        assert ", ".join(FORMATS) in str(info.value)


def test_png_alone_writes_nothing(tmp_path: Path) -> None:
    session = ExportSession(tmp_path, ["png"], CLASSES, True)
    assert session.image_outputs("a.jpg") == {}
    assert session.write_image(Path("a.jpg"), "a.jpg", _scene()) == {}
    assert session.finish() == {}
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- COCO


def test_coco_loads_with_pycocotools_and_gives_the_labels_back(tmp_path: Path) -> None:
    scene, other = _scene(), _smooth_labels(40, 50, len(CLASSES), seed=2)
    written = _export(tmp_path, {"scene.jpg": scene, "other.jpg": other}, ["coco"])
    coco = COCO(str(written["coco"]))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASSES[1:]
    assert coco.getCatIds() == [1, 2, 3]  # with a background the category id is the mask value
    assert [c["mask_value"] for c in coco.loadCats(coco.getCatIds())] == [1, 2, 3]
    images = coco.loadImgs(coco.getImgIds())  # in name order, whatever order they were written in
    assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in images] == [
        (1, "other.jpg", 50, 40), (2, "scene.jpg", 80, 64)]
    for image, labels in zip(images, (other, scene), strict=True):
        np.testing.assert_array_equal(_coco_labels(coco, image["id"]), labels)
    ids = [a["id"] for a in coco.dataset["annotations"]]
    assert ids == list(range(1, len(ids) + 1))


def test_coco_has_one_annotation_per_8_connected_region_with_its_box_and_area(tmp_path: Path) -> None:
    scene = _scene()
    coco = COCO(str(_export(tmp_path, {"scene.jpg": scene}, ["coco"])["coco"]))
    anns = coco.loadAnns(coco.getAnnIds())
    expected = []  # skimage's own 8-connected labelling as the reference
    for class_id in (1, 2, 3):
        for region in regionprops(skimage_label(scene == class_id, connectivity=2)):
            top, left, bottom, right = region.bbox
            expected.append((class_id, [left, top, right - left, bottom - top], int(region.area)))
    got = [(a["category_id"], a["bbox"], a["area"]) for a in anns]
    assert sorted(got) == sorted(expected)
    assert len([a for a in anns if a["category_id"] == 1]) == 2  # the ring and the island in its hole
    assert (2, [40.0, 40.0, 10.0, 10.0], 50) in got  # the squares touching at a corner are one region
    assert all(a["iscrowd"] == 0 and isinstance(a["segmentation"]["counts"], str) for a in anns)


def test_encode_rle_is_pycocotools_rle_as_json() -> None:
    mask = _scene() == 1
    rle = encode_rle(mask)
    assert rle["size"] == [64, 80] and isinstance(rle["counts"], str)
    again = json.loads(json.dumps(rle))
    np.testing.assert_array_equal(mask_utils.decode({"size": again["size"], "counts": again["counts"].encode()}),
                                  mask.astype(np.uint8))
    assert encode_rle(np.zeros((3, 4), bool))["size"] == [3, 4]


def test_annotations_from_labels_for_the_server() -> None:
    scene = _scene()
    anns = annotations_from_labels(scene, len(CLASSES), True, image_id=7, first_id=10)
    assert [a["id"] for a in anns] == list(range(10, 10 + len(anns)))
    assert {a["image_id"] for a in anns} == {7} and {a["category_id"] for a in anns} == {1, 2, 3}
    rebuilt = np.zeros_like(scene)
    for a in anns:
        decoded = mask_utils.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"]})
        rebuilt[decoded.astype(bool)] = a["category_id"]
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(decoded)
        assert (x, y, w, h) == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert a["area"] == decoded.sum()
    np.testing.assert_array_equal(rebuilt, scene)
    # without a background every class is an object, label 0 included, and ids still start at 1
    assert {a["category_id"] for a in annotations_from_labels(scene, 4, False)} == {1, 2, 3, 4}
    with pytest.raises(ValueError):
        annotations_from_labels(scene, 3, True)


# --------------------------------------------------------------------------- polygons


def test_polygons_at_tolerance_0_rasterise_back_exactly(tmp_path: Path) -> None:
    """With tolerance 0 the polygons are OpenCV's exact boundaries; drawing them back (fill each
    exterior, clear its holes, keep the boundary pixels: ``polygons.rasterize``) gives the labels
    pixel for pixel."""
    scene, other = _scene(), _smooth_labels(40, 50, len(CLASSES), seed=3)
    _export(tmp_path, {"scene.jpg": scene, "other.jpg": other}, ["polygons"], polygon_tolerance=0)
    for stem, labels in (("scene", scene), ("other", other)):
        document = json.loads((tmp_path / f"{stem}_polygons.json").read_text(encoding="utf-8"))
        assert (document["width"], document["height"]) == (labels.shape[1], labels.shape[0])
        polygons = read_polygons(document)
        np.testing.assert_array_equal(rasterize(polygons, *labels.shape), labels)
    document = json.loads((tmp_path / "scene_polygons.json").read_text(encoding="utf-8"))
    ring = [o for o in document["objects"] if o["mask_value"] == 1 and o["holes"]]
    assert len(ring) == 1 and len(ring[0]["holes"]) == 1  # the hole is kept
    assert {o["class_name"] for o in document["objects"]} == {"cat", "dog", "wire"}
    assert all(o["category_id"] == o["mask_value"] for o in document["objects"])  # with a background
    assert document["image"] == "scene.jpg"
    assert [(c["id"], c["mask_value"]) for c in document["categories"]] == [(1, 1), (2, 2), (3, 3)]


def test_polygon_tolerance_simplifies_within_the_tolerance(tmp_path: Path) -> None:
    labels = _smooth_labels(60, 60, 3, seed=4)
    counts = {}
    for tolerance in (0.0, 2.0):
        out = tmp_path / str(tolerance)
        _export(out, {"a.png": labels}, ["polygons"], classes=["bg", "a", "b"], polygon_tolerance=tolerance)
        document = json.loads((out / "a_polygons.json").read_text(encoding="utf-8"))
        assert document["tolerance_px"] == tolerance
        counts[tolerance] = sum(len(o["exterior"]) for o in document["objects"])
        exact = read_polygons(document)
        drawn = rasterize(exact, 60, 60)
        if tolerance:  # simplified shapes differ from the labels only near boundaries
            edges = cv2.dilate((cv2.Laplacian(labels.astype(np.float32), cv2.CV_32F) != 0).astype(np.uint8),
                               np.ones((2 * int(tolerance) + 3,) * 2, np.uint8))
            assert not ((drawn != labels) & (edges == 0)).any()
    assert counts[2.0] < counts[0.0]
    with pytest.raises(S2ClipError, match="tolerance"):
        ExportSession(tmp_path, ["polygons"], CLASSES, True, polygon_tolerance=-1)


# --------------------------------------------------------------------------- per-class masks


def test_class_masks_are_exact_binary_pngs_of_the_classes_present(tmp_path: Path) -> None:
    labels = _scene()
    labels[labels == 3] = 0  # "wire" absent: no file for it
    written = _export(tmp_path, {"scene.jpg": labels}, ["masks"])
    index = json.loads((tmp_path / "scene_masks" / "index.json").read_text(encoding="utf-8"))
    assert written == {} and index["image"] == "scene.jpg"
    assert sorted(index["files"]) == ["001_cat.png", "002_dog.png"]
    assert sorted(p.name for p in (tmp_path / "scene_masks").iterdir()) == ["001_cat.png", "002_dog.png", "index.json"]
    for name, entry in index["files"].items():
        png = np.array(Image.open(tmp_path / "scene_masks" / name))
        assert png.dtype == np.uint8 and set(np.unique(png)) <= {0, 255}
        np.testing.assert_array_equal(png == 255, labels == entry["mask_value"])
        assert entry["class_name"] == CLASSES[entry["mask_value"]] and entry["pixels"] == (png == 255).sum()
        assert entry["category_id"] == entry["mask_value"] and name.startswith(f"{entry['category_id']:03d}_")


def test_class_masks_rewritten_drop_classes_no_longer_present(tmp_path: Path) -> None:
    labels = _scene()
    _export(tmp_path, {"scene.png": labels}, ["masks"])
    (tmp_path / "scene_masks" / "notes.txt").write_text("mine")
    labels[labels == 2] = 0
    _export(tmp_path, {"scene.png": labels}, ["masks"])
    assert sorted(p.name for p in (tmp_path / "scene_masks").iterdir()) == [
        "001_cat.png", "003_wire.png", "index.json", "notes.txt"]  # the user's file stays


HOSTILE = ["background", "../x", "a/b", "", "猫", "a b", "a_b", "..", "/etc/passwd", "CON", "x" * 64,
           "a\\b", "tab\there", 'quote"s <&>', "dog", "dog", "🐕 emoji", "new\nline"]


def test_hostile_class_names_stay_inside_the_folder_and_distinct(tmp_path: Path) -> None:
    names = class_file_names(HOSTILE)
    assert len(set(names)) == len(names) == len(HOSTILE)
    assert len({n.lower() for n in names}) == len(names)  # distinct on case-insensitive file systems too
    for name in names:
        assert Path(name).name == name and not name.startswith(".") and len(name.encode()) < 200
    assert names[:5] == ["000_background", "001_x", "002_a_b", "003", "004_猫"]
    labels = np.arange(len(HOSTILE), dtype=np.uint8).repeat(4).reshape(1, -1).repeat(3, 0)
    written = _export(tmp_path, {"h.png": labels}, ALL, classes=HOSTILE)
    assert all(tmp_path in p.parents for p in written.values())
    folder = tmp_path / "h_masks"
    index = json.loads((folder / "index.json").read_text(encoding="utf-8"))
    assert [e["class_name"] for e in index["files"].values()] == HOSTILE[1:]
    assert len(list(folder.iterdir())) == len(HOSTILE)  # 17 masks and the index, nothing elsewhere
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["coco.json", "cvat.xml", "h_masks", "h_polygons.json", "labelstudio.json", "labelstudio_config.xml", "yolo"])
    # the names come back unchanged from every run-level file
    coco = COCO(str(written["coco"]))
    assert [c["name"] for c in coco.dataset["categories"]] == HOSTILE[1:]
    assert list(yaml.safe_load(written["yolo_data"].read_text(encoding="utf-8"))["names"].values()) == HOSTILE[1:]
    root = ET.parse(written["cvat"]).getroot()
    assert [n.text or "" for n in root.iter("name")][1:] == HOSTILE[1:]  # after the task's own name
    config = ET.parse(written["labelstudio_config"]).getroot()
    assert [label.get("value") for label in config.iter("Label")] == HOSTILE[1:]


def test_names_xml_cannot_carry_are_refused_for_xml_formats(tmp_path: Path) -> None:
    for fmt in ("cvat", "labelstudio"):
        with pytest.raises(S2ClipError, match="XML"):
            ExportSession(tmp_path, [fmt], ["bg", "bell\x07"], True)
    ExportSession(tmp_path, ["coco", "masks"], ["bg", "bell\x07"], True)  # JSON and file names are fine


# --------------------------------------------------------------------------- YOLO


def test_yolo_lines_are_normalised_polygons_of_each_region(tmp_path: Path) -> None:
    scene = _scene()
    written = _export(tmp_path, {"scene.jpg": scene}, ["yolo"], polygon_tolerance=0)
    data = yaml.safe_load(written["yolo_data"].read_text(encoding="utf-8"))
    assert data["names"] == {0: "cat", 1: "dog", 2: "wire"}  # background is not a YOLO class
    assert data["train"] == "images" and Path(data["path"]) == (tmp_path / "yolo").resolve()
    lines = (tmp_path / "yolo" / "labels" / "scene.txt").read_text().splitlines()
    drawn = np.zeros_like(scene)
    for line in lines:
        cls, *coords = line.split()
        points = np.array(coords, dtype=np.float64).reshape(-1, 2)
        assert len(points) >= 3 and points.min() >= 0 and points.max() <= 1
        pixels = np.rint(points * [scene.shape[1], scene.shape[0]]).astype(np.int32)
        cv2.fillPoly(drawn, [pixels.reshape(-1, 1, 2)], int(cls) + 1)
        cv2.polylines(drawn, [pixels.reshape(-1, 1, 2)], True, int(cls) + 1)
    # one line per region but those whose outline has under 3 vertices (the pixel, the straight wire
    # and a 2-pixel speck of the blob); YOLO polygons have no holes, so the ring's hole is filled
    regions = sum(skimage_label(scene == c, connectivity=2).max() for c in (1, 2, 3))
    assert len(lines) == regions - 3 == 8
    filled = scene.copy()
    filled[12:28, 12:28] = 1
    filled[60, 70] = filled[55, 50:76] = filled[40, 3:5] = 0
    np.testing.assert_array_equal(drawn, filled)


def test_yolo_without_background_numbers_every_class(tmp_path: Path) -> None:
    labels = _smooth_labels(30, 30, 3, seed=5)
    written = _export(tmp_path, {"a.png": labels}, ["yolo"], classes=["sky", "sea", "sand"], has_background=False)
    assert yaml.safe_load(written["yolo_data"].read_text())["names"] == {0: "sky", 1: "sea", 2: "sand"}
    ids = {int(line.split()[0]) for line in (tmp_path / "yolo/labels/a.txt").read_text().splitlines()}
    assert ids == set(np.unique(labels).tolist())


# --------------------------------------------------------------------------- Label Studio


def test_labelstudio_brush_predictions_decode_to_the_class_masks(tmp_path: Path) -> None:
    from label_studio_converter.brush import decode_rle

    scene = _scene()
    written = _export(tmp_path, {"scene.jpg": scene}, ["labelstudio"])
    tasks = json.loads(written["labelstudio"].read_text(encoding="utf-8"))
    assert len(tasks) == 1 and tasks[0]["data"]["image"] == "scene.jpg"
    results = tasks[0]["predictions"][0]["result"]
    assert [r["value"]["brushlabels"] for r in results] == [["cat"], ["dog"], ["wire"]]
    config = ET.parse(written["labelstudio_config"]).getroot()
    brush = config.find("BrushLabels")
    image = config.find("Image")
    for result in results:
        assert result["type"] == "brushlabels" and result["value"]["format"] == "rle"
        assert (result["from_name"], result["to_name"]) == (brush.get("name"), image.get("name"))
        assert (result["original_height"], result["original_width"]) == scene.shape
        alpha = decode_rle(result["value"]["rle"]).reshape(*scene.shape, 4)[..., 3]
        class_id = CLASSES.index(result["value"]["brushlabels"][0])
        np.testing.assert_array_equal(alpha > 0, scene == class_id)
    assert image.get("value") == "$image"


# --------------------------------------------------------------------------- CVAT


def _decode_cvat_mask(element: ET.Element, height: int, width: int) -> np.ndarray:
    """A CVAT ``<mask>`` on the image, decoded as datumaro does (pycocotools on the uncompressed
    counts with the box's (w, h) as size, then transposed)."""
    counts = [int(v) for v in element.get("rle").split(",")]
    w, h = int(element.get("width")), int(element.get("height"))
    left, top = int(element.get("left")), int(element.get("top"))
    rle = mask_utils.frPyObjects({"counts": counts, "size": [w, h]}, w, h)
    box = mask_utils.decode(rle).transpose()
    canvas = np.zeros((height, width), np.uint8)
    canvas[top : top + h, left : left + w] = box
    return canvas.astype(bool)


def test_cvat_xml_has_cvat_structure_and_masks_decode_to_the_labels(tmp_path: Path) -> None:
    scene, other = _scene(), _smooth_labels(30, 40, len(CLASSES), seed=6)
    written = _export(tmp_path, {"scene.jpg": scene, "other.jpg": other}, ["cvat"])
    root = ET.parse(written["cvat"]).getroot()
    assert root.tag == "annotations" and root.findtext("version") == "1.1"
    task = root.find("meta/task")
    assert task.findtext("size") == "2" and task.findtext("mode") == "annotation"
    assert [label.findtext("name") for label in task.findall("labels/label")] == CLASSES[1:]
    images = root.findall("image")
    assert [(i.get("id"), i.get("name"), i.get("width"), i.get("height")) for i in images] == [
        ("0", "other.jpg", "40", "30"), ("1", "scene.jpg", "80", "64")]  # in name order, frames from 0
    for image, labels in zip(images, (other, scene), strict=True):
        rebuilt = np.zeros_like(labels)
        masks = image.findall("mask")
        for element in masks:
            assert set(element.attrib) == {"label", "source", "occluded", "rle", "left", "top", "width",
                                           "height", "z_order"}
            mask = _decode_cvat_mask(element, *labels.shape)
            assert not rebuilt[mask].any()
            rebuilt[mask] = CLASSES.index(element.get("label"))
        np.testing.assert_array_equal(rebuilt, labels)
        regions = sum(skimage_label(labels == c, connectivity=2).max() for c in (1, 2, 3))
        assert len(masks) == regions


def test_cvat_rle_runs_start_with_zeros() -> None:
    assert cvat_rle(np.array([[1, 1, 0], [0, 1, 1]], bool)) == [0, 2, 2, 2]
    assert cvat_rle(np.array([[0, 1], [1, 1]], bool)) == [1, 3]
    assert cvat_rle(np.zeros((0, 0), bool)) == []


# --------------------------------------------------------------------------- runs, edge cases


def test_empty_labels_write_valid_files_without_objects(tmp_path: Path) -> None:
    written = _export(tmp_path, {"empty.png": np.zeros((20, 30), np.uint8)}, ALL)
    coco = COCO(str(written["coco"]))
    assert coco.getImgIds() == [1] and coco.getAnnIds() == []
    assert json.loads((tmp_path / "empty_polygons.json").read_text())["objects"] == []
    assert json.loads((tmp_path / "empty_masks/index.json").read_text())["files"] == {}
    assert (tmp_path / "yolo/labels/empty.txt").read_text() == ""
    assert json.loads(written["labelstudio"].read_text())[0]["predictions"][0]["result"] == []
    assert ET.parse(written["cvat"]).getroot().find("image").findall("mask") == []


def test_more_than_255_classes_in_16_bit_labels(tmp_path: Path) -> None:
    classes = ["background"] + [f"class {i}" for i in range(1, 300)]
    labels = _smooth_labels(48, 64, 300, seed=7)
    labels[0, :] = 299
    assert labels.dtype == np.uint16 and labels.max() == 299
    written = _export(tmp_path, {"many.png": labels}, ALL, classes=classes, polygon_tolerance=0)
    coco = COCO(str(written["coco"]))
    np.testing.assert_array_equal(_coco_labels(coco, 1), labels)
    index = json.loads((tmp_path / "many_masks/index.json").read_text())
    assert "299_class_299.png" in index["files"]
    for name, entry in index["files"].items():
        png = np.array(Image.open(tmp_path / "many_masks" / name))
        np.testing.assert_array_equal(png == 255, labels == entry["mask_value"])
    document = json.loads((tmp_path / "many_polygons.json").read_text())
    np.testing.assert_array_equal(rasterize(read_polygons(document), *labels.shape), labels)
    names = yaml.safe_load(written["yolo_data"].read_text())["names"]
    assert len(names) == 299 and names[298] == "class 299"


def test_skipped_images_are_in_run_files_without_rewriting_their_image_files(tmp_path: Path) -> None:
    session = ExportSession(tmp_path, ALL, CLASSES, True, polygon_tolerance=0)
    scene = _scene()
    session.write_image(Path("a.jpg"), "a.jpg", scene)
    session.add_existing(Path("b.jpg"), "b.jpg", scene[::-1])
    written = session.finish()
    assert not any(path.exists() for path in session.image_outputs("b.jpg").values())
    coco = COCO(str(written["coco"]))
    assert [i["file_name"] for i in coco.dataset["images"]] == ["a.jpg", "b.jpg"]
    np.testing.assert_array_equal(_coco_labels(coco, 2), scene[::-1])
    assert len(json.loads(written["labelstudio"].read_text())) == 2
    assert len(ET.parse(written["cvat"]).getroot().findall("image")) == 2
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]  # every file renamed into place


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    session = ExportSession(tmp_path, ["coco", "masks"], CLASSES, True)
    with pytest.raises(S2ClipError, match="class 4, outside the 4 classes"):
        session.write_image(Path("a.jpg"), "a.jpg", np.full((2, 2), 4, np.uint8))
    for name in ("../a.png", "a/../b.png", "..", "", "/etc/a.png", "a//b.png", "a\\b.png", "./a.png", "a/"):
        with pytest.raises(S2ClipError, match="not a relative path inside the output folder"):
            session.write_image(Path("a.jpg"), name, np.zeros((2, 2), np.uint8))
    with pytest.raises(S2ClipError, match="unknown export format"):
        ExportSession(tmp_path, ["json"], CLASSES, True)
    with pytest.raises(S2ClipError, match="without class names"):
        ExportSession(tmp_path, ["coco"], [], True)
    assert list(tmp_path.iterdir()) == []


def test_image_outputs_name_only_per_image_files(tmp_path: Path) -> None:
    assert ExportSession(tmp_path, ["coco", "labelstudio", "cvat"], CLASSES, True).image_outputs("a.png") == {}
    session = ExportSession(tmp_path, ALL, CLASSES, True)
    assert session.image_outputs("a.png") == {
        "polygons": tmp_path / "a_polygons.json", "masks": tmp_path / "a_masks" / "index.json",
        "yolo": tmp_path / "yolo" / "labels" / "a.txt"}
    # an image in a sub-folder: the folders mirrored, as the mask PNG's (trip/a_mask.png)
    assert session.image_outputs("trip/a.tar.gz") == {
        "polygons": tmp_path / "trip" / "a.tar_polygons.json", "masks": tmp_path / "trip" / "a.tar_masks" / "index.json",
        "yolo": tmp_path / "yolo" / "labels" / "trip" / "a.tar.txt"}
    assert session.image_folders("trip/a.png") == {"masks": tmp_path / "trip" / "a_masks"}


def test_masks_never_follow_a_symlinked_folder(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "a_masks").symlink_to(elsewhere, target_is_directory=True)
    session = ExportSession(out, ["masks"], CLASSES, True)
    with pytest.raises(S2ClipError, match="not a folder"):
        session.write_image(Path("a.jpg"), "a.jpg", _scene())
    # nor a linked sub-folder, for any per-image file
    (out / "trip").symlink_to(elsewhere, target_is_directory=True)
    for fmt in ("masks", "polygons"):
        with pytest.raises(S2ClipError, match="trip: it is not a folder"):
            ExportSession(out, [fmt], CLASSES, True).write_image(Path("b.jpg"), "trip/b.jpg", _scene())
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.int64, np.uint64])
def test_any_integer_dtype_exports_the_same(tmp_path: Path, dtype: type) -> None:
    scene = _scene()
    written = _export(tmp_path, {"scene.png": scene.astype(dtype)}, ["coco", "cvat"])
    np.testing.assert_array_equal(_coco_labels(COCO(str(written["coco"])), 1), scene)
    assert len(ET.parse(written["cvat"]).getroot().find("image").findall("mask")) == 11


# --------------------------------------------------------------------------- names and ids (issue 26)


def _cvat_items(xml: Path, images_root: Path) -> dict[str, ET.Element]:
    """The ``<image>`` elements of a CVAT 1.1 file by item id, under the rule CVAT and Datumaro's
    CVAT importer apply: each name is the frame's path relative to the task's root (an image that
    exists there), and item ids (the name without its extension) are unique — Datumaro refuses a
    file that repeats one (``RepeatedItemError``), CVAT would put one image's masks on the other."""
    items: dict[str, ET.Element] = {}
    for element in ET.parse(xml).getroot().iter("image"):
        name = element.get("name")
        assert not Path(name).is_absolute() and ".." not in Path(name).parts, name
        assert (images_root / name).is_file(), f"no frame named {name}"
        item_id = str(Path(name).with_suffix(""))
        assert item_id not in items, f"item {item_id!r} repeated"
        items[item_id] = element
    return items


def test_equal_file_names_in_different_folders_stay_apart_in_every_format(tmp_path: Path) -> None:
    photos, out = tmp_path / "photos", tmp_path / "out"
    first, second = _scene(), _smooth_labels(30, 40, len(CLASSES), seed=8)
    for name in ("street.png", "trip/street.png"):
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        (photos / name).write_bytes(b"an image")
    session = ExportSession(out, ALL, CLASSES, True, polygon_tolerance=0)
    session.write_image(photos / "trip/street.png", "trip/street.png", second)  # any order
    session.write_image(photos / "street.png", "street.png", first)
    written = session.finish()
    truth = {"street.png": first, "trip/street.png": second}
    coco = COCO(str(written["coco"]))
    assert [i["file_name"] for i in coco.dataset["images"]] == ["street.png", "trip/street.png"]
    for image in coco.dataset["images"]:
        np.testing.assert_array_equal(_coco_labels(coco, image["id"]), truth[image["file_name"]])
    items = _cvat_items(written["cvat"], photos)
    assert sorted(items) == ["street", "trip/street"]
    for element in items.values():
        labels = truth[element.get("name")]
        rebuilt = np.zeros_like(labels)
        for mask in element.iter("mask"):
            rebuilt[_decode_cvat_mask(mask, *labels.shape)] = CLASSES.index(mask.get("label"))
        np.testing.assert_array_equal(rebuilt, labels)
    tasks = json.loads(written["labelstudio"].read_text(encoding="utf-8"))
    assert [t["data"]["image"] for t in tasks] == ["street.png", "trip/street.png"]
    ids = [r["id"] for t in tasks for r in t["predictions"][0]["result"]]
    assert len(ids) == len(set(ids))
    for stem, labels in (("street", first), ("trip/street", second)):
        document = json.loads((out / f"{stem}_polygons.json").read_text(encoding="utf-8"))
        np.testing.assert_array_equal(rasterize(read_polygons(document), *labels.shape), labels)
        index = json.loads((out / f"{stem}_masks" / "index.json").read_text(encoding="utf-8"))
        assert document["image"] == index["image"] == f"{stem}.png"
        for file_name, entry in index["files"].items():
            png = np.array(Image.open(out / f"{stem}_masks" / file_name))
            np.testing.assert_array_equal(png == 255, labels == entry["mask_value"])
        # Ultralytics finds an image's labels by replacing /images/ with /labels/ and the suffix with .txt
        image_path = f"{out}/yolo/images/{stem}.png"
        label_path = "/labels/".join(image_path.rsplit("/images/", 1)).rsplit(".", 1)[0] + ".txt"
        assert Path(label_path).is_file()
    assert (out / "trip" / "street_polygons.json").is_file() and not list(out.glob("*__*"))


def test_run_files_are_the_same_whatever_order_images_come_in(tmp_path: Path) -> None:
    """Per-run files depend on the images, not on the order they were segmented or skipped in (a
    merge of several runs' files renumbers with the same io.naming functions)."""
    images = {"b.png": _scene(), "a/z.png": _smooth_labels(20, 30, 4, 9), "a.png": _scene()[::-1],
              "trip/day2/c.jpg": _smooth_labels(25, 20, 4, 10)}
    contents = []
    for run, order in enumerate((list(images), list(reversed(images)))):
        session = ExportSession(tmp_path / str(run), ALL, CLASSES, True)
        for k, name in enumerate(order):
            (session.write_image if k % 2 else session.add_existing)(Path("in") / name, name, images[name])
        written = session.finish()
        contents.append({key: path.read_bytes() for key, path in written.items() if key != "yolo_data"})
    assert contents[0] == contents[1]
    coco = json.loads(contents[0]["coco"])
    # by path parts, as a sorted folder walk lists them (the folder a/ before a.png)
    assert [i["file_name"] for i in coco["images"]] == ["a/z.png", "a.png", "b.png", "trip/day2/c.jpg"]
    assert [i["id"] for i in coco["images"]] == [1, 2, 3, 4]
    assert [a["id"] for a in coco["annotations"]] == list(range(1, len(coco["annotations"]) + 1))


def test_a_discarded_image_leaves_the_run_files(tmp_path: Path) -> None:
    session = ExportSession(tmp_path, ALL, CLASSES, True)
    session.write_image(Path("a.png"), "a.png", _scene())
    session.write_image(Path("b.png"), "b.png", _scene())
    session.discard("a.png")
    written = session.finish()
    assert [i["file_name"] for i in json.loads(written["coco"].read_text())["images"]] == ["b.png"]
    assert [t["data"]["image"] for t in json.loads(written["labelstudio"].read_text())] == ["b.png"]
    assert [i.get("name") for i in ET.parse(written["cvat"]).getroot().iter("image")] == ["b.png"]


def test_two_names_with_one_stem_are_refused(tmp_path: Path) -> None:
    session = ExportSession(tmp_path, ["coco", "polygons"], CLASSES, True)
    session.write_image(Path("a.png"), "trip/a.png", _scene())
    with pytest.raises(S2ClipError, match=r"images 'trip/a.png' and 'trip/a.jpg' would write the same export "
                                          r"files \(trip/a\)"):
        session.write_image(Path("a.jpg"), "trip/a.jpg", _scene())
    session.write_image(Path("a.png"), "trip/a.png", _scene())  # the same image again is fine


def test_without_background_ids_start_at_1_and_map_to_the_mask_values(tmp_path: Path) -> None:
    classes = ["sky", "sea", "sand"]
    labels = _smooth_labels(30, 40, 3, seed=11)
    assert set(np.unique(labels)) == {0, 1, 2}
    written = _export(tmp_path, {"beach.png": labels}, ALL, classes=classes, has_background=False,
                      polygon_tolerance=0)
    coco = COCO(str(written["coco"]))
    assert [(c["id"], c["name"], c["mask_value"]) for c in coco.dataset["categories"]] == [
        (1, "sky", 0), (2, "sea", 1), (3, "sand", 2)]
    assert min(a["category_id"] for a in coco.dataset["annotations"]) == 1
    np.testing.assert_array_equal(_coco_labels(coco, 1), labels)  # every pixel, label 0 included
    document = json.loads((tmp_path / "beach_polygons.json").read_text())
    assert {(o["category_id"], o["mask_value"]) for o in document["objects"]} == {(1, 0), (2, 1), (3, 2)}
    np.testing.assert_array_equal(rasterize(read_polygons(document), *labels.shape), labels)
    index = json.loads((tmp_path / "beach_masks" / "index.json").read_text())
    assert {name: (e["category_id"], e["mask_value"]) for name, e in index["files"].items()} == {
        "001_sky.png": (1, 0), "002_sea.png": (2, 1), "003_sand.png": (3, 2)}
    data = yaml.safe_load(written["yolo_data"].read_text())
    assert data["names"] == {0: "sky", 1: "sea", 2: "sand"}  # YOLO's own indices, from 0
    assert "class i is the value i in the" in written["yolo_data"].read_text()


def test_cvat_label_names_over_64_characters_are_refused_up_front(tmp_path: Path) -> None:
    from s2clip_cli.io.export import check_class_names

    long_name = "a very long description of a class " * 2  # 70 characters
    for formats in (["cvat"], ["png", "coco", "cvat"]):
        with pytest.raises(S2ClipError) as info:
            ExportSession(tmp_path, formats, ["background", "cat", long_name], True)
        message = str(info.value)
        assert "\n" not in message and repr(long_name) in message and "70 characters" in message
        assert "CVAT label names hold at most 64" in message and "'short; long name'" in message
    check_class_names(["cvat"], ["background", "x" * 64, "猫" * 64], True)  # characters, not bytes
    with pytest.raises(S2ClipError, match="65 characters"):
        check_class_names(["cvat"], ["x" * 65], False)
    check_class_names(["cvat"], ["b" * 99, "cat"], True)  # the background is not a CVAT label
    for fmt in ("coco", "polygons", "masks", "yolo", "labelstudio"):  # no limit there
        ExportSession(tmp_path, [fmt], ["background", long_name * 4], True)
    with pytest.raises(S2ClipError, match="XML"):
        check_class_names(["labelstudio"], ["bg", "bell\x07"], True)
    assert list(tmp_path.iterdir()) == []


def test_image_names_xml_or_utf_8_cannot_carry_fail_alone(tmp_path: Path) -> None:
    session = ExportSession(tmp_path, ["cvat", "coco"], CLASSES, True)
    with pytest.raises(S2ClipError, match="image name 'bell\\\\x07.png' holds a control character"):
        session.write_image(Path("bell\x07.png"), "bell\x07.png", _scene())
    undecodable = os.fsdecode(b"caf\xe9.png")
    with pytest.raises(S2ClipError, match="not UTF-8"):
        session.write_image(Path(undecodable), undecodable, _scene())
    session.write_image(Path("ok.png"), "ok.png", _scene())
    written = session.finish()
    assert [i.get("name") for i in ET.parse(written["cvat"]).getroot().iter("image")] == ["ok.png"]
    ExportSession(tmp_path / "c", ["coco"], CLASSES, True).write_image(Path("x"), "bell\x07.png", _scene())


def test_naming_rules() -> None:
    from s2clip_cli.io import naming

    assert naming.image_order(["trip.png", "trip/b.png", "a.png", "B.png"]) == ["B.png", "a.png", "trip/b.png",
                                                                                  "trip.png"]
    assert naming.image_ids(["b.png", "a.png"]) == {"a.png": 1, "b.png": 2}
    assert [naming.name_stem(n) for n in ("trip/street.png", "a.tar.gz", "..png", "noext", "d.x/.hidden")] == [
        "trip/street", "a.tar", "..png", "noext", "d.x/.hidden"]
    for has_background in (True, False):
        values = range(1 if has_background else 0, 5)
        ids = [naming.category_id(v, has_background) for v in values]
        assert ids[0] == 1 and ids == list(range(1, len(ids) + 1))
        assert [naming.mask_value(i, has_background) for i in ids] == list(values)
        assert [naming.yolo_index(v, has_background) for v in values] == list(range(len(ids)))
    with pytest.raises(ValueError):
        naming.category_id(0, True)
