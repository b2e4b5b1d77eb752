"""`--config run.toml` sets any option; a results file's `config` block repeats a run exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from s2clip_cli.cli import app
from s2clip_cli.data.synthetic import write_synthetic_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(path)
    return path


def test_toml_sets_options_and_the_command_line_wins(photo: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('classes = "cat,dog"\nmodels = "tiny"\ndevice = "cpu"\nno-sam = true\nshort_side = 96\n'
                   'layers = "3-4"\n')
    result = runner.invoke(app, ["segment", str(photo), "--config", str(cfg), "--layers", "4", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "photo.json").read_text())
    assert record["config"]["no_sam"] is True and record["config"]["short_side"] == 96
    assert record["run"]["layers"] == [4] and record["run"]["sam"] is None  # --layers on the command line won


def test_a_results_config_block_repeats_the_run(photo: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    result = runner.invoke(app, ["segment", str(photo), "--classes", "cat,dog", "--models", "tiny", "--device", "cpu",
                                 "--no-sam", "--combine", "entropy", "-o", str(first)])
    assert result.exit_code == 0, result.stderr
    record_path = first / "photo.json"
    second = tmp_path / "second"
    again = runner.invoke(app, ["segment", "--config", str(record_path), "-o", str(second)])
    assert again.exit_code == 0, again.stderr
    a = np.asarray(Image.open(first / "photo_mask.png"))
    b = np.asarray(Image.open(second / "photo_mask.png"))
    assert np.array_equal(a, b)
    assert json.loads((second / "photo.json").read_text())["config"]["combine"] == "entropy"


def test_eval_results_config_block_resumes_the_same_run(tmp_path: Path) -> None:
    voc = write_synthetic_dataset("voc21", tmp_path / "voc", n_images=2)
    work = tmp_path / "run"
    args = ["eval", "--dataset", "voc21", "--data-root", str(voc), "--work-dir", str(work), "--no-sam",
            "--models", "tiny", "--device", "cpu", "--num-workers", "0"]
    assert runner.invoke(app, [*args, "--limit", "1"]).exit_code == 0
    repeat = runner.invoke(app, ["eval", "--config", str(work / "results.json"), "--limit", "2"])
    assert repeat.exit_code == 0, repeat.stderr
    results = json.loads((work / "results.json").read_text())
    assert results["num_images"] == 2 and results["timings"]["images_resumed"] == 1


def test_bad_config_files_are_one_line(photo: Path, tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('colour = "blue"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text("classes = [\n")
    for path, message in ((unknown, "colour"), (bad, "not valid TOML"), (tmp_path / "missing.toml", "cannot read")):
        result = runner.invoke(app, ["segment", str(photo), "--classes", "cat", "--config", str(path)])
        assert result.exit_code == 2 and message in result.stderr, result.stderr
        assert len([line for line in result.stderr.splitlines() if line.startswith("error:")]) == 1
