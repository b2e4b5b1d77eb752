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
