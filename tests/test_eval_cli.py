"""`s2clip eval` end to end with --models tiny on synthetic datasets: results, resume, torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from s2clip_cli.cli import app
from s2clip_cli.data.presets import PRESETS
from s2clip_cli.data.synthetic import write_synthetic_dataset

runner = CliRunner()
TINY = ["--models", "tiny", "--device", "cpu", "--num-workers", "0"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset("voc21", tmp_path_factory.mktemp("voc"), n_images=4)


def test_list_datasets() -> None:
    result = runner.invoke(app, ["eval", "--list-datasets"])
    assert result.exit_code == 0
    for name in ("voc21", "context59", "coco_stuff164k", "ade20k", "cityscapes"):
        assert name in result.stdout


def test_eval_writes_results_and_resumes(voc: Path, tmp_path: Path) -> None:
    work = tmp_path / "run"
    args = ["eval", "--dataset", "voc21", "--data-root", str(voc), "--work-dir", str(work), "--no-sam", *TINY]
    first = runner.invoke(app, [*args, "--limit", "2"])
    assert first.exit_code == 0, first.stderr
    assert json.loads((work / "results.json").read_text())["num_images"] == 2
    full = runner.invoke(app, [*args, "--save-preds"])
    assert full.exit_code == 0, full.stderr
    results = json.loads((work / "results.json").read_text())
    assert results["num_images"] == 4 and 0 <= results["summary"]["mIoU"] <= 100
    conf_resumed = np.load(work / "confusion.npy")
    fresh = tmp_path / "fresh"
    again = runner.invoke(app, ["eval", "--dataset", "voc21", "--data-root", str(voc), "--work-dir", str(fresh),
                                "--no-sam", *TINY])
    assert again.exit_code == 0, again.stderr
    np.testing.assert_array_equal(np.load(fresh / "confusion.npy"), conf_resumed)
    assert "mIoU" in (work / "results.md").read_text()


def test_eval_wrong_layout_and_bad_names(tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "--dataset", "voc21", "--data-root", str(tmp_path), *TINY])
    assert result.exit_code != 0 and "SegmentationClass" in result.stderr and "Traceback" not in result.stderr
    result = runner.invoke(app, ["eval", "--dataset", "vocx", "--data-root", str(tmp_path), *TINY])
    assert result.exit_code != 0 and "unknown dataset" in result.stderr


def test_torchrun_two_processes_match_single(voc: Path, tmp_path: Path) -> None:
    base = ["eval", "--dataset", "voc21", "--data-root", str(voc), "--no-sam", "--models", "tiny",
            "--device", "cpu", "--num-workers", "0"]
    single = runner.invoke(app, [*base, "--work-dir", str(tmp_path / "one")])
    assert single.exit_code == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "s2clip_cli", *base, "--work-dir", str(tmp_path / "two")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "confusion.npy"),
                                  np.load(tmp_path / "one" / "confusion.npy"))
    assert json.loads((tmp_path / "two" / "results.json").read_text())["num_images"] == 4


def test_bench_sam_synthetic(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = runner.invoke(app, ["bench-sam", "--synthetic", "1", "--models", "tiny", "--device", "cpu",
                                 "--json", str(out)])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["pipeline_seconds_per_image"]) == {"no_sam", "original", "optimized"}
    assert report["refinement"]["agreement"]["label_pixels_equal"] == 1.0
    # Speed-ups are reported, not asserted (timings belong to benchmarks, not tests).
    assert report["refinement"]["speedup"]["components"] > 0
    bad = runner.invoke(app, ["bench-sam", "--models", "tiny"])
    assert bad.exit_code != 0 and "exactly one of" in bad.stderr


def _no_model_may_be_built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make the model factory record and refuse any build (CLIP is built first in every model set)."""
    import s2clip_cli.models.factory as factory

    built: list[str] = []

    def refuse(spec, **kwargs):  # noqa: ANN001, ANN003, ANN202
        built.append(spec.name)
        raise AssertionError("a model was built although the work dir is locked")

    monkeypatch.setattr(factory, "build_clip", refuse)
    return built


@pytest.mark.parametrize(("extra", "locked_dir"), [
    ([], "."),
    (["--dataset", "voc21,voc20"], "voc20"),  # several datasets: every dataset's folder is locked first
    (["--method", "all"], "clip"),  # every method's folder is locked before the first method's models
])
def test_a_work_dir_in_use_is_refused_before_any_model_is_built(voc: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch, extra: list[str],
                                                              locked_dir: str) -> None:
    from s2clip_cli.evaluation.runner import work_dir_lock

    built = _no_model_may_be_built(monkeypatch)
    work = tmp_path / "run"
    data_root = voc
    if "voc21,voc20" in extra:  # (the last --dataset wins)
        data_root = tmp_path / "data"
        for name in ("voc21", "voc20"):
            write_synthetic_dataset(name, data_root / PRESETS[name].subdir, n_images=1, size=(16, 16))
    args = ["eval", "--dataset", "voc21", "--data-root", str(data_root), "--work-dir", str(work), "--no-sam", *TINY,
            *extra]
    with work_dir_lock((work / locked_dir).resolve()):  # another live eval holds it
        result = runner.invoke(app, args)
    assert result.exit_code == 2 and built == []
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "is in use by another s2clip eval" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (work / "records").exists()


def test_duplicate_split_ids_and_stray_masks_are_warned_and_counted_once(tmp_path: Path) -> None:
    root = write_synthetic_dataset("voc21", tmp_path / "voc", n_images=2, size=(24, 32))
    split = root / "ImageSets" / "Segmentation" / "val.txt"
    ids = split.read_text().split()
    base = ["eval", "--dataset", "voc21", "--data-root", str(root), "--no-sam", *TINY]
    clean = runner.invoke(app, [*base, "--work-dir", str(tmp_path / "clean")])
    assert clean.exit_code == 0, clean.stderr
    split.write_text("\n".join([*ids, ids[0]]) + "\n")
    dup = runner.invoke(app, [*base, "--work-dir", str(tmp_path / "dup")])
    assert dup.exit_code == 0, dup.stderr
    warning = [line for line in dup.stderr.splitlines() if line.startswith("warning:") and "more than once" in line]
    assert len(warning) == 1 and str(split) in warning[0] and ids[0] in warning[0], dup.stderr
    a = json.loads((tmp_path / "clean" / "results.json").read_text())
    b = json.loads((tmp_path / "dup" / "results.json").read_text())
    assert b["num_images"] == 2 and b["summary"]["num_pixels"] == a["summary"]["num_pixels"]
    np.testing.assert_array_equal(np.load(tmp_path / "dup" / "confusion.npy"),
                                  np.load(tmp_path / "clean" / "confusion.npy"))


def test_masks_without_images_are_warned(tmp_path: Path) -> None:
    from s2clip_cli.data.synthetic import write_synthetic_generic

    paths = write_synthetic_generic(tmp_path / "gen", n_images=1, num_classes=3)
    (paths.masks / "orphan.png").write_bytes((next(paths.masks.glob("*.png"))).read_bytes())
    result = runner.invoke(app, ["eval", "--images", str(paths.images), "--masks", str(paths.masks),
                                 "--class-names", str(paths.class_names), "--work-dir", str(tmp_path / "run"),
                                 "--no-sam", *TINY])
    assert result.exit_code == 0, result.stderr
    warning = [line for line in result.stderr.splitlines() if "orphan.png" in line]
    assert len(warning) == 1 and warning[0].startswith("warning:") and "have no image" in warning[0]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["num_images"] == 1


def test_a_work_dir_that_is_a_file_is_one_line(voc: Path, tmp_path: Path) -> None:
    work = tmp_path / "run"
    work.write_text("mine")
    result = runner.invoke(app, ["eval", "--dataset", "voc21", "--data-root", str(voc), "--work-dir", str(work),
                                 "--no-sam", *TINY])
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: output path {work} is a file, not a directory"]
    assert work.read_text() == "mine"
