"""Each bad download gives one clear `S2ClipError` line naming the file: a missing archive, a
truncated zip or tar, a raw value that cannot occur, an image without its label."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from raw_samples import SAMPLES, RawSample, city_polygons, cityscapes_sample, context_sample, png, rect

from s2clip_cli.data.prepare import prepare
from s2clip_cli.errors import S2ClipError


def _fails(sample: RawSample, tmp_path: Path, name: str, *, archives: bool, **kw) -> str:
    from raw_samples import pack

    raw = pack(sample, tmp_path / "raw", archives=archives, **kw)
    with pytest.raises(S2ClipError) as err:
        prepare(name, raw, tmp_path / "out", workers=0)
    message = str(err.value)
    assert "\n" not in message and message.strip() == message
    return message


def test_missing_archive_names_the_download(tmp_path: Path) -> None:
    sample = SAMPLES["coco_stuff164k"]()
    sample.parts = sample.parts[:1]  # val2017.zip only
    message = _fails(sample, tmp_path, "coco_stuff164k", archives=True)
    assert "stuffthingmaps_trainval2017.zip" in message and str(tmp_path / "raw") in message
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(S2ClipError, match="VOCtrainval_11-May-2012.tar"):
        prepare("voc21", empty, tmp_path / "out2")
    with pytest.raises(S2ClipError, match="does not exist"):
        prepare("ade20k", tmp_path / "nowhere", tmp_path / "out3")
    context = context_sample()
    context.parts = context.parts[:1]  # no trainval_merged.json
    assert "trainval_merged.json" in _fails(context, tmp_path / "ctx", "context59", archives=True)


def test_truncated_zip_is_named(tmp_path: Path) -> None:
    from raw_samples import pack

    raw = pack(SAMPLES["ade20k"](), tmp_path / "raw", archives=True)
    zip_path = raw / "ADEChallengeData2016.zip"
    zip_path.write_bytes(zip_path.read_bytes()[: zip_path.stat().st_size // 2])
    with pytest.raises(S2ClipError) as err:
        prepare("ade20k", raw, tmp_path / "out")
    message = str(err.value)
    assert str(zip_path) in message and "truncated or damaged" in message and "\n" not in message


def test_truncated_tar_is_named(tmp_path: Path) -> None:
    import tarfile

    from raw_samples import pack

    raw = pack(SAMPLES["voc21"](), tmp_path / "raw", archives=True)
    tar_path = raw / "VOCtrainval_11-May-2012.tar"
    data = tar_path.read_bytes()
    with tarfile.open(tar_path) as tf:  # cut inside a val label: the download is unusable
        member = next(m for m in tf.getmembers() if m.name.endswith("SegmentationClass/2007_000033.png"))
    tar_path.write_bytes(data[: member.offset_data + 50])
    with pytest.raises(S2ClipError) as err:
        prepare("voc21", raw, tmp_path / "out")
    message = str(err.value)
    assert str(tar_path) in message and "is truncated" in message and "download it again" in message
    assert "\n" not in message


@pytest.mark.parametrize("archives", [False, True], ids=["folders", "archives"])
def test_unknown_raw_values_name_file_and_value(tmp_path: Path, archives: bool) -> None:
    voc = SAMPLES["voc21"]()
    part, member = voc.member("SegmentationClass/2007_000033.png")
    part.members[member] = png(np.full((7, 10), 30), palette=True)
    message = _fails(voc, tmp_path / "voc", "voc21", archives=archives)
    assert "2007_000033.png" in message and "raw value 30 " in message

    coco = SAMPLES["coco_stuff164k"]()
    part, member = coco.member("val2017/000000000285.png")
    part.members[member] = png(np.resize(np.array([0, 11], np.uint8), (6, 8)))  # 11: street sign, never annotated
    message = _fails(coco, tmp_path / "coco", "coco_object", archives=archives)
    assert "000000000285.png" in message and "raw value 11 " in message

    ade = SAMPLES["ade20k"]()
    part, member = ade.member("validation/ADE_val_00000002.png")
    part.members[member] = png(np.full((5, 7), 151))
    message = _fails(ade, tmp_path / "ade", "ade20k", archives=archives)
    assert "ADE_val_00000002.png" in message and "raw value 151 " in message

    extra = [{"id": 8, "image_id": 2008000003, "category_id": 1, "iscrowd": 0,  # accordion: not among the 59
              "segmentation": {"size": [4, 5], "counts": "31309"}}]
    message = _fails(context_sample(extra), tmp_path / "ctx", "context60", archives=archives)
    assert "trainval_merged.json" in message and "2008_000003.jpg" in message and "raw value 1 " in message

    city = cityscapes_sample(("unicorn", rect(0, 0, 2, 2), 0))
    message = _fails(city, tmp_path / "city", "cityscapes", archives=archives)
    assert "frankfurt_000000_000294_gtFine_polygons.json" in message and "'unicorn'" in message


def test_image_without_label_is_named(tmp_path: Path) -> None:
    coco = SAMPLES["coco_stuff164k"]()
    part, member = coco.member("val2017/000000000285.png")
    del part.members[member]
    message = _fails(coco, tmp_path / "coco", "coco_stuff164k", archives=True)
    assert "000000000285.jpg" in message and "has no label" in message

    voc = SAMPLES["voc21"]()
    part, member = voc.member("SegmentationClass/2007_000042.png")
    del part.members[member]
    message = _fails(voc, tmp_path / "voc", "voc21", archives=False)
    assert "2007_000042" in message and "SegmentationClass/2007_000042.png is missing" in message

    city = cityscapes_sample()
    part, member = city.member("lindau_000000_000019_gtFine_polygons.json")
    del part.members[member]
    message = _fails(city, tmp_path / "city", "cityscapes", archives=True)
    assert "lindau_000000_000019_leftImg8bit.png" in message and "has no label" in message

    ctx = context_sample()
    part, member = ctx.member("JPEGImages/2008_000005.jpg")
    del part.members[member]
    message = _fails(ctx, tmp_path / "ctx", "context59", archives=True)
    assert "2008_000005.jpg" in message and "missing" in message


def test_mismatched_sizes_and_colour_labels(tmp_path: Path) -> None:
    ade = SAMPLES["ade20k"]()
    part, member = ade.member("validation/ADE_val_00000002.png")
    part.members[member] = png(np.zeros((6, 7)))
    message = _fails(ade, tmp_path / "ade", "ade20k", archives=False)
    assert "ADE_val_00000002.png is 7x6 but its image" in message

    voc = SAMPLES["voc21"]()
    part, member = voc.member("SegmentationClass/2007_000032.png")
    part.members[member] = png(np.zeros((12, 16)), rgb=True)
    message = _fails(voc, tmp_path / "voc", "voc21", archives=True)
    assert "2007_000032.png is a RGB image" in message

    city = cityscapes_sample()
    part, member = city.member("munster_000000_000019_gtFine_polygons.json")
    part.members[member] = city_polygons([], 12, 6)
    message = _fails(city, tmp_path / "city", "cityscapes", archives=False)
    assert "munster_000000_000019_gtFine_polygons.json is for a 12x6 image" in message

    ctx = context_sample()
    part, member = ctx.member("trainval_merged.json")
    part.members[member] = part.members[member][:100]
    message = _fails(ctx, tmp_path / "ctx", "context60", archives=False)
    assert "cannot parse" in message and "trainval_merged.json" in message


def test_other_preparation_in_the_same_folder_is_refused(tmp_path: Path) -> None:
    from raw_samples import pack

    raw = pack(SAMPLES["ade20k"](), tmp_path / "raw", archives=True)
    prepare("ade20k", raw, tmp_path / "out")
    voc_raw = pack(SAMPLES["voc21"](), tmp_path / "vocraw", archives=True)
    with pytest.raises(S2ClipError, match="already holds a prepared 'ade20k'"):
        prepare("voc21", voc_raw, tmp_path / "out")
    with pytest.raises(S2ClipError, match="unknown dataset"):
        prepare("pascal", raw, tmp_path / "out")
    assert json.loads((tmp_path / "out/s2clip-data.json").read_text())["preparation"] == "ade20k"


def test_a_second_prepare_on_the_same_folder_is_refused(tmp_path: Path) -> None:
    import os

    from raw_samples import pack

    from s2clip_cli.data.prepare.runner import LOCK_NAME
    from s2clip_cli.io.files import exclusive_lock

    raw = pack(SAMPLES["ade20k"](), tmp_path / "raw", archives=False)
    out = tmp_path / "out"
    with exclusive_lock(out / LOCK_NAME, str):  # a live `data prepare` holds the folder
        with pytest.raises(S2ClipError, match=rf"another `s2clip data prepare` \(pid {os.getpid()}\) is writing "
                           rf"to {out}; wait for it to finish$"):
            prepare("ade20k", raw, out, workers=0)
    (out / LOCK_NAME).write_text("99999\n")  # left by a killed run: not a live holder
    prepare("ade20k", raw, out, workers=0)
    assert not (out / LOCK_NAME).exists()
