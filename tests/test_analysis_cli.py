"""`s2clip entropy` and `s2clip ap` with --models tiny on synthetic datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from s2clip_cli.cli import app
from s2clip_cli.data.synthetic import write_synthetic_dataset

runner = CliRunner()
TINY = ["--models", "tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_synthetic_dataset("ade20k", root / "ade" / "ADEChallengeData2016", n_images=2)
    write_synthetic_dataset("cityscapes", root / "cityscapes", n_images=2)
    return root


def test_entropy_two_datasets(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ent"
    result = runner.invoke(app, ["entropy", "--dataset", "ade20k,cityscapes", "--data-root", str(data),
                                 "--out", str(out), *TINY])
    assert result.exit_code == 0, result.stderr
    stats = json.loads((out / "entropy.json").read_text())
    stats = stats.get("stats", stats)
    assert set(stats) == {"ade20k", "cityscapes"}
    assert len(stats["ade20k"]) == 5  # tiny CLIP: 6 blocks, layers 0..4
    for values in stats["ade20k"].values():
        assert 0 < values["entropy"] < 10 and 0 <= values["gini"] <= 1
    png = Image.open(out / "entropy_heatmap.png")
    assert png.size[0] > 100 and png.size[1] > 100


def test_ap_sources(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "ap"
    result = runner.invoke(app, ["ap", "--dataset", "cityscapes", "--data-root", str(data / "cityscapes"),
                                 "--sources", "clip:0-2,dino_vits16", "--pairs", "300", "--out", str(out), *TINY])
    assert result.exit_code == 0, result.stderr
    results = json.loads((out / "ap.json").read_text())
    results = results.get("results", results)
    assert set(results) == {"clip:0", "clip:1", "clip:2", "dino_vits16"}
    for r in results.values():
        assert 0 <= r["ap"] <= 1 and r["n_pairs"] > 0
    assert (out / "ap_pr_curves.png").stat().st_size > 0
    bad = runner.invoke(app, ["ap", "--dataset", "cityscapes", "--data-root", str(data / "cityscapes"),
                              "--sources", "clip:0-99", *TINY])
    assert bad.exit_code != 0 and "Traceback" not in bad.stderr


def test_entropy_needs_input() -> None:
    result = runner.invoke(app, ["entropy", *TINY])
    assert result.exit_code != 0 and "--images" in result.stderr
