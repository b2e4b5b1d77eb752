"""`--method scclip` and `--method resclip` (tiny models): their rows and protocols, `segment` and
`eval` end to end, the head options in the evaluation's identity, SC-CLIP's whole image on a
non-square grid."""

from __future__ import annotations

import dataclasses
import json
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from s2clip_cli.cli import app
from s2clip_cli.commands.evaluate import run_config
from s2clip_cli.commands.methods import method_config
from s2clip_cli.data.class_names import read_class_file
from s2clip_cli.data.datasets import open_dataset
from s2clip_cli.data.presets import PRESETS
from s2clip_cli.data.synthetic import write_synthetic_dataset
from s2clip_cli.errors import S2ClipError
from s2clip_cli.evaluation.runner import evaluate
from s2clip_cli.methods import METHODS, get_method, resolve_protocol
from s2clip_cli.models.factory import LoadedModels, load_models
from s2clip_cli.pipeline.resclip import ResclipHead, ResclipParams
from s2clip_cli.pipeline.scclip import ScclipHead, ScclipParams
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig

runner = CliRunner()
TINY = ["--models", "tiny", "--device", "cpu"]
NEW = ("scclip", "resclip")


@pytest.fixture(scope="module")
def models() -> LoadedModels:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_models("ViT-B/16", None, None, mode="tiny")


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset("voc21", tmp_path_factory.mktemp("voc"), n_images=2, size=(64, 96))


def _segmenter(models: LoadedModels, method: str, preset: str | None = "voc21", **fields) -> Segmenter:
    cfg = method_config(SegmenterConfig(models="tiny", device="cpu", precision="fp32"), method,
                        PRESETS[preset] if preset else None)
    cfg = dataclasses.replace(cfg, **fields)
    return Segmenter.build(cfg, [["cat"], ["dog"]], ["sky", "wall"], models=models)


# ------------------------------------------------------------------------------- table
def test_rows_carry_each_repositorys_configs() -> None:
    assert list(METHODS)[-2:] == list(NEW)
    sc = resolve_protocol("scclip", "voc21")
    assert (sc.short_side, sc.crop, sc.stride, sc.whole_image, sc.logit_scale, sc.prob_thd, sc.area_thd) == (
        336, 224, 112, False, 50.0, 0.15, 0.1)
    assert sc.class_file == "sclip/voc21.txt" and sc.extra["pre_adjust_idx"] == 8 and sc.extra["res_cls"] == 0.3
    obj = resolve_protocol("scclip", "coco_object")
    assert (obj.logit_scale, obj.prob_thd, obj.class_file) == (55.0, 0.35, "sclip/coco_object.txt")
    assert resolve_protocol("scclip", "context60").prob_thd == 0.15
    assert resolve_protocol("scclip", "cityscapes").short_side == 560
    assert resolve_protocol("scclip", "ade20k").logit_scale == 40.0
    rv = resolve_protocol("resclip", "voc21")
    assert rv.whole_image and (rv.prob_thd, rv.logit_scale, rv.extra["temp_thd"]) == (0.1, 40.0, 0.5)
    assert (rv.extra["attn_rcs_weights"], rv.extra["attn_sfr_weights"]) == ((2.0, 0.3), (2.2, 0.7))
    ctx = resolve_protocol("resclip", "context60")
    assert (ctx.whole_image, ctx.crop, ctx.stride, ctx.prob_thd, ctx.extra["temp_thd"]) == (False, 224, 112, 0.1, 0.3)
    assert ctx.extra["attn_sfr_weights"] == (1.8, 0.7) and ctx.class_file == "context60.txt"
    assert resolve_protocol("resclip", "voc20").whole_image
    city = resolve_protocol("resclip", "cityscapes")
    assert (city.short_side, city.extra["temp_thd"], city.extra["attn_rcs_weights"]) == (560, 0.10, (2.0, 0.2))
    assert resolve_protocol("resclip", "ade20k").extra["attn_sfr_weights"] == (2.1, 0.7)
    resclip = get_method("resclip")
    assert (resclip.strategy, resclip.sigma, resclip.renormalize_probs, resclip.postprocess) == (
        "neighbourhood", 5.0, True, ())
    assert resclip.reported[0].miou["voc21"] == 61.1 and resclip.reported[0].miou["coco_stuff164k"] == 24.7
    b16 = [v for v in resclip.reported[0].miou.values() if v is not None]
    assert round(sum(b16) / len(b16), 1) == 41.4  # the average its issue cites
    assert "43.9" in get_method("scclip").reported[0].source
    assert "(i // h, i % h)" in get_method("scclip").deviations and "float16" in resclip.deviations


def test_sclip_class_files_add_the_person_and_tv_synonyms() -> None:
    root = resources.files("s2clip_cli.data").joinpath("class_names")
    for preset in ("voc21", "voc20", "coco_object"):
        ours = read_class_file(Path(str(root.joinpath(f"{preset}.txt"))), strict=False)  # COCO: "bed" twice
        sclip = read_class_file(Path(str(root.joinpath("sclip", f"{preset}.txt"))), strict=False)
        assert len(sclip) == len(ours) == PRESETS[preset].num_classes
        person = next(c for c in sclip if c[0] == "person")
        assert "person in shirt" in person and len(person) == (8 if preset == "coco_object" else 7)
        differing = [i for i, (a, b) in enumerate(zip(ours, sclip, strict=True)) if a != b]
        assert len(differing) == 2, preset  # person and tv; on COCO-Object person and the background words


def test_method_options_reach_the_head_and_only_these_heads() -> None:
    base = SegmenterConfig()
    cfg = method_config(base, "resclip", PRESETS["context60"])
    assert cfg.method_options["temp_thd"] == 0.3 and ResclipParams.from_options(cfg.method_options).temp_thd == 0.3
    assert ResclipParams.from_options(cfg.method_options).attn_sfr_weights == (1.8, 0.7)
    seg_default = method_config(base, "resclip", None)
    assert seg_default.method_options["temp_thd"] == 0.25 and not seg_default.whole_image
    sc = method_config(base, "scclip", PRESETS["voc21"])
    assert ScclipParams.from_options(sc.method_options) == ScclipParams()
    assert method_config(base, "naclip", PRESETS["voc21"]).method_options == {}
    # A method after another in `eval --method all` does not inherit the previous one's options.
    assert method_config(cfg, "sclip", PRESETS["context60"]).method_options == {}


def test_s2clip_methods_lists_both_rows() -> None:
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    sc = next(line for line in lines if line.startswith("scclip "))
    rc = next(line for line in lines if line.startswith("resclip "))
    assert "scclip over kk" in sc and "dropped/dropped" in sc
    assert "resclip over neighbourhood" in rc and "61.1" in rc and "86.0" in rc and "24.7" in rc
    assert any("scclip:" in line and "43.9" in line for line in lines)


# ------------------------------------------------------------------------------- Segmenter
@pytest.mark.parametrize("method", NEW)
def test_heads_and_their_layers(models: LoadedModels, method: str) -> None:
    seg = _segmenter(models, method)
    assert isinstance(seg.head, ScclipHead if method == "scclip" else ResclipHead)
    # tiny CLIP: 6 blocks; SC-CLIP reads blocks 1..4 (8, 3, 3..9 scaled), ResCLIP 2, 3 (5..8 scaled) and 4
    assert seg.layers == ([1, 2, 3, 4] if method == "scclip" else [2, 3, 4])
    image = np.random.default_rng(0).integers(0, 255, (80, 120, 3), dtype=np.uint8)
    with torch.no_grad():
        result = seg(image)
    assert result.labels.shape == (80, 120) and result.probs.shape == (3, 80, 120)
    if method == "resclip":  # NACLIP's renormalisation of the class probabilities
        torch.testing.assert_close(result.probs.sum(0), torch.ones(80, 120))


def test_scclip_whole_image_on_a_non_square_grid(models: LoadedModels) -> None:
    """SC-CLIP's own whole-image path raises IndexError (or repairs other patches) here; ours locates
    every outlier row-major, so the result does not depend on how the grid is oriented."""
    seg = _segmenter(models, "scclip", short_side=96, whole_image=True)
    image = np.random.default_rng(1).integers(0, 255, (96, 160, 3), dtype=np.uint8)  # 6 x 10 patches
    with torch.no_grad():
        logits = seg.predict_logits(image)
        transposed = seg.predict_logits(np.ascontiguousarray(image.transpose(1, 0, 2)))
    assert logits.shape[-2:] == (6, 10)  # whole image: the grid's logits, straight to the label size
    assert transposed.shape[-2:] == (10, 6)
    labels, _ = seg.classify(logits, image.shape[:2])
    assert labels.shape == image.shape[:2]


@pytest.mark.parametrize("method", NEW)
def test_windows_of_one_batch_give_what_one_at_a_time_gives(models: LoadedModels, method: str) -> None:
    """The LOF, the calibrated attention's mean and the SFR matrix are each window's own."""
    image = np.random.default_rng(2).integers(0, 255, (112, 176, 3), dtype=np.uint8)
    one, four = (_segmenter(models, method, "context60", short_side=112, crop=96, stride=40, window_batch=b)
                 for b in (1, 4))
    with torch.no_grad():
        torch.testing.assert_close(one.predict_logits(image), four.predict_logits(image), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize("method", NEW)
def test_segment_and_eval_run_the_method(method: str, voc: Path, tmp_path: Path) -> None:
    photo = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 90, 3), dtype=np.uint8)).save(photo)
    seg = runner.invoke(app, ["segment", str(photo), "--classes", "cat,dog", "--method", method, "--short-side", "96",
                              "-o", str(tmp_path / "out"), *TINY])
    assert seg.exit_code == 0, seg.stderr
    record = json.loads((tmp_path / "out" / "photo.json").read_text())
    assert record["run"]["method"] == method and not record["run"]["sam_prompts"]
    work = tmp_path / "eval"
    small = ["--short-side", "96"]  # the protocol's 336 at a third of the cost
    result = runner.invoke(app, ["eval", "--method", method, "--dataset", "voc21", "--data-root", str(voc),
                                 "--work-dir", str(work), "--num-workers", "0", *small, *TINY])
    assert result.exit_code == 0, result.stderr
    results = json.loads((work / "results.json").read_text())
    settings = results["settings"]
    assert settings["method"] == method and results["num_images"] == 2 and settings["short_side"] == 96 and set(settings["weights"]) == {"ViT-B/16"}
    assert settings["prob_thd"] == (0.15 if method == "scclip" else 0.1)
    if method == "resclip":
        assert settings["whole_image"] is True and settings["sigma"] == 5.0
        assert settings["method_options"]["temp_thd"] == 0.5
        assert settings["method_options"]["attn_sfr_weights"] == [2.2, 0.7]
    else:
        assert (settings["logit_scale"], settings["area_thd"]) == (50.0, 0.1)
        assert settings["method_options"]["pre_adjust_idx"] == 8
    assert 0.0 <= results["summary"]["mIoU"] <= 100.0


def test_the_method_and_its_head_options_are_part_of_the_evaluations_identity(models: LoadedModels, voc: Path,
                                                                               tmp_path: Path) -> None:
    ds = open_dataset("voc21", voc)
    first = _segmenter(models, "resclip")
    changed = _segmenter(models, "resclip",
                         method_options={**first.config.method_options, "attn_sfr_weights": (2.0, 0.7)})
    record_a, record_b = run_config(first.config, first), run_config(changed.config, changed)
    assert {k for k in record_a if record_a[k] != record_b[k]} == {"method_options"}
    scclip = _segmenter(models, "scclip")
    record_c = run_config(scclip.config, scclip)
    assert record_c["method"] == "scclip" and record_c["method_options"]["n_neighbors"] == 30

    def predict(image: np.ndarray, image_id: str) -> np.ndarray:
        return np.zeros(image.shape[:2], np.int64)

    evaluate(ds, predict, work_dir=tmp_path / "w", config=record_a, limit=1, num_workers=0)
    for other in (record_b, record_c):  # other SFR weights; another method
        with pytest.raises(S2ClipError, match="another configuration"):
            evaluate(ds, predict, work_dir=tmp_path / "w", config=other, num_workers=0)
