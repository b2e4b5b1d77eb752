"""Commands find datasets in the default data folder ($S2CLIP_DATA_DIR) when --data-root is not
given, and name the `s2clip data prepare` command when a dataset is not there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from s2clip_cli.cli import app
from s2clip_cli.data.synthetic import write_synthetic_dataset

runner = CliRunner()
TINY = ["--models", "tiny", "--device", "cpu"]


@pytest.fixture()
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("S2CLIP_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_eval_reads_the_default_data_folder(data_dir: Path, tmp_path: Path) -> None:
    write_synthetic_dataset("ade20k", data_dir / "ade" / "ADEChallengeData2016", n_images=1)
    result = runner.invoke(app, ["eval", "--dataset", "ade20k", "--no-sam", "--work-dir", str(tmp_path / "run"),
                                 "--num-workers", "0", *TINY])
    assert result.exit_code == 0, result.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    # one synthetic image instead of 2000: not comparable with published numbers, said and recorded
    assert "2000" in result.stderr and results["settings"]["dataset_warning"]


def test_a_missing_dataset_names_the_prepare_command(data_dir: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["eval", "--dataset", "cityscapes", "--no-sam", "--work-dir", str(tmp_path), *TINY])
    assert result.exit_code != 0 and "s2clip data prepare cityscapes" in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1


def test_entropy_with_no_dataset_uses_the_figure_datasets_present(data_dir: Path, tmp_path: Path) -> None:
    empty = runner.invoke(app, ["entropy", *TINY])
    assert empty.exit_code != 0 and "s2clip data prepare" in empty.stderr
    write_synthetic_dataset("cityscapes", data_dir / "cityscapes", n_images=1)
    result = runner.invoke(app, ["entropy", "-o", str(tmp_path / "ent"), *TINY])
    assert result.exit_code == 0, result.stderr
    assert "cityscapes" in result.stdout
    stats = json.loads((tmp_path / "ent" / "entropy.json").read_text())["stats"]
    assert set(stats) == {"cityscapes"}
