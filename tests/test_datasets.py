"""Dataset presets in their MMSegmentation layouts, label mappings, layout errors and class-name lists."""

from __future__ import annotations

import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from s2clip_cli.data.class_names import load_class_names, parse_class_list, preset_class_names
from s2clip_cli.data.datasets import open_dataset, read_label
from s2clip_cli.data.presets import PRESETS
from s2clip_cli.data.synthetic import write_synthetic_dataset, write_synthetic_generic
from s2clip_cli.errors import S2ClipError
from s2clip_cli.io.images import read_image

MIRROR = Path("/work/.mirror/YuHengsss+Trident/repo")
LINEAGE_FILES = {"voc21": "voc21", "voc20": "voc20", "context60": "context60", "context59": "context59",
                 "coco_object": "coco_object", "coco_stuff164k": "coco_stuff", "cityscapes": "city_scapes",
                 "ade20k": "ade20k"}


def _raw(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int64)


@pytest.mark.parametrize("name", list(PRESETS))
def test_synthetic_preset_loads_with_its_label_mapping(tmp_path: Path, name: str) -> None:
    preset = PRESETS[name]
    root = write_synthetic_dataset(name, tmp_path / name, n_images=3, size=(40, 56), seed=1)
    ds = open_dataset(name, root)
    assert ds.name == name and ds.preset is preset and len(ds) == 3 and len(ds.sample_ids) == 3
    assert len(ds.class_names) == preset.num_classes
    for i in range(len(ds)):
        layout = PRESETS[name].layout
        assert ds.image_path(i).name.endswith(layout.img_suffix)
        assert str(ds.label_path(i)).endswith(layout.seg_suffix) and layout.ann_dir in str(ds.label_path(i))
        raw = _raw(ds.label_path(i))
        label = ds.load_label(i)
        assert label.shape == (40, 56) and label.dtype == np.uint8
        if preset.reduce_zero_label:
            expected = np.where((raw == 0) | (raw == 255), 255, raw - 1)
        else:
            expected = raw
        np.testing.assert_array_equal(label, expected)
        valid = label[label != 255]
        assert valid.size and valid.max() < preset.num_classes
        assert (label == 255).any()
        image = read_image(ds.image_path(i))
        assert image.shape == (40, 56, 3) and image.dtype == np.uint8


def test_shared_files_voc21_voc20_and_ids(tmp_path: Path) -> None:
    root = write_synthetic_dataset("voc21", tmp_path / "VOC2012", n_images=2)
    v21, v20 = open_dataset("voc21", root), open_dataset("voc20", root)
    assert v21.sample_ids == v20.sample_ids == ["2008_000000", "2008_000001"]
    l21, l20 = v21.load_label(0), v20.load_label(0)
    np.testing.assert_array_equal(l20, np.where((l21 == 0) | (l21 == 255), 255, l21.astype(int) - 1))
    assert Image.open(v21.label_path(0)).mode == "P"  # VOC labels are palette PNGs; indices are read
    assert v21.labels[0] == "background" and v20.labels[0] == "aeroplane"


def test_cityscapes_ids_keep_city_folders(tmp_path: Path) -> None:
    ds = open_dataset("cityscapes", write_synthetic_dataset("cityscapes", tmp_path / "cs", n_images=4))
    assert ds.sample_ids == sorted(ds.sample_ids)
    assert ds.sample_ids[0] == "frankfurt/frankfurt_000000_000000"
    assert {i.split("/")[0] for i in ds.sample_ids} == {"frankfurt", "lindau", "munster"}


def test_head_subset_and_limit(tmp_path: Path) -> None:
    root = write_synthetic_dataset("ade20k", tmp_path / "ade", n_images=4)
    ds = open_dataset("ade20k", root)
    assert open_dataset("ade20k", root, limit=2).sample_ids == ds.sample_ids[:2] == ds.head(2).sample_ids
    sub = ds.subset([ds.sample_ids[3], ds.sample_ids[0]])
    assert sub.sample_ids == [ds.sample_ids[3], ds.sample_ids[0]]
    with pytest.raises(S2ClipError, match="unknown sample ids"):
        ds.subset(["nope"])


REQUIRED = [(name, entry) for name in PRESETS for entry in PRESETS[name].layout.required()]


@pytest.mark.parametrize(("name", "entry"), REQUIRED)
def test_wrong_layout_names_expected_and_missing(tmp_path: Path, name: str, entry: str) -> None:
    root = write_synthetic_dataset(name, tmp_path / "root", n_images=1, size=(16, 16))
    target = root / entry.rstrip("/")
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(S2ClipError) as info:
        open_dataset(name, root)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"{name}: expected {root / entry.rstrip('/')} (")
    assert PRESETS[name].layout.title in msg and all(e in msg for e in PRESETS[name].layout.required())
    assert msg.endswith(f"missing: {entry}")


def test_wrong_layout_lists_every_missing_entry_and_hints_subfolder(tmp_path: Path) -> None:
    write_synthetic_dataset("voc21", tmp_path / "VOCdevkit" / "VOC2012", n_images=1)
    with pytest.raises(S2ClipError) as info:
        open_dataset("voc21", tmp_path / "VOCdevkit")
    msg = str(info.value)
    assert "missing: JPEGImages/, SegmentationClass/, ImageSets/Segmentation/val.txt" in msg
    assert f"did you mean --data-root {tmp_path / 'VOCdevkit' / 'VOC2012'}" in msg
    with pytest.raises(S2ClipError, match="does not exist"):
        open_dataset("ade20k", tmp_path / "nowhere")
    with pytest.raises(S2ClipError, match="needs --data-root"):
        open_dataset("ade20k", None)
    with pytest.raises(S2ClipError, match="unknown dataset"):
        open_dataset("voc2012", tmp_path)


def test_listed_samples_with_missing_files(tmp_path: Path) -> None:
    root = write_synthetic_dataset("context59", tmp_path / "VOC2010", n_images=8, size=(16, 16))
    (root / "JPEGImages" / "2008_000002.jpg").unlink()
    for i in range(3, 8):
        (root / "SegmentationClassContext" / f"2008_00000{i}.png").unlink()
    with pytest.raises(S2ClipError) as info:
        open_dataset("context59", root)
    msg = str(info.value)
    assert "\n" not in msg and "6 of 8 samples" in msg
    assert "JPEGImages/2008_000002.jpg" in msg and "SegmentationClassContext/2008_000003.png" in msg
    assert "and 1 more" in msg  # the first five are named
    root = write_synthetic_dataset("coco_stuff164k", tmp_path / "coco", n_images=2, size=(16, 16))
    (root / "annotations" / "val2017" / "000000000002_labelTrainIds.png").unlink()
    with pytest.raises(S2ClipError, match="1 of 2 samples .* annotations/val2017/000000000002_labelTrainIds.png"):
        open_dataset("coco_stuff164k", root)
    empty = write_synthetic_dataset("ade20k", tmp_path / "ade", n_images=0)
    with pytest.raises(S2ClipError, match=r"no \*\.jpg images"):
        open_dataset("ade20k", empty)


def test_coco_object_reads_instance_ids_not_stuff(tmp_path: Path) -> None:
    root = write_synthetic_dataset("coco_object", tmp_path / "coco", n_images=1)
    stuff = root / "annotations" / "val2017" / "000000000001_labelTrainIds.png"
    Image.fromarray(np.full((64, 96), 7, np.uint8)).save(stuff)  # a stuff label beside it: not read
    ds = open_dataset("coco_object", root)
    assert ds.label_path(0).name == "000000000001_instanceTrainIds.png"
    assert not (ds.load_label(0) == 7).all()


def test_custom_dataset(tmp_path: Path) -> None:
    paths = write_synthetic_generic(tmp_path / "gen", n_images=3, num_classes=4)
    ds = open_dataset("custom", None, images=paths.images, masks=paths.masks, class_names=paths.class_names)
    assert ds.sample_ids == ["img_000", "img_001", "img_002"]
    assert ds.class_names == [["sky", "heaven"], ["tree"], ["road", "street"], ["car"]]
    p = ds.preset
    assert (p.has_background, p.short_side, p.stride, p.prob_thd, p.num_classes) == (False, 448, 224, 0.0, 4)
    np.testing.assert_array_equal(ds.load_label(1), _raw(paths.masks / "img_001.png"))
    assert ds.image_path(1).suffix == ".png" and ds.image_path(0).suffix == ".jpg"
    rz = open_dataset(None, None, images=paths.images, masks=paths.masks, class_names=paths.class_names,
                      reduce_zero_label=True)
    assert rz.preset.reduce_zero_label and (rz.load_label(0) == 255).sum() > (ds.load_label(0) == 255).sum()
    (paths.masks / "img_002.png").unlink()
    with pytest.raises(S2ClipError, match="1 of 3 images have no mask .*: img_002"):
        open_dataset("custom", None, images=paths.images, masks=paths.masks, class_names=paths.class_names)
    with pytest.raises(S2ClipError, match="needs --images"):
        open_dataset("custom", None, images=paths.images)
    with pytest.raises(S2ClipError, match="does not exist"):
        open_dataset("custom", None, images=tmp_path / "x", masks=paths.masks, class_names=paths.class_names)


def test_colour_label_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(S2ClipError, match="single-channel"):
        read_label(tmp_path / "rgb.png", False)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(S2ClipError, match="cannot read"):
        read_label(tmp_path / "bad.png", False)


@pytest.mark.parametrize("name", list(PRESETS))
def test_packaged_class_names(name: str) -> None:
    classes = preset_class_names(name)
    assert len(classes) == PRESETS[name].num_classes
    assert load_class_names(name) == classes
    assert all(n and n == n.strip() for names in classes for n in names)
    if PRESETS[name].has_background and name != "context60":
        assert len(classes[0]) > 5  # the background's stuff names
    if MIRROR.is_dir():  # the lineage's file, same content
        text = subprocess.run(["git", "-C", str(MIRROR), "show", f"HEAD:configs/cls_{LINEAGE_FILES[name]}.txt"],
                              capture_output=True, text=True, check=True).stdout
        assert classes == [[n.strip() for n in line.split(";")] for line in text.splitlines() if line.strip()]


def test_parse_class_list(tmp_path: Path) -> None:
    assert parse_class_list("cat,dog; puppy") == [["cat"], ["dog", "puppy"]]
    assert parse_class_list(" cat , dog ") == [["cat"], ["dog"]]
    f = tmp_path / "c.txt"
    f.write_text("\ufeffcar\nbicycle; bike\n\nperson\n", encoding="utf-8")
    assert parse_class_list(f"@{f}") == [["car"], ["bicycle", "bike"], ["person"]]
    assert load_class_names(f) == parse_class_list(f"@{f}")
    for spec, match in [("", "no class names"), ("  ", "no class names"), ("cat,,dog", "empty class name"),
                        ("cat,dog;", "empty class name"), ("cat,Cat", "duplicate"), ("dog; puppy,Puppy", "duplicate"),
                        ("@", "no file name"), (f"@{tmp_path / 'missing.txt'}", "does not exist"),
                        (f"@{tmp_path}", "directory")]:
        with pytest.raises(S2ClipError, match=match):
            parse_class_list(spec)
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(S2ClipError, match="no class names"):
        parse_class_list(f"@{tmp_path / 'empty.txt'}")
    (tmp_path / "dup.txt").write_text("cat\nCAT\n")
    with pytest.raises(S2ClipError, match="duplicate class name 'CAT'"):
        parse_class_list(f"@{tmp_path / 'dup.txt'}")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\xfa")
    with pytest.raises(S2ClipError, match="cannot read"):
        parse_class_list(f"@{tmp_path / 'bin.txt'}")


def test_preset_class_name_override(tmp_path: Path) -> None:
    root = write_synthetic_dataset("cityscapes", tmp_path / "cs", n_images=1, size=(16, 16))
    names = [[f"c{i}"] for i in range(19)]
    assert open_dataset("cityscapes", root, class_names=names).class_names == names
    with pytest.raises(S2ClipError, match="19 classes"):
        open_dataset("cityscapes", root, class_names=names[:3])


# ------------------------------------------------------------------------------------ hostile files


def test_an_id_listed_twice_is_kept_once_with_a_notice(tmp_path: Path) -> None:
    root = write_synthetic_dataset("voc21", tmp_path / "VOC2012", n_images=3, size=(16, 16))
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    ids = split.read_text().split()
    split.write_text("\n".join([*ids, ids[0], ids[2], ids[0]]) + "\n")
    ds = open_dataset("voc21", root)
    assert ds.sample_ids == ids  # first occurrences, in order
    assert len(ds.notices) == 1
    notice = ds.notices[0]
    assert str(split) in notice and "2 sample id(s) more than once" in notice and f"{ids[0]}, {ids[2]}" in notice
    assert "(3 samples, not 6)" in notice
    assert ds.head(1).notices == ds.notices  # kept through head/subset
    clean = write_synthetic_dataset("voc21", tmp_path / "clean", n_images=3, size=(16, 16))
    assert open_dataset("voc21", clean).notices == ()


@pytest.mark.parametrize("bad_id", ["../../ESCAPED", "/etc/passwd", "a/../../b", "a\\..\\b", "x\x00y", "./x", "a//b"])
def test_split_ids_that_are_not_plain_names_are_refused(tmp_path: Path, bad_id: str) -> None:
    root = write_synthetic_dataset("voc21", tmp_path / "VOC2012", n_images=2, size=(16, 16))
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    split.write_text(split.read_text() + bad_id + "\n")
    with pytest.raises(S2ClipError, match="not a plain sample name") as info:
        open_dataset("voc21", root)
    assert str(split) in str(info.value) and "(id 3)" in str(info.value) and "\n" not in str(info.value)


def test_split_file_that_is_a_fifo_or_too_big_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    import s2clip_cli.data.datasets as datasets

    root = write_synthetic_dataset("voc21", tmp_path / "VOC2012", n_images=2, size=(16, 16))
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    monkeypatch.setattr(datasets, "SPLIT_MAX_BYTES", 10)
    with pytest.raises(S2ClipError, match=r"val\.txt is \d+ bytes; a split list is at most 10"):
        open_dataset("voc21", root)
    split.unlink()
    os.mkfifo(split)  # reading it would block forever
    with pytest.raises(S2ClipError, match="val.txt"):
        open_dataset("voc21", root)
    split.unlink()
    split.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(S2ClipError, match=r"cannot read .*val\.txt"):
        open_dataset("voc21", root)


def test_masks_without_an_image_are_named_in_a_notice(tmp_path: Path) -> None:
    paths = write_synthetic_generic(tmp_path / "gen", n_images=2, num_classes=3)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(paths.masks / "stray.png")
    ds = open_dataset("custom", None, images=paths.images, masks=paths.masks, class_names=paths.class_names)
    assert len(ds) == 2 and len(ds.notices) == 1
    assert "1 of 3 masks in" in ds.notices[0] and "stray.png" in ds.notices[0] and str(paths.masks) in ds.notices[0]


def test_class_name_file_that_is_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    import os

    paths = write_synthetic_generic(tmp_path / "gen", n_images=1, num_classes=3)
    fifo = tmp_path / "classes.txt"
    os.mkfifo(fifo)
    for names in (fifo, Path("/dev/zero")):
        with pytest.raises(S2ClipError, match="is not a regular file"):
            open_dataset("custom", None, images=paths.images, masks=paths.masks, class_names=names)
    with pytest.raises(S2ClipError, match="not a regular file"):
        parse_class_list(f"@{fifo}")


def test_hostile_label_files_are_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    bomb = tmp_path / "bomb.png"  # 60 bytes declaring 400 Mpx: over PIL's decompression-bomb limit

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))
    for path, reason in ((truncated, "cannot read label"), (bomb, "too large to be a label map")):
        with pytest.raises(S2ClipError, match=reason) as info:
            read_label(path, False)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_label_is_decoded_only_as_png_tiff_or_bmp(tmp_path: Path) -> None:
    eps = tmp_path / "label.png"  # an EPS under a label's name: PIL would hand it to Ghostscript
    eps.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n")
    with pytest.raises(S2ClipError, match="not a PNG, TIFF or BMP label map") as info:
        read_label(eps, False)
    assert str(eps) in str(info.value)
    gif = tmp_path / "label2.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(gif, format="GIF")
    with pytest.raises(S2ClipError, match="not a PNG, TIFF or BMP"):
        read_label(gif, False)
    for fmt in ("PNG", "TIFF", "BMP"):
        path = tmp_path / f"ok.{fmt.lower()}"
        Image.fromarray(np.full((4, 4), 3, np.uint8)).save(path, format=fmt)
        assert (read_label(path, False) == 3).all()


def test_a_class_file_too_long_to_evaluate_is_refused_before_any_matrix(tmp_path: Path) -> None:
    from s2clip_cli.data.datasets import MAX_EVAL_CLASSES

    paths = write_synthetic_generic(tmp_path / "gen", n_images=1, num_classes=3)
    many = tmp_path / "many.txt"
    many.write_text("".join(f"class {i}\n" for i in range(MAX_EVAL_CLASSES + 1)))  # 40 KB; K^2 int64: 128 MiB+
    with pytest.raises(S2ClipError, match=f"names {MAX_EVAL_CLASSES + 1} classes.*at most {MAX_EVAL_CLASSES}") as info:
        open_dataset("custom", None, images=paths.images, masks=paths.masks, class_names=many)
    assert str(many) in str(info.value)
