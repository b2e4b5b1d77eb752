"""Every model-running command under --precision bf16 and fp16 on the CPU (CPU autocast): the
paths CUDA users take, run here. SAM refinement on, both implementations; results files record the
precision; original and optimized refinement still agree."""

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
from s2clip_cli.models.precision import autocast, compute_dtype, full_precision, sam_encoder_dtype
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig

runner = CliRunner()
TINY = ["--models", "tiny", "--device", "cpu"]
PRECISIONS = ["bf16", "fp16"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset("voc21", tmp_path_factory.mktemp("voc"), n_images=2)


@pytest.fixture(scope="module")
def ade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset("ade20k", tmp_path_factory.mktemp("ade"), n_images=1)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)).save(path)
    return path


def test_precision_choices() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute_dtype("auto", cpu) == torch.float32
    assert compute_dtype("auto", cuda) == torch.float16  # as the lineage runs on GPUs
    assert compute_dtype("bf16", cpu) == torch.bfloat16 and compute_dtype("fp16", cpu) == torch.float16
    assert sam_encoder_dtype("fp16", cpu, "vit_h") == torch.float16  # forced stays forced
    with autocast(cpu, torch.bfloat16):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        with full_precision(cpu):
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("impl", ["optimized", "original"])
def test_segment_with_sam_under_precision(photo: Path, tmp_path: Path, precision: str, impl: str) -> None:
    result = runner.invoke(app, ["segment", str(photo), "--classes", "cat,dog", "--sam-impl", impl,
                                 "--precision", precision, "--iou-thresh", "-1", "-o", str(tmp_path), *TINY])
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "photo.json").read_text())
    assert record["run"]["precision"] == precision and "sam_refine" in record["timings_s"]
    assert Image.open(tmp_path / "photo_mask.png").size == (160, 120)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_original_and_optimized_agree_under_precision(photo: Path, precision: str) -> None:
    image = np.asarray(Image.open(photo).convert("RGB"))
    cfg = SegmenterConfig(models="tiny", device="cpu", precision=precision, short_side=120, stride=112)
    seg = Segmenter.build(cfg, [["cat"], ["dog"], ["tree"]], None)
    with torch.no_grad():
        labels, probs = seg.classify(seg.predict_logits(image), image.shape[:2])
        assert probs.dtype == torch.float32  # classification in float32 under any precision
        out = {}
        for impl in ("original", "optimized"):
            seg.config.refine = type(seg.config.refine)(impl=impl, iou_thresh=-1.0, min_area=4)
            out[impl] = seg.refine(image, labels, probs)
    assert torch.equal(out["original"][0], out["optimized"][0])
    torch.testing.assert_close(out["original"][1], out["optimized"][1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_eval_with_sam_under_precision(voc: Path, tmp_path: Path, precision: str) -> None:
    work = tmp_path / "run"
    result = runner.invoke(app, ["eval", "--dataset", "voc21", "--data-root", str(voc), "--work-dir", str(work),
                                 "--precision", precision, "--num-workers", "0", *TINY])
    assert result.exit_code == 0, result.stderr
    results = json.loads((work / "results.json").read_text())
    assert results["settings"]["precision"] == precision and results["settings"]["device"] == "cpu"
    assert results["config"]["precision"] == precision and results["num_images"] == 2
    # Another precision is another configuration: the work dir refuses to mix them.
    other = "fp16" if precision == "bf16" else "bf16"
    mixed = runner.invoke(app, ["eval", "--dataset", "voc21", "--data-root", str(voc), "--work-dir", str(work),
                                "--precision", other, "--num-workers", "0", *TINY])
    assert mixed.exit_code != 0 and "another configuration" in mixed.stderr


@pytest.mark.parametrize("precision", PRECISIONS)
def test_bench_sam_under_precision(tmp_path: Path, precision: str) -> None:
    out = tmp_path / "new" / "folder" / "bench.json"  # the folder does not exist yet
    result = runner.invoke(app, ["bench-sam", "--synthetic", "1", "--precision", precision, "-o", str(out), *TINY])
    assert result.exit_code == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["precision"] == precision and report["refinement"]["encoder_precision"] == precision
    assert report["refinement"]["agreement"]["label_pixels_equal"] == 1.0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_entropy_and_ap_under_precision(ade: Path, tmp_path: Path, precision: str) -> None:
    ent = runner.invoke(app, ["entropy", "--dataset", "ade20k", "--data-root", str(ade), "--precision", precision,
                              "--window-batch", "1", "-o", str(tmp_path / "ent"), *TINY])
    assert ent.exit_code == 0, ent.stderr
    stats = json.loads((tmp_path / "ent" / "entropy.json").read_text())
    assert stats["precision"] == precision and all(v["entropy"] > 0 for v in stats["stats"]["ade20k"].values())
    ap = runner.invoke(app, ["ap", "--dataset", "ade20k", "--data-root", str(ade), "--sources", "clip:0-1,dino_vits16",
                             "--pairs", "200", "--precision", precision, "-o", str(tmp_path / "ap"), *TINY])
    assert ap.exit_code == 0, ap.stderr
    results = json.loads((tmp_path / "ap" / "ap.json").read_text())
    assert results["precision"] == precision and set(results["results"]) == {"clip:0", "clip:1", "dino_vits16"}
