"""`--config run.toml` sets any option; a results file's `config` block repeats a run exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from s2clip_cli.cli import app
from s2clip_cli.cli.common import CONFIG_MAX_BYTES
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


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("list.json", "[1, 2]", "holds a list; expected a table"),
    ("string.json", '"classes"', "holds a string; expected a table"),
    ("block.json", '{"config": [1]}', "its `config` block is a list"),
    ("latin1.toml", b"classes = \"caf\xe9\"\n", "is not UTF-8 text"),
    ("deep.json", "[" * 50000 + "]" * 50000, "nested too deeply"),
    ("nested.toml", "[classes]\nname = \"cat\"\n", "classes is a table"),
    ("garbage.toml", "[[layers]]\nx = [[[1]]]\n", "layers is a list"),
    ("int_as_text.toml", 'short_side = "96"\n', "short_side is a string (\"96\"); expected an integer"),
    ("float_for_int.toml", "short_side = 96.5\n", "expected an integer"),
    ("bool_as_text.toml", 'no_sam = "yes"\n', "no_sam is a string"),
    ("int_for_bool.toml", "no_sam = 1\n", "no_sam is an integer (1); expected true or false"),
    ("bool_for_float.toml", "threshold = true\n", "threshold is a boolean"),
    ("nan.toml", "threshold = nan\n", "threshold is a number"),
    ("range.toml", "window_batch = 0\n", "expected an integer (>= 1)"),
    ("choice.toml", 'combine = "median"\n', "expected one of mean, entropy"),
    ("list_for_choice.toml", 'clip = ["ViT-B/16"]\n', "clip is a list"),
    ("comma_in_class.toml", 'classes = ["cat,dog"]\n', "no ',' inside a name"),
    ("bad_synonyms.toml", 'classes = [["dog", 3]]\n', "classes is a list"),
    ("float_layers.toml", "layers = [6.5, 8]\n", "expected a list of integers"),
    ("text_layers.toml", 'layers = ["6", "8"]\n', "expected a list of integers"),
    ("list_for_path.toml", "output = [\"a\", \"b\"]\n", "output is a list"),
    ("table_for_inputs.toml", "images = {a = 1}\n", "images is a table"),
    ("twice.toml", "no-sam = true\nno_sam = false\n", "sets no_sam twice"),
    ("date.toml", "seed = 1979-05-27\n", "seed is a date"),
])
def test_config_values_are_checked_against_their_option(photo: Path, tmp_path: Path, name: str,
                                                        content: str | bytes, expected: str) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    result = runner.invoke(app, ["segment", str(photo), "--classes", "cat", "--config", str(path)])
    assert result.exit_code == 2
    line = _one_error_line(result.stderr)
    assert str(path) in line and expected in line, line


def test_config_that_is_not_a_regular_file_is_refused_without_reading(photo: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "run.toml"
    os.mkfifo(fifo)  # reading it would block forever
    for path, expected in ((fifo, "is not a regular file"), (tmp_path, "is not a regular file"),
                           (Path("/dev/zero"), "is not a regular file")):
        result = runner.invoke(app, ["segment", str(photo), "--classes", "cat", "--config", str(path)])
        assert result.exit_code == 2 and expected in _one_error_line(result.stderr)


def test_oversized_config_is_refused(photo: Path, tmp_path: Path) -> None:
    big = tmp_path / "big.toml"
    with open(big, "wb") as fh:
        fh.truncate(CONFIG_MAX_BYTES + 1)  # sparse: no real disk used
    result = runner.invoke(app, ["segment", str(photo), "--classes", "cat", "--config", str(big)])
    assert result.exit_code == 2 and "a config file is at most" in _one_error_line(result.stderr)


def test_lists_are_accepted_where_the_option_takes_one(photo: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('classes = ["cat", ["dog", "puppy"], "bird; fowl"]\nmodels = "tiny"\ndevice = "cpu"\n'
                   'no_sam = true\nshort_side = 64\nlayers = [0, 1]\nbackground = ["sky", "wall"]\n')
    out_dir = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(photo), "--config", str(cfg), "-o", str(out_dir)])
    assert result.exit_code == 0, result.stderr
    record = json.loads((out_dir / "photo.json").read_text())
    assert record["config"]["classes"] == "cat,dog; puppy,bird; fowl"
    assert record["config"]["background"] == "sky; wall"
    assert record["run"]["layers"] == [0, 1]
    assert list(record["classes"]) == ["background", "cat", "dog", "bird"]


def test_eval_config_takes_a_dataset_list(tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('dataset = ["voc21", "nope"]\n')
    result = runner.invoke(app, ["eval", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "unknown dataset 'nope'" in _one_error_line(result.stderr)


def test_a_huge_layer_range_is_refused_before_it_is_expanded(photo: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text('layers = "0-1000000000"\nmodels = "tiny"\ndevice = "cpu"\n')
    result = runner.invoke(app, ["segment", str(photo), "--classes", "cat", "--config", str(cfg)])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and "Traceback" not in result.stderr
    assert len(errors) == 1 and "bad --layers '0-1000000000'" in errors[0] and "0..1023" in errors[0]
