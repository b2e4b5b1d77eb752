"""Resumable preparation: an interrupted run, a damaged output folder and a process pool all end
byte-for-byte equal to one uninterrupted in-process run."""

from __future__ import annotations

from pathlib import Path

import pytest
from raw_samples import SAMPLES, pack

from s2clip_cli.data.prepare import coco, context, prepare
from s2clip_cli.data.prepare.manifest import PROGRESS_NAME
from s2clip_cli.data.sources import MANIFEST_NAME
from s2clip_cli.errors import S2ClipError


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def coco_raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    """COCO downloads (zips) with 6 val images, and the tree one uninterrupted run writes."""
    base = tmp_path_factory.mktemp("coco")
    sample = SAMPLES["coco_stuff164k"]()
    images, maps = sample.parts
    for n in range(4):  # four more samples, copies of 000000000285 under new ids
        sid = f"{1000 + n:012d}"
        images.members[f"val2017/{sid}.jpg"] = images.members["val2017/000000000285.jpg"]
        maps.members[f"val2017/{sid}.png"] = maps.members["val2017/000000000285.png"]
    raw = pack(sample, base / "raw", archives=True)
    prepare("coco_stuff164k", raw, base / "reference", workers=0)
    return raw, _tree(base / "reference")


def test_interrupted_run_resumes_to_the_same_bytes(tmp_path: Path, coco_raw, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, reference = coco_raw
    real, calls = coco.convert, {"n": 0}

    def failing(job):
        calls["n"] += 1
        if calls["n"] > 3:
            raise S2ClipError(f"simulated crash at {job.key}")
        return real(job)

    monkeypatch.setattr(coco, "convert", failing)
    with pytest.raises(S2ClipError, match="simulated crash"):
        prepare("coco_object", raw, tmp_path / "out", workers=0)
    assert (tmp_path / "out" / PROGRESS_NAME).is_file() and not (tmp_path / "out" / MANIFEST_NAME).exists()
    assert len(list((tmp_path / "out/annotations/val2017").glob("*_labelTrainIds.png"))) == 3
    monkeypatch.setattr(coco, "convert", real)
    summary = prepare("coco_object", raw, tmp_path / "out", workers=0)
    assert (summary.skipped, summary.written) == (3, 3)
    assert _tree(tmp_path / "out") == reference
    again = prepare("coco_stuff164k", raw, tmp_path / "out", workers=0)  # complete: only verified
    assert (again.skipped, again.written) == (6, 0)
    assert _tree(tmp_path / "out") == reference


def test_damaged_output_folder_is_repaired(tmp_path: Path, coco_raw) -> None:
    raw, reference = coco_raw
    out = tmp_path / "out"
    for rel, data in reference.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    (out / "annotations/val2017/000000000139_labelTrainIds.png").unlink()  # missing
    obj = out / "annotations/val2017/000000000285_instanceTrainIds.png"
    obj.write_bytes(obj.read_bytes()[:20])  # truncated
    img = out / "images/val2017/000000001000.jpg"
    img.write_bytes(img.read_bytes()[:-1] + b"\0")  # same size, other bytes: the hash catches it
    (out / "annotations/val2017/.000000000139_labelTrainIds.tmp-4242-0123abcd.png").write_bytes(b"partial")
    summary = prepare("coco_stuff164k", raw, out, workers=0)
    assert (summary.skipped, summary.written) == (3, 3)
    assert _tree(out) == reference


def test_process_pool_equals_in_process(tmp_path: Path, coco_raw) -> None:
    raw, reference = coco_raw
    seen: list[tuple[int, int, str]] = []
    summary = prepare("coco_stuff164k", raw, tmp_path / "out", workers=2,
                      progress=lambda done, total, stage: seen.append((done, total, stage)))
    assert summary.written == 6
    assert _tree(tmp_path / "out") == reference
    converting = [done for done, total, stage in seen if stage == "converting"]
    assert converting == list(range(7)) and seen[-1] == (6, 6, "done")


def test_pool_error_names_the_file_and_keeps_finished_work(tmp_path: Path) -> None:
    """A bad label in a worker: one-line error naming it; the good samples are recorded for the rerun."""
    sample = SAMPLES["context60"]()
    part = sample.parts[1]
    import json

    doc = json.loads(part.members["trainval_merged.json"])
    doc["annos_segmentation"].append({"id": 99, "image_id": 2008000006, "category_id": 1, "iscrowd": 0,
                                      "segmentation": {"size": [4, 5], "counts": "31309"}})
    part.members["trainval_merged.json"] = json.dumps(doc).encode()
    raw = pack(sample, tmp_path / "raw", archives=True)
    with pytest.raises(S2ClipError) as err:
        prepare("context60", raw, tmp_path / "out", workers=2)
    message = str(err.value)
    assert "trainval_merged.json" in message and "2008_000006.jpg" in message and "raw value 1 " in message
    assert "\n" not in message
    progress = (tmp_path / "out" / PROGRESS_NAME).read_text()
    assert "SegmentationClassContext/2008_000002.png" in progress
    assert context.LUT[1] == -1
