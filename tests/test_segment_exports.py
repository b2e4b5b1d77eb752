"""`segment --format …` on a tree as users have them (issue 26): two images with one file name in
different folders and a video, every format read back by the tools people load them into and
compared with the mask PNG pixel for pixel; category ids from 1 without a background; class names
over a format's limits refused before any model loads; inputs whose outputs would mix refused."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from segment_helpers import reuse_segmenters, save_image, segment  # noqa: F401 - fixture
from test_segment_inputs import write_video

from s2clip_cli.io.export.polygons import rasterize, read_polygons

EVERY_FORMAT = "png,coco,polygons,masks,yolo,labelstudio,cvat"
CLASSES = "cat,dog,tree"


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _decode_cvat(element: ET.Element, height: int, width: int) -> np.ndarray:
    """A CVAT ``<mask>`` on its image: the run lengths (0s first) over its box, row by row."""
    runs = [int(v) for v in element.get("rle").split(",")]
    left, top, w, h = (int(element.get(k)) for k in ("left", "top", "width", "height"))
    canvas = np.zeros((height, width), bool)
    canvas[top : top + h, left : left + w] = np.repeat(np.arange(len(runs)) % 2, runs).reshape(h, w).astype(bool)
    return canvas


def _tree(root: Path) -> None:
    save_image(root / "street.png", (40, 50), seed=1)
    save_image(root / "trip" / "street.png", (36, 44), seed=2)
    (root / "trip").mkdir(exist_ok=True)
    write_video(root / "trip" / "clip.mp4", 3)


@pytest.fixture()
def fake_ramp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Labels that cover every class of the run (random tiny models often give one class only)."""
    from s2clip_cli.pipeline.segmenter import Segmenter

    real_finish = Segmenter.finish

    def finish(self: Segmenter, image: np.ndarray, *args: object, **kwargs: object) -> object:
        result = real_finish(self, image, *args, **kwargs)
        h, w = result.labels.shape
        rows, cols = np.mgrid[0:h, 0:w]
        result.labels = ((rows // 7 + cols // 9 + int(image.sum()) % 3) % self.queries.num_classes).astype(np.int64)
        return result

    monkeypatch.setattr(Segmenter, "finish", finish)


def test_every_format_with_equal_file_names_and_a_video(tmp_path: Path, fake_ramp: None) -> None:
    from label_studio_converter.brush import decode_rle

    photos, out = tmp_path / "photos", tmp_path / "out"
    _tree(photos)
    code, _, stderr = segment(str(photos), "-r", "--format", EVERY_FORMAT, "--polygon-tolerance", "0",
                              "-o", str(out), classes=CLASSES)
    assert code == 0, stderr
    assert "done 3, skipped 0, failed 0" in stderr
    names = ["street.png", "trip/street.png"]  # the images' paths relative to the input root
    record = json.loads((out / "street.json").read_text())
    classes = record["classes"]
    assert classes == ["background", "cat", "dog", "tree"]
    truth = {name: np.array(Image.open(out / name.replace(".png", "_mask.png"))) for name in names}
    assert all(len(np.unique(labels)) == 4 for labels in truth.values())
    assert json.loads((out / "trip" / "street.json").read_text())["image"] == str(photos / "trip" / "street.png")

    # COCO (pycocotools): file_name unique, ids from 1, mask_value maps back to the PNG
    coco = COCO(str(out / "coco.json"))
    assert [(i["id"], i["file_name"]) for i in coco.dataset["images"]] == [(1, names[0]), (2, names[1])]
    values = {c["id"]: c["mask_value"] for c in coco.dataset["categories"]}
    assert values == {1: 1, 2: 2, 3: 3}
    for image in coco.dataset["images"]:
        rebuilt = np.zeros((image["height"], image["width"]), np.int64)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]])):
            rebuilt[coco.annToMask(ann) > 0] = values[ann["category_id"]]
        np.testing.assert_array_equal(rebuilt, truth[image["file_name"]])

    # Label Studio (label-studio-converter's decoder): one task per name
    tasks = json.loads((out / "labelstudio.json").read_text())
    assert [t["data"]["image"] for t in tasks] == names
    for task in tasks:
        labels = truth[task["data"]["image"]]
        rebuilt = np.zeros_like(labels)
        for result in task["predictions"][0]["result"]:
            alpha = decode_rle(result["value"]["rle"]).reshape(*labels.shape, 4)[..., 3]
            rebuilt[alpha > 0] = classes.index(result["value"]["brushlabels"][0])
        np.testing.assert_array_equal(rebuilt, labels)

    # CVAT: names are frames' paths relative to the root, item ids unique (Datumaro's rule)
    images = ET.parse(out / "cvat.xml").getroot().findall("image")
    assert [(i.get("id"), i.get("name")) for i in images] == [("0", names[0]), ("1", names[1])]
    assert len({os.path.splitext(i.get("name"))[0] for i in images}) == 2
    for image in images:
        assert (photos / image.get("name")).is_file()
        labels = truth[image.get("name")]
        rebuilt = np.zeros_like(labels)
        for mask in image.iter("mask"):
            area = _decode_cvat(mask, *labels.shape)
            assert not rebuilt[area].any()
            rebuilt[area] = classes.index(mask.get("label"))
        np.testing.assert_array_equal(rebuilt, labels)

    # per-image files: folders mirrored; polygons (tolerance 0) and class masks give the PNG back
    for name, labels in truth.items():
        stem = name.removesuffix(".png")
        document = json.loads((out / f"{stem}_polygons.json").read_text())
        assert document["image"] == name
        np.testing.assert_array_equal(rasterize(read_polygons(document), *labels.shape), labels)
        index = json.loads((out / f"{stem}_masks" / "index.json").read_text())
        rebuilt = np.zeros_like(labels)
        for file_name, entry in index["files"].items():
            assert file_name.startswith(f"{entry['category_id']:03d}_")
            rebuilt[np.array(Image.open(out / f"{stem}_masks" / file_name)) == 255] = entry["mask_value"]
        np.testing.assert_array_equal(rebuilt, labels)
        lines = (out / "yolo" / "labels" / f"{stem}.txt").read_text().splitlines()  # yolo/images/<name>'s labels
        assert lines and {int(line.split()[0]) for line in lines} == {0, 1, 2}
    assert not list(out.rglob("*__*"))

    # the video: frame masks named by the video's own folder and the frame index, not exported
    video = json.loads((out / "trip" / "clip.json").read_text())
    frame_masks = [Path(f["mask"]) for f in video["frames"]]
    assert [p.relative_to(out).as_posix() for p in frame_masks] == [
        f"trip/clip_frames/clip_{i:06d}_mask.png" for i in range(3)]
    assert all(p.is_file() for p in frame_masks)
    assert "clip" not in json.dumps(coco.dataset["images"])


def test_no_background_coco_ids_start_at_1_and_map_back(tmp_path: Path, fake_ramp: None) -> None:
    save_image(tmp_path / "in" / "a.png", seed=3)
    out = tmp_path / "out"
    code, _, stderr = segment(str(tmp_path / "in" / "a.png"), "--no-background", "--format", "coco,masks",
                              "-o", str(out), classes=CLASSES)
    assert code == 0, stderr
    labels = np.array(Image.open(out / "a_mask.png"))
    assert set(np.unique(labels)) == {0, 1, 2}  # mask value 0 is a class here ("cat")
    coco = COCO(str(out / "coco.json"))
    assert [(c["id"], c["name"], c["mask_value"]) for c in coco.dataset["categories"]] == [
        (1, "cat", 0), (2, "dog", 1), (3, "tree", 2)]
    assert {a["category_id"] for a in coco.dataset["annotations"]} == {1, 2, 3}
    values = {c["id"]: c["mask_value"] for c in coco.dataset["categories"]}
    rebuilt = np.full(labels.shape, -1)
    for ann in coco.loadAnns(coco.getAnnIds()):
        rebuilt[coco.annToMask(ann) > 0] = values[ann["category_id"]]
    np.testing.assert_array_equal(rebuilt, labels)
    index = json.loads((out / "a_masks" / "index.json").read_text())
    assert sorted(index["files"]) == ["001_cat.png", "002_dog.png", "003_tree.png"]


@pytest.fixture()
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    from s2clip_cli.pipeline.segmenter import Segmenter

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("models were built")

    monkeypatch.setattr(Segmenter, "build", no_build)


def test_a_class_name_over_cvat_limit_stops_before_models_load(tmp_path: Path, no_models: None) -> None:
    save_image(tmp_path / "a.png")
    long_name = "a dog sleeping on a sofa in the living room next to a big windows"  # 65 characters
    out = tmp_path / "out"
    code, stdout, stderr = segment(str(tmp_path / "a.png"), "--format", "png,coco,cvat", "-o", str(out),
                                   classes=f"cat,{long_name}")
    assert code == 2
    assert _errors(stderr) == [f"error: class name {long_name!r} has 65 characters; CVAT label names hold at most 64 "
                               "(--format cvat): put a shorter name first and keep the long one as a synonym "
                               "('short; long name')"]
    assert not out.exists()  # nothing written, not even the folder
    # the remedy: a short name first, the long one as its synonym, is within the limit
    from s2clip_cli.commands.segment import check_export_classes

    check_export_classes(("cvat",), [["cat"], ["dog", long_name]], None)


def test_inputs_that_would_write_into_each_others_folders_are_refused(tmp_path: Path, no_models: None) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    write_video(photos / "clip.mp4", 2)
    save_image(photos / "clip_frames" / "clip_000000.png")  # would land among clip.mp4's frame masks
    code, _, stderr = segment(str(photos), "-r", "-o", str(tmp_path / "out"))
    assert code == 2
    assert _errors(stderr) == [f"error: {photos / 'clip_frames' / 'clip_000000.png'} would write "
                               f"{tmp_path / 'out' / 'clip_frames' / 'clip_000000_mask.png'} into "
                               f"{tmp_path / 'out' / 'clip_frames'}, which holds the outputs of "
                               f"{photos / 'clip.mp4'}; rename one of them"]
    other = tmp_path / "other"
    save_image(other / "a.png")
    save_image(other / "a_masks" / "001_cat.png")  # inside a.png's class-mask folder (no index.json yet)
    code, _, stderr = segment(str(other), "-r", "--format", "masks", "-o", str(tmp_path / "out2"))
    assert code == 2 and len(_errors(stderr)) == 1 and "which holds the outputs of" in stderr, stderr
    assert not (tmp_path / "out2").exists() or not any((tmp_path / "out2").iterdir())
