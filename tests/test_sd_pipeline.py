"""`--sd` (CLIPer's Stable-Diffusion refinement) through the commands, with --models tiny."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from s2clip_cli.cli import app
from s2clip_cli.data.synthetic import write_synthetic_dataset
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig

runner = CliRunner()
TINY = ["--models", "tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(path)
    return path


def test_segment_sd_then_sam(photo: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["segment", str(photo), "--classes", "cat,dog", "--sd", "--seed", "3",
                                 "-o", str(tmp_path), *TINY])
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "photo.json").read_text())
    assert {"vae_encode", "unet", "propagate", "sam_refine"} <= set(record["timings_s"])
    assert record["config"]["sd"] is True and record["config"]["seed"] == 3


def test_sd_changes_the_maps_and_repeats_for_a_seed(photo: Path) -> None:
    image = np.asarray(Image.open(photo).convert("RGB"))
    base = SegmenterConfig(models="tiny", device="cpu", sam=None, short_side=96)
    plain = Segmenter.build(base, [["cat"], ["dog"]], None)
    with_sd = Segmenter.build(SegmenterConfig(**{**base.__dict__, "sd": True}), [["cat"], ["dog"]], None)
    again = Segmenter.build(SegmenterConfig(**{**base.__dict__, "sd": True}), [["cat"], ["dog"]], None)
    a, b, c = plain(image), with_sd(image), again(image)
    assert b.probs.shape == a.probs.shape and not torch.allclose(a.probs, b.probs)
    torch.testing.assert_close(b.probs, c.probs)  # seeded noise: the same result twice
    torch.testing.assert_close(b.probs.sum(0), torch.ones_like(b.probs[0]), atol=1e-5, rtol=0)


def test_eval_sd_alone(tmp_path: Path) -> None:
    voc = write_synthetic_dataset("voc21", tmp_path / "voc", n_images=1)
    work = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--dataset", "voc21", "--data-root", str(voc), "--work-dir", str(work),
                                 "--sd", "--no-sam", "--num-workers", "0", *TINY])
    assert result.exit_code == 0, result.stderr
    settings = json.loads((work / "results.json").read_text())["settings"]
    assert settings["sd"] == {"threshold": 0.1, "seed": 0}  # VOC's preset threshold (CLIPer's)


def test_missing_sd_weights_is_one_line(photo: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["segment", str(photo), "--classes", "cat", "--sd", "--models", "real", "--offline",
                                 "-o", str(tmp_path), "--device", "cpu"])
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "sd21_base" in errors[0] and "s2clip models download" in errors[0]


def test_bench_sam_prints_the_four_rows(tmp_path: Path) -> None:
    out = tmp_path / "b.json"
    result = runner.invoke(app, ["bench-sam", "--synthetic", "1", "--sd", "-o", str(out), *TINY])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    assert set(report["pipeline_seconds_per_image"]) == {"no_sam", "original", "optimized", "sam_sd"}
    assert set(report["refinement"]["sam_sd"]) == {"vae_encode", "unet", "propagate", "sam_encoder", "sam_refine"}


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_segment_sd_then_sam_under_low_precision(photo: Path, tmp_path: Path, precision: str) -> None:
    """What CUDA users run: the SD pass and SAM+SD under autocast (here CPU autocast)."""
    result = runner.invoke(app, ["segment", str(photo), "--classes", "cat,dog", "--sd", "--precision", precision,
                                 "-o", str(tmp_path), *TINY])
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "photo.json").read_text())
    assert record["config"]["precision"] == precision
    assert {"vae_encode", "unet", "propagate", "sam_refine"} <= set(record["timings_s"])
    mask = np.asarray(Image.open(tmp_path / "photo_mask.png"))
    assert mask.shape == (96, 128) and mask.max() <= 2
