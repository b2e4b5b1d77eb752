"""What `segment` writes: never over an input, each image's outputs as a complete set (full disks
included), reruns that skip finished images, 16-bit masks for large vocabularies, export formats."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_helpers import reuse_segmenters, save_image, segment  # noqa: F401 - fixture

from s2clip_cli.errors import S2ClipError
from s2clip_cli.io.sources import collect_sources

OUTPUTS = ("_mask.png", "_overlay.png", ".json")


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_output_folder_is_the_input_folder(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    save_image(photos / "cat.png", seed=1)
    save_image(photos / "dog.jpg", seed=2)
    save_image(photos / "bird.png", seed=3)
    (photos / "bird.json").write_text('{"mine": "notes about the bird"}')  # the user's file, not ours
    before = _digests(photos)
    code, stdout, stderr = segment(str(photos), "-o", str(photos))
    assert code == 1
    # bird.png is refused (bird.json is not a complete set of ours); the others run
    errors = _error_lines(stderr)
    assert "bird.json exists but the outputs of this input are not a complete set; --overwrite" in errors[0]
    assert "done 2, skipped 0, failed 1" in stderr
    after = _digests(photos)
    assert {name: after[name] for name in before} == before  # no input, no file of the user replaced
    assert set(after) - set(before) == {f"{s}{o}" for s in ("cat", "dog") for o in OUTPUTS}
    # the rerun takes none of the tool's pictures as inputs and skips the finished images
    code, stdout, stderr = segment(str(photos), "-o", str(photos))
    assert code == 1 and "done 0, skipped 2 (outputs exist; --overwrite redoes them), failed 1" in stderr
    assert _digests(photos) == after
    assert "cat_mask" not in stdout + stderr


def test_rerun_skips_complete_sets_and_overwrite_redoes_them(tmp_path: Path) -> None:
    save_image(tmp_path / "in" / "a.png", seed=1)
    save_image(tmp_path / "in" / "b.png", seed=2)
    out = tmp_path / "out"
    assert segment(str(tmp_path / "in"), "-o", str(out))[0] == 0
    record = json.loads((out / "a.json").read_text())
    record["note"] = "from the first run"
    (out / "a.json").write_text(json.dumps(record))
    (out / "b.json").unlink()  # b's set is incomplete now: its mask and overlay remain
    code, _, stderr = segment(str(tmp_path / "in"), "-o", str(out))
    assert code == 1
    assert "b_mask.png exists but the outputs of this input are not a complete set" in stderr
    assert "done 0, skipped 1 (outputs exist; --overwrite redoes them), failed 1" in stderr
    assert "note" in json.loads((out / "a.json").read_text())
    code, _, stderr = segment(str(tmp_path / "in"), "-o", str(out), "--overwrite")
    assert code == 0, stderr
    assert "done 2, skipped 0, failed 0" in stderr
    assert "note" not in json.loads((out / "a.json").read_text())
    assert (out / "b.json").is_file()


def test_an_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    save_image(tmp_path / "cat.png", seed=1)
    save_image(tmp_path / "cat_mask.png", seed=2)  # named explicitly: an input
    before = _digests(tmp_path)
    for extra in ([], ["--overwrite"]):
        code, stdout, stderr = segment(str(tmp_path / "cat.png"), str(tmp_path / "cat_mask.png"), "-o",
                                       str(tmp_path), *extra)
        assert code == 2
        assert _error_lines(stderr) == [f"error: an output of this run would replace the input {tmp_path}/cat_mask.png;"
                                        " choose another output folder (-o)"]
        assert _digests(tmp_path) == before


def _only_inputs_left(folder: Path, inputs: set[str]) -> None:
    names = {p.name for p in folder.iterdir()}
    assert names <= inputs | {"filler"}, names - inputs  # no partial set, no temporary file


def test_a_failed_write_leaves_no_partial_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from s2clip_cli.commands import segment as driver

    save_image(tmp_path / "in" / "a.png", seed=1)
    save_image(tmp_path / "in" / "b.png", seed=2)
    out = tmp_path / "out"
    real_write_json = driver.write_json

    def failing_write_json(path: Path, obj: object) -> Path:
        if "a.json" in Path(path).name or Path(path).name.startswith(".a.tmp"):
            raise S2ClipError(f"cannot write {path}: No space left on device")
        return real_write_json(path, obj)

    monkeypatch.setattr(driver, "write_json", failing_write_json)
    code, _, stderr = segment(str(tmp_path / "in"), "-o", str(out))
    assert code == 1
    assert "No space left on device" in _error_lines(stderr)[0]
    assert sorted(p.name for p in out.iterdir()) == ["b.json", "b_mask.png", "b_overlay.png"]

    def failing_overlay(*args: object, **kwargs: object) -> None:
        raise S2ClipError("cannot write the overlay: No space left on device")

    monkeypatch.setattr(driver, "write_json", real_write_json)
    monkeypatch.setattr(driver, "save_overlay", failing_overlay)
    code, _, stderr = segment(str(tmp_path / "in"), "-o", str(out), "--overwrite")
    assert code == 1 and len(_error_lines(stderr)) == 3
    assert list(out.iterdir()) == []  # with --overwrite the earlier set goes too: nothing mixed remains


def test_full_disk(tmp_path: Path) -> None:
    """A real full disk: a small tmpfs (root only) filled so the mask fits and the overlay does not."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        save_image(tmp_path / "in" / "noise.png", (120, 160), seed=1)
        stats = os.statvfs(disk)
        free = stats.f_bavail * stats.f_frsize
        (disk / "filler").write_bytes(b"\0" * (free - 24 * 1024))  # room for a mask, not for the overlay
        code, _, stderr = segment(str(tmp_path / "in" / "noise.png"), "-o", str(disk))
        assert code == 2
        assert _error_lines(stderr)[0].startswith("error: cannot write") and "No space left" in stderr
        _only_inputs_left(disk, set())
        (disk / "filler").unlink()
        code, _, stderr = segment(str(tmp_path / "in" / "noise.png"), "-o", str(disk))
        assert code == 0, stderr
        assert sorted(p.name for p in disk.iterdir()) == ["noise.json", "noise_mask.png", "noise_overlay.png"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.fixture()
def fast_text(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random unit text embeddings: embedding 300 names with 80 templates takes a minute on the CPU."""
    from s2clip_cli.pipeline import segmenter

    real_encode = segmenter.encode_names

    def encode(clip: object, names: list[str], *args: object) -> torch.Tensor:
        dim = real_encode(clip, names[:1], *args).shape[1]
        g = torch.Generator().manual_seed(len(names))
        return torch.nn.functional.normalize(torch.randn(len(names), dim, generator=g), dim=-1)

    monkeypatch.setattr(segmenter, "encode_names", encode)


def test_more_than_255_classes_write_16_bit_masks(tmp_path: Path, fast_text: None) -> None:
    classes = tmp_path / "lvis.txt"
    classes.write_text("\n".join(f"thing {i}" for i in range(300)) + "\n")
    save_image(tmp_path / "a.png", (40, 50), seed=1)
    code, _, stderr = segment(str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), classes=f"@{classes}")
    assert code == 0, stderr
    record = json.loads((tmp_path / "out" / "a.json").read_text())
    assert record["mask_png"] == "16-bit" and len(record["classes"]) == 301  # with the background
    with Image.open(tmp_path / "out" / "a_mask.png") as mask:
        assert mask.mode == "I;16" and mask.size == (50, 40)
        labels = np.array(mask)
    assert labels.max() <= 300
    shares = np.bincount(labels.ravel(), minlength=301) / labels.size
    np.testing.assert_allclose([record["pixel_share"][c] for c in record["classes"]], shares, atol=1e-5)
    with Image.open(tmp_path / "out" / "a_overlay.png") as overlay:
        assert overlay.mode == "RGB" and overlay.width > 50


def test_too_many_classes_are_refused_before_models_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from s2clip_cli.pipeline.segmenter import Segmenter

    def no_build(*args: object, **kwargs: object) -> None:
        raise AssertionError("models were built")

    monkeypatch.setattr(Segmenter, "build", no_build)
    classes = tmp_path / "huge.txt"
    classes.write_text("\n".join(f"c{i}" for i in range(65536)) + "\n")
    save_image(tmp_path / "a.png")
    code, _, stderr = segment(str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), classes=f"@{classes}")
    assert code == 2
    assert _error_lines(stderr) == ["error: 65537 classes: a mask PNG holds at most 65536 (16-bit labels)"]


# ----------------------------------------------------------------------------------- --format


def test_export_formats_cover_skipped_images(tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    photos = tmp_path / "photos"
    save_image(photos / "a.png", seed=1)
    save_image(photos / "trip" / "b.png", seed=2)
    out = tmp_path / "out"
    code, _, stderr = segment(str(photos), "-r", "--format", "png,polygons,masks,coco", "-o", str(out))
    assert code == 0, stderr
    for name in ("a", "trip/b"):  # the export files mirror sub-folders as the masks do
        assert (out / f"{name}_polygons.json").is_file() and (out / f"{name}_masks" / "index.json").is_file()
        record = json.loads((out / f"{name}.json").read_text())
        assert record["outputs"]["export:polygons"] == str(out / f"{name}_polygons.json")
    save_image(photos / "c.png", seed=3)
    code, _, stderr = segment(str(photos), "-r", "--format", "png,polygons,masks,coco", "-o", str(out))
    assert code == 0 and "done 1, skipped 2" in stderr, stderr
    coco = COCO(str(out / "coco.json"))
    files = [img["file_name"] for img in coco.loadImgs(coco.getImgIds())]
    assert files == ["a.png", "c.png", "trip/b.png"]  # the skipped images are in the run-level file too
    # the class-mask PNGs of an export are never taken as inputs (nor masks and overlays)
    with pytest.raises(S2ClipError, match="contains no images"):
        collect_sources([out], recursive=True)
    with pytest.raises(S2ClipError, match="matches no image"):
        collect_sources([str(out / "**" / "*.png")])


def test_formats_without_png_and_bad_format_lists(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png")
    code, _, stderr = segment(str(tmp_path / "a.png"), "--format", "yolo", "-o", str(tmp_path / "out"))
    assert code == 0, stderr
    names = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert names == ["a.json", "a_mask.png", "yolo/data.yaml", "yolo/labels/a.txt"]  # no overlay without png
    for bad, message in (("png,gif", "unknown export format 'gif'"), ("png,png", "twice"), ("", "empty")):
        code, _, stderr = segment(str(tmp_path / "a.png"), "--format", bad, "-o", str(tmp_path / "o2"))
        assert code == 2 and len(_error_lines(stderr)) == 1 and message in stderr, stderr
        assert not (tmp_path / "o2").exists()


def test_failed_set_removes_its_export_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from s2clip_cli.commands import segment as driver

    save_image(tmp_path / "in" / "a.png", seed=1)
    save_image(tmp_path / "in" / "b.png", seed=2)
    real_write_json = driver.write_json

    def failing_write_json(path: Path, obj: object) -> Path:
        if Path(path).name.startswith(".a.tmp"):
            raise S2ClipError(f"cannot write {path}: No space left on device")
        return real_write_json(path, obj)

    monkeypatch.setattr(driver, "write_json", failing_write_json)
    out = tmp_path / "out"
    code, _, stderr = segment(str(tmp_path / "in"), "--format", "png,polygons,masks,yolo,coco,labelstudio,cvat",
                              "-o", str(out))
    assert code == 1 and f"cannot write {out}/a.json: No space left on device" in stderr
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert not [name for name in left if name.startswith("a")] and "yolo/labels/a.txt" not in left, left
    assert "b.json" in left and "b_polygons.json" in left and "yolo/labels/b.txt" in left
    # the run-level files list the images whose sets were written, not the failed one
    assert [i["file_name"] for i in json.loads((out / "coco.json").read_text())["images"]] == ["b.png"]
    assert [t["data"]["image"] for t in json.loads((out / "labelstudio.json").read_text())] == ["b.png"]
    assert '<image id="0" name="b.png"' in (out / "cvat.xml").read_text() and 'name="a.png"' not in (
        out / "cvat.xml").read_text()
