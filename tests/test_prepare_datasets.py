"""`s2clip data prepare` on tiny fake official downloads: exact label values for every preset, from
archives (read in place) and from extracted folders, and eval's reader opens the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from raw_samples import SAMPLES, RawSample, context_sample, pack, voc_sample

from s2clip_cli.data.datasets import open_dataset
from s2clip_cli.data.prepare import prepare
from s2clip_cli.data.prepare.archives import RawIndex
from s2clip_cli.data.prepare.context import CONTEXT_IDS
from s2clip_cli.data.prepare.rle import decode_rle, rle_counts
from s2clip_cli.data.sources import MANIFEST_NAME, OFFICIAL_VAL_COUNTS, SOURCES, default_data_root

SHARED = {"voc21": ("voc21", "voc20"), "context60": ("context60", "context59"),
          "coco_stuff164k": ("coco_stuff164k", "coco_object"), "cityscapes": ("cityscapes",), "ade20k": ("ade20k",)}


def _read(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _prepared(sample: RawSample, tmp_path: Path, name: str, *, archives: bool, **kw) -> Path:
    raw = pack(sample, tmp_path / "raw", archives=archives, **kw)
    prepare(name, raw, tmp_path / "out", workers=0)
    return tmp_path / "out"


@pytest.mark.parametrize("archives", [False, True], ids=["folders", "archives"])
@pytest.mark.parametrize("name", list(SAMPLES))
def test_prepare_writes_exact_labels_and_eval_reads_them(tmp_path: Path, name: str, archives: bool) -> None:
    sample = SAMPLES[name]()
    out = _prepared(sample, tmp_path, name, archives=archives)
    for rel, expected in sample.labels.items():
        with Image.open(out / rel) as img:
            assert img.mode in ("L", "P"), rel
        np.testing.assert_array_equal(_read(out / rel), expected, err_msg=rel)
    for rel, data in sample.images.items():
        assert (out / rel).read_bytes() == data, rel  # images copied byte for byte
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["split"] == "val" and manifest["counts"]["official_val"] == OFFICIAL_VAL_COUNTS[name]
    assert set(manifest["files"]) >= set(sample.labels) | set(sample.images)
    assert manifest["versions"]["pillow"] == Image.__version__
    kinds = {s["kind"] for s in manifest["sources"]}
    assert kinds == {"folder"} if not archives else kinds - {"folder"} <= {"zip", "tar"} and kinds != {"folder"}
    for preset in SHARED[name]:  # presets sharing the files all open, with every image paired
        ds = open_dataset(preset, out)
        n_labels = len({rel.rsplit("_", 1)[0] if "coco" in name else rel for rel in sample.labels})
        assert len(ds) == n_labels
        for i in range(len(ds)):
            label = ds.load_label(i)
            image = ds.load_image(i)
            assert label.shape == image.shape[:2]


def test_voc_keeps_only_val_and_voc20_reduces(tmp_path: Path) -> None:
    out = _prepared(voc_sample(), tmp_path, "voc20", archives=True)
    assert (out / "ImageSets/Segmentation/val.txt").read_text() == "2007_000032\n2007_000033\n2007_000042\n"
    assert not (out / "JPEGImages/2007_000039.jpg").exists() and not (out / "SegmentationClass/2007_000039.png").exists()
    raw = _read(out / "SegmentationClass/2007_000032.png")
    assert set(np.unique(raw).tolist()) == {0, 1, 15, 255}
    with Image.open(out / "SegmentationClass/2007_000032.png") as img:
        assert img.mode == "P"  # copied unchanged, palette kept
    v20 = open_dataset("voc20", out)
    label = v20.load_label(v20.sample_ids.index("2007_000032"))
    expected = np.select([raw == 0, raw == 1, raw == 15], [255, 0, 14], 255)
    np.testing.assert_array_equal(label, expected)


def test_context_split_lists_and_context59(tmp_path: Path) -> None:
    out = _prepared(context_sample(), tmp_path, "context59", archives=False)
    assert (out / "ImageSets/SegmentationContext/val.txt").read_text() == \
        "2008_000002\n2008_000003\n2008_000005\n2008_000006\n"
    assert not (out / "SegmentationClassContext/2008_000004.png").exists()  # train: not prepared
    assert not (out / "JPEGImages/2009_000001.jpg").exists()
    c59 = open_dataset("context59", out)
    label = c59.load_label(c59.sample_ids.index("2008_000002"))
    np.testing.assert_array_equal(label, [[46] * 5, [55] * 5, [55] * 5, [36, 36, 255, 255, 255]])


def test_coco_both_label_kinds_and_train_untouched(tmp_path: Path) -> None:
    out = _prepared(SAMPLES["coco_stuff164k"](), tmp_path, "coco_object", archives=True)
    assert not (out / "annotations/train2017").exists()
    obj = _read(out / "annotations/val2017/000000000139_instanceTrainIds.png")
    assert 255 not in obj  # unlabeled becomes background in COCO-Object
    ds = open_dataset("coco_object", out)
    assert ds.sample_ids == ["000000000139", "000000000285"]


def test_search_finds_downloads_anywhere_and_gz_tars(tmp_path: Path) -> None:
    """Archives one level down and a gzip-compressed tar (members spilled, not the whole archive)."""
    sample = voc_sample()
    raw = pack(sample, tmp_path / "raw", archives=True, gz=True, subdir="downloads/pascal")
    summary = prepare("voc21", raw, tmp_path / "out", workers=0)
    assert summary.sources[0]["path"].endswith("VOCtrainval_11-May-2012.tar.gz")
    for rel, expected in sample.labels.items():
        np.testing.assert_array_equal(_read(tmp_path / "out" / rel), expected)
    assert not (tmp_path / "out" / ".s2clip-data-spill").exists()
    # RAW may also be the archive itself
    single = prepare("voc21", raw / "downloads/pascal/VOCtrainval_11-May-2012.tar.gz", tmp_path / "out2")
    assert single.samples == 3


def test_prepare_in_place_in_the_extracted_folder(tmp_path: Path) -> None:
    """out = the extracted VOC2012 folder: the files are already there and stay as they are."""
    sample = voc_sample()
    raw = pack(sample, tmp_path / "raw", archives=False)
    root = raw / "VOCdevkit/VOC2012"
    before = (root / "SegmentationClass/2007_000032.png").read_bytes()
    summary = prepare("voc21", raw, root, workers=0)
    assert summary.samples == 3 and (root / MANIFEST_NAME).is_file()
    assert (root / "SegmentationClass/2007_000032.png").read_bytes() == before
    assert len(open_dataset("voc21", root)) == 3


def test_default_data_root_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S2CLIP_DATA_DIR", str(tmp_path / "data"))
    assert default_data_root("voc20") == tmp_path / "data/VOCdevkit/VOC2012"
    assert default_data_root("context59") == tmp_path / "data/VOCdevkit/VOC2010"
    assert default_data_root("coco_object") == default_data_root("coco_stuff164k") == tmp_path / "data/coco_stuff164k"
    assert default_data_root("ade20k") == tmp_path / "data/ade/ADEChallengeData2016"
    raw = pack(SAMPLES["ade20k"](), tmp_path / "raw", archives=True)
    summary = prepare("ade20k", raw, workers=0)
    assert summary.out == tmp_path / "data/ade/ADEChallengeData2016"
    assert len(open_dataset("ade20k", summary.out)) == 2
    monkeypatch.delenv("S2CLIP_DATA_DIR")
    assert default_data_root("cityscapes") == Path.home() / ".cache/s2clip/data/cityscapes"


def test_sources_cover_every_preset() -> None:
    from s2clip_cli.data.presets import PRESETS

    covered = [p for s in SOURCES.values() for p in s.presets]
    assert sorted(covered) == sorted(PRESETS)
    assert OFFICIAL_VAL_COUNTS == {"voc21": 1449, "voc20": 1449, "context60": 5104, "context59": 5104,
                                   "coco_stuff164k": 5000, "coco_object": 5000, "cityscapes": 500, "ade20k": 2000}


# ------------------------------------------------------------------------------------------ RLE and tables
def _encode_rle(mask: np.ndarray) -> str:
    """Independent reference: pycocotools' rleToString on the column-major runs of ``mask``."""
    flat = mask.T.reshape(-1).astype(np.uint8)
    runs, current, count = [], 0, 0
    for v in flat:
        if v != current:
            runs.append(count)
            current, count = v, 0
        count += 1
    runs.append(count)
    chars = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            chars.append(chr(c + 48))
    return "".join(chars)


def test_rle_fixed_vectors_and_round_trip() -> None:
    rows = np.zeros((4, 5), dtype=bool)
    np.testing.assert_array_equal(decode_rle("02200000000", 4, 5), np.r_[[[1] * 5] * 2, [[0] * 5] * 2].astype(bool))
    np.testing.assert_array_equal(decode_rle("1220000000O", 4, 5), np.r_[[[0] * 5], [[1] * 5] * 2, [[0] * 5]] == 1)
    expected = rows.copy()
    expected[3, :2] = True
    np.testing.assert_array_equal(decode_rle("31309", 4, 5), expected)
    assert decode_rle("0d0", 4, 5).all()
    rng = np.random.default_rng(0)
    for _ in range(60):
        h, w = rng.integers(1, 40, 2)
        mask = rng.random((h, w)) < rng.random()
        if rng.random() < 0.5:  # large runs: multi-character and negative deltas
            mask = np.zeros((h, w), bool)
            mask[rng.integers(0, h):, rng.integers(0, w):] = True
        counts = _encode_rle(mask)
        np.testing.assert_array_equal(decode_rle(counts, int(h), int(w)), mask)
        assert sum(rle_counts(counts)) == h * w
    np.testing.assert_array_equal(decode_rle([3, 2, 15], 4, 5), decode_rle("32?", 4, 5))


def test_context_table_matches_mmseg_mapping() -> None:
    # MMSeg pascal_context.py `_mapping` as written there (unsorted); the note's table, sorted, must equal it
    mmseg = [0, 2, 259, 260, 415, 324, 9, 258, 144, 18, 19, 22, 23, 397, 25, 284, 158, 159, 416, 33, 162, 420, 454,
             295, 296, 427, 44, 45, 46, 308, 59, 440, 445, 31, 232, 65, 354, 424, 68, 326, 72, 458, 34, 207, 80, 355,
             85, 347, 220, 349, 360, 98, 187, 104, 105, 366, 189, 368, 113, 115]
    assert list(CONTEXT_IDS) == sorted(mmseg) and len(CONTEXT_IDS) == 60


def test_raw_index_lists_folders_and_archives(tmp_path: Path) -> None:
    raw = pack(SAMPLES["coco_stuff164k"](), tmp_path / "raw", archives=True)
    index = RawIndex(raw)
    assert [c.kind for c in index.containers] == ["folder", "zip", "zip"]
    hits = index.find_dirs("val2017", r"\d{12}\.png")
    assert len(hits) == 1 and sorted(hits[0].files) == ["000000000139.png", "000000000285.png"]
    assert hits[0].container.path.name == "stuffthingmaps_trainval2017.zip"
