"""`s2clip data check` (counts, label sizes, value ranges incl. reduce-zero-label), the one-line
count warning for eval, and the `s2clip data prepare|check|list` commands through Typer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from raw_samples import SAMPLES, pack
from typer.testing import CliRunner

from s2clip_cli.cli.data import data_app
from s2clip_cli.data.check import allowed_values, check, official_count_mismatch
from s2clip_cli.data.prepare import prepare
from s2clip_cli.data.presets import PRESETS
from s2clip_cli.data.synthetic import write_synthetic_dataset


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("voc")
    raw = pack(SAMPLES["voc21"](), base / "raw", archives=True)
    return prepare("voc21", raw, base / "VOC2012", workers=0).out


def _rows(report) -> dict[str, tuple[str, bool]]:
    return {r.check: (r.result, r.ok) for r in report.rows}


def test_good_root_only_misses_the_official_count(voc_root: Path) -> None:
    for name in ("voc21", "voc20"):
        report = check(name, voc_root)
        rows = _rows(report)
        assert rows["samples"] == ("3 (official val: 1449)", False)
        assert rows["label sizes"][1] and rows["label values"][1] and rows["layout"][1]
        assert rows["manifest"][0].endswith("s2clip-data.json")
        assert len(report.problems) == 1 and "official val split has 1449" in report.problems[0]
        assert not report.ok


def test_bad_root_lists_first_problems(tmp_path: Path, voc_root: Path) -> None:
    import shutil

    root = tmp_path / "VOC2012"
    shutil.copytree(voc_root, root)
    Image.fromarray(np.full((7, 10), 30, np.uint8)).save(root / "SegmentationClass/2007_000033.png")
    Image.fromarray(np.zeros((3, 3), np.uint8)).save(root / "SegmentationClass/2007_000042.png")
    report = check("voc21", root)
    rows = _rows(report)
    assert rows["label values"] == ("2 of 3 within 0..20 and 255", False)
    assert rows["label sizes"] == ("2 of 3 equal to their image's", False)
    text = " | ".join(report.problems)
    assert "2007_000033.png holds value(s) 30 outside 0..20 and 255" in text
    assert "2007_000042.png is 3x3 but its image" in text
    missing = check("voc21", tmp_path / "nowhere")
    assert not missing.ok and not _rows(missing)["layout"][1] and "does not exist" in missing.problems[0]


@pytest.mark.parametrize("name", list(PRESETS))
def test_value_ranges_follow_reduce_zero_label(tmp_path: Path, name: str) -> None:
    preset = PRESETS[name]
    allowed = allowed_values(preset)
    top = preset.num_classes if preset.reduce_zero_label else preset.num_classes - 1
    assert allowed[: top + 1].all() and allowed[255] and not allowed[top + 1:255].any()
    root = write_synthetic_dataset(name, tmp_path / name, n_images=2, size=(24, 32), seed=0)
    report = check(name, root)
    rows = _rows(report)
    assert rows["label values"][1] and rows["label sizes"][1], report.problems


def test_reduce_zero_label_allows_raw_num_classes(tmp_path: Path) -> None:
    raw = pack(SAMPLES["ade20k"](), tmp_path / "raw", archives=False)
    root = prepare("ade20k", raw, tmp_path / "ade").out
    assert _rows(check("ade20k", root))["label values"][1]  # raw 150 is valid (class 149 after reduction)
    Image.fromarray(np.full((5, 7), 151, np.uint8)).save(root / "annotations/validation/ADE_val_00000002.png")
    assert "151" in " ".join(check("ade20k", root).problems)


def test_official_count_mismatch() -> None:
    assert official_count_mismatch("voc21", 1449) is None
    assert official_count_mismatch("context59", 5104) is None
    assert official_count_mismatch("custom", 3) is None
    warning = official_count_mismatch("ade20k", 1999)
    assert warning is not None and "1999" in warning and "2000" in warning and "\n" not in warning


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture()
def cli() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(data_app, name="data")

    @app.command()
    def other() -> None:  # a second command, so `data` stays a sub-command
        pass

    return app


def test_cli_prepare_check_list(tmp_path: Path, cli: typer.Typer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S2CLIP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("COLUMNS", "200")
    raw = pack(SAMPLES["coco_stuff164k"](), tmp_path / "raw", archives=True)
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "prepare", "coco_object", "--from", str(raw), "--workers", "0"])
    assert result.exit_code == 0, result.output
    root = tmp_path / "data/coco_stuff164k"
    assert "2 val samples (official: 5000)" in result.output and "s2clip eval --dataset coco_object" in result.output
    assert (root / "annotations/val2017/000000000285_instanceTrainIds.png").is_file()
    result = runner.invoke(cli, ["data", "check", "coco_stuff164k"])
    assert result.exit_code == 1 and "official val split has 5000" in result.output
    result = runner.invoke(cli, ["data", "list"])
    assert result.exit_code == 0
    assert "stuffthingmaps_trainval2017.zip" in result.output and "prepared (2 samples)" in result.output
    assert "VOCtrainval_11-May-2012.tar" in result.output and "not prepared" in result.output
    other = tmp_path / "elsewhere"
    result = runner.invoke(cli, ["data", "prepare", "coco_stuff164k", "--from", str(raw), "-o", str(other),
                                 "--workers", "0"])
    assert result.exit_code == 0 and (other / "s2clip-data.json").is_file()


def test_cli_errors_are_one_line(tmp_path: Path, cli: typer.Typer) -> None:
    runner = CliRunner()
    result = runner.invoke(cli, ["data", "prepare", "voc21", "--from", str(tmp_path / "missing"), "-o",
                                 str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "error:" in result.output and "does not exist" in result.output and "Traceback" not in result.output
    result = runner.invoke(cli, ["data", "check", "nonsense", "--data-root", str(tmp_path)])
    assert result.exit_code == 2 and "is not one of" in result.output  # a Typer choice
