"""`--method corrclip` through `segment` and `eval` on tiny models: SAM 2's generator (tiny) or a
folder of pre-generated masks (`--instance-masks`), one-line errors for bad mask files, the
evaluation's identity including the mask generator and its parameters, masks reused from the cache,
and the methods/models listings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from s2clip_cli.cli import app
from s2clip_cli.data.datasets import open_dataset
from s2clip_cli.data.synthetic import write_synthetic_dataset
from s2clip_cli.models.sam2 import sam2_installed
from s2clip_cli.refine.instance_masks import Sam2MaskGenerator

runner = CliRunner()
TINY = ["--models", "tiny", "--device", "cpu"]
needs_sam2 = pytest.mark.skipif(not sam2_installed(), reason="SAM 2's package (`make install` installs it)")


def _instance_mask(h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), np.int64)
    m[: h // 2, : w // 2], m[h // 3:, w // 3:], m[5:15, -20:] = 1, 2, 3
    return m


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset("voc21", tmp_path_factory.mktemp("voc"), n_images=1)


def _segment(photo: Path, out: Path, *extra: str):
    return runner.invoke(app, ["segment", str(photo), "--classes", "cat,dog", "--method", "corrclip", "-o", str(out),
                               *TINY, *extra])


@needs_sam2
def test_segment_with_sam2_masks(photo: Path, tmp_path: Path) -> None:
    result = _segment(photo, tmp_path, "--mask-points", "2")
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "photo.json").read_text())
    run = record["run"]
    assert run["method"] == "corrclip" and run["clip"] == "MetaCLIP-B/16" and run["vfm"] == "dino_vitb8"
    assert run["sam"] is None and run["sam_prompts"] is False  # CorrCLIP has its own masks
    masks = run["instance_masks"]
    assert masks["generator"] == "sam2_automatic" and masks["model"] == "sam2_hiera_large"
    assert masks["params"]["points_per_side"] == 2 and masks["weights"] == "random-tiny-seed0"
    assert {"instance_masks", "vfm", "clip", "fusion", "classify"} <= set(record["timings_s"])
    assert Image.open(tmp_path / "photo_mask.png").size == (96, 72)


def test_segment_with_pre_generated_masks(photo: Path, tmp_path: Path) -> None:
    folder = tmp_path / "masks"
    folder.mkdir()
    np.savez_compressed(folder / "photo.npz", instance_mask=_instance_mask(72, 96))
    result = _segment(photo, tmp_path / "out", "--instance-masks", str(folder), "--no-background")
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "out" / "photo.json").read_text())
    assert record["run"]["instance_masks"] == {"generator": "folder", "folder": str(folder.resolve())}
    labels = np.array(Image.open(tmp_path / "out" / "photo_mask.png"))
    mask = _instance_mask(72, 96)
    for region in (1, 2, 3):  # the map correction: one label per instance region
        assert len(np.unique(labels[mask == region])) == 1, region


def test_bad_or_missing_mask_files_are_one_line_errors(photo: Path, tmp_path: Path) -> None:
    folder = tmp_path / "masks"
    folder.mkdir()
    missing = _segment(photo, tmp_path / "a", "--instance-masks", str(folder))
    assert missing.exit_code != 0 and "Traceback" not in missing.stderr
    assert "photo.npz is missing" in missing.stderr and len(missing.stderr.strip().splitlines()) == 2  # + warning
    np.savez_compressed(folder / "photo.npz", instance_mask=np.zeros((96, 72), np.int64))
    wrong = _segment(photo, tmp_path / "b", "--instance-masks", str(folder))
    assert wrong.exit_code != 0 and "'instance_mask' is 72x96, but the image is 96x72" in wrong.stderr
    (folder / "photo.npz").write_bytes(b"garbage")
    bad = _segment(photo, tmp_path / "c", "--instance-masks", str(folder))
    assert bad.exit_code != 0 and "is not an .npz archive" in bad.stderr
    other = runner.invoke(app, ["segment", str(photo), "--classes", "cat", "--instance-masks", str(folder),
                                "-o", str(tmp_path / "d"), *TINY])
    assert other.exit_code == 2 and "--instance-masks does not apply to s2clip (it uses no instance masks)" in \
        other.stderr
    not_dir = _segment(photo, tmp_path / "e", "--instance-masks", str(folder / "photo.npz"))
    assert not_dir.exit_code != 0 and "is not a folder" in not_dir.stderr


def _eval(voc: Path, work: Path, *extra: str):
    return runner.invoke(app, ["eval", "--method", "corrclip", "--dataset", "voc21", "--data-root", str(voc),
                               "--work-dir", str(work), "--num-workers", "0", *TINY, *extra])


@needs_sam2
def test_eval_identity_includes_the_mask_generator(voc: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    work = tmp_path / "run"
    first = _eval(voc, work, "--mask-points", "2")
    assert first.exit_code == 0, first.stderr
    settings = json.loads((work / "results.json").read_text())["settings"]
    assert settings["method"] == "corrclip" and settings["clip"] == "MetaCLIP-B/16"
    assert (settings["short_side"], settings["crop"], settings["stride"], settings["prob_thd"]) == (336, 336, 112, 0.2)
    assert settings["instance_masks"]["params"]["points_per_side"] == 2
    # Other generator parameters are another evaluation: the work dir refuses them.
    other = _eval(voc, work, "--mask-points", "3")
    assert other.exit_code != 0 and "holds results of another configuration" in other.stderr
    # The same parameters in a new work dir reuse the cached masks (the generator is not run).
    monkeypatch.setattr(Sam2MaskGenerator, "generate", lambda *_: pytest.fail("masks generated again"))
    again = _eval(voc, tmp_path / "again", "--mask-points", "2")
    assert again.exit_code == 0, again.stderr
    assert json.loads((tmp_path / "again" / "results.json").read_text())["summary"] == \
        json.loads((work / "results.json").read_text())["summary"]


def test_eval_with_pre_generated_masks(voc: Path, tmp_path: Path) -> None:
    ds = open_dataset("voc21", voc)
    folder = tmp_path / "masks"
    folder.mkdir()
    for sample in ds.samples:
        h, w = np.array(Image.open(sample.image)).shape[:2]
        np.savez_compressed(folder / f"{sample.image.stem}.npz", instance_mask=_instance_mask(h, w))
    work = tmp_path / "run"
    result = _eval(voc, work, "--instance-masks", str(folder))
    assert result.exit_code == 0, result.stderr
    settings = json.loads((work / "results.json").read_text())["settings"]
    assert settings["instance_masks"] == {"generator": "folder", "folder": str(folder.resolve())}
    moved = tmp_path / "moved"
    folder.rename(moved)
    refused = _eval(voc, work, "--instance-masks", str(moved))
    assert refused.exit_code != 0 and "holds results of another configuration" in refused.stderr


def test_methods_and_models_list_corrclip() -> None:
    methods = runner.invoke(app, ["methods"])
    assert methods.exit_code == 0, methods.stderr
    row = next(line for line in methods.stdout.splitlines() if line.startswith("corrclip "))
    assert "scoped" in row and "dino_vitb8" in row and "mask_correction" in row and "74.8" in row and "31.6" in row
    assert "average 51.0" in methods.stdout
    models = runner.invoke(app, ["models", "list"])
    assert models.exit_code == 0, models.stderr
    assert "sam2_hiera_large" in models.stdout and "MetaCLIP-B/16" in models.stdout and "MetaCLIP-L/14" in models.stdout


def test_two_files_with_the_same_pixels_keep_their_own_masks(tmp_path: Path) -> None:
    """Masks are remembered by image content between a call's steps, but a call naming its file reads
    that file's mask: identical images with different mask files are each corrected by their own."""
    from s2clip_cli.commands.methods import method_config
    from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig

    a, b = np.zeros((48, 64), np.int64), np.zeros((48, 64), np.int64)
    a[:, 1:] = 1
    b[:, 1:32], b[:, 32:] = 1, 2
    np.savez_compressed(tmp_path / "a.npz", instance_mask=a)
    np.savez_compressed(tmp_path / "b.npz", instance_mask=b)
    cfg = method_config(SegmenterConfig(models="tiny", device="cpu"), "corrclip", None,
                        {"instance_masks": str(tmp_path), "short_side": 64})
    seg = Segmenter.build(cfg, [["cat"], ["dog"], ["bird"]], None)
    image = np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    labels_a = seg(image, name="a").labels
    assert len(np.unique(labels_a[:, 1:])) == 1
    labels_b = seg(image, name="b").labels
    assert np.array_equal(seg.instance_mask(image), b)
    assert len(np.unique(labels_b[:, 1:32])) == 1 and len(np.unique(labels_b[:, 32:])) == 1
