"""The training-free methods in the pipeline: `--method` on segment/eval, `eval --method all` with its
comparison table, protocols applied and overridden, PAMR for NACLIP, SCLIP's area_thd and CLIPer's
coarse map against transcriptions of the references, every method under bf16 (tiny models)."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from s2clip_cli.cli import app
from s2clip_cli.commands.methods import method_class_names, method_config
from s2clip_cli.data.presets import PRESETS
from s2clip_cli.data.synthetic import write_synthetic_dataset
from s2clip_cli.errors import S2ClipError
from s2clip_cli.methods import METHODS
from s2clip_cli.models.factory import LoadedModels, load_models
from s2clip_cli.pipeline.cliper import cliper_coarse_map
from s2clip_cli.pipeline.method_features import stride_aligned_size
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig
from s2clip_cli.pipeline.transforms import resize_short_side
from s2clip_cli.pipeline.trident import round_up_to_multiple, sam_input_from_image
from s2clip_cli.refine.pamr import pamr

runner = CliRunner()
TINY = ["--models", "tiny", "--device", "cpu"]
NAMES = list(METHODS)


@pytest.fixture(scope="module")
def voc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset("voc21", tmp_path_factory.mktemp("voc"), n_images=1)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModels]:
    """Tiny models shared by the Segmenter-level tests: DINO-B/8 + SAM, and Trident's DINO-B/16
    around the same CLIP (so class names are embedded once)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        base = load_models("ViT-B/16", "dino_vitb8", "vit_b", mode="tiny")
        b16 = load_models("ViT-B/16", "dino_vitb16", "vit_b", mode="tiny")
    return {"dino_vitb8": base, "dino_vitb16": dataclasses.replace(b16, clip=base.clip)}


def _image(h: int = 72, w: int = 96, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def _segmenter(method: str, models: dict[str, LoadedModels], preset: str | None = "voc21",
               precision: str = "fp32", **explicit) -> Segmenter:
    base = SegmenterConfig(models="tiny", device="cpu", window_batch=2, precision=precision)
    cfg = method_config(base, method, PRESETS[preset] if preset else None, explicit)
    cfg = dataclasses.replace(cfg, refine=dataclasses.replace(cfg.refine, iou_thresh=-1.0, min_area=4))
    loaded = models["dino_vitb16" if cfg.vfm == "dino_vitb16" else "dino_vitb8"]
    return Segmenter.build(cfg, [["cat"], ["dog"]], ["sky", "wall"], models=loaded)


# ------------------------------------------------------------------------------- protocols
def test_a_methods_protocol_is_applied_and_explicit_options_win() -> None:
    base = SegmenterConfig()
    sclip = method_config(base, "sclip", PRESETS["voc21"])
    assert (sclip.method, sclip.logit_scale, sclip.short_side, sclip.crop, sclip.stride) == ("sclip", 65.0, 336, 224, 112)
    assert (sclip.prob_thd, sclip.area_thd, sclip.sam, sclip.pamr, sclip.whole_image) == (0.1, 0.1, None, False, False)
    mine = method_config(base, "sclip", PRESETS["voc21"], {"short_side": 500, "stride": 100, "logit_scale": 30.0})
    assert (mine.short_side, mine.crop, mine.stride, mine.logit_scale) == (500, 224, 100, 30.0)
    naclip = method_config(base, "naclip", PRESETS["voc21"])
    assert naclip.whole_image and naclip.pamr and naclip.pamr_dilations == (8, 16) and naclip.sigma == 5.0
    assert not method_config(base, "naclip", PRESETS["voc21"], {"pamr": False}).pamr
    assert not method_config(base, "naclip", PRESETS["voc21"], {"stride": 112}).whole_image  # windows asked for
    assert method_config(base, "clip", PRESETS["voc21"], {"pamr": True}).pamr
    trident = method_config(base, "trident", PRESETS["cityscapes"])
    assert (trident.vfm, trident.sam, trident.sam_refine, trident.cos_fac, trident.refine_neg_cos, trident.sam_halves) \
        == ("dino_vitb16", "vit_b", True, 3.0, False, True)
    assert (trident.short_side, trident.stride, trident.refine.coarse_thresh) == (688, 224, 0.10)
    no_sam = method_config(base, "trident", PRESETS["voc21"], {"no_sam": True})
    assert no_sam.sam == "vit_b" and not no_sam.sam_refine  # the guidance still needs SAM
    assert method_config(base, "s2clip", PRESETS["voc21"], {"no_sam": True}).sam is None
    cliper = method_config(base, "cliper", PRESETS["voc21"])
    assert (cliper.templates, cliper.logit_scale, cliper.whole_image, cliper.prob_thd, cliper.attention_thr,
            cliper.sd) == ("cliper_car15", 100.0, True, 0.0, 0.1, False)
    # S2CLIP under its own method is the preset, as before methods existed.
    s2 = method_config(base, "s2clip", PRESETS["context60"])
    p = PRESETS["context60"]
    assert (s2.short_side, s2.crop, s2.stride, s2.prob_thd, s2.logit_scale, s2.refine.coarse_thresh, s2.sd_threshold) \
        == (p.short_side, p.crop, p.stride, p.prob_thd, p.logit_scale, p.coarse_thresh, p.sd_threshold)
    assert method_class_names("clearclip", PRESETS["voc21"])[0] == ["background"]
    assert method_class_names("sclip", PRESETS["voc21"]) is None
    with pytest.raises(S2ClipError, match="--vfm does not apply to sclip"):
        method_config(base, "sclip", PRESETS["voc21"], {"vfm": "dino_vitb16"})
    assert method_config(base, "sclip", PRESETS["voc21"], {"vfm": "dino_vitb16"}, strict=False).vfm == "dino_vitb8"


def test_segment_defaults_come_from_the_method() -> None:
    base = SegmenterConfig(prob_thd=0.2)
    assert (method_config(base, "s2clip", None).short_side, method_config(base, "s2clip", None).stride) == (448, 112)
    sclip = method_config(base, "sclip", None)
    assert (sclip.short_side, sclip.crop, sclip.stride, sclip.logit_scale, sclip.area_thd) == (336, 224, 112, 40.0, None)
    assert method_config(base, "cliper", None).prob_thd == 0.0 and method_config(base, "clip", None).prob_thd == 0.2


# ------------------------------------------------------------------------------- CLI end to end
def test_eval_method_all_runs_every_method_and_writes_the_comparison(voc: Path, tmp_path: Path) -> None:
    work = tmp_path / "all"
    result = runner.invoke(app, ["eval", "--method", "all", "--dataset", "voc21", "--data-root", str(voc),
                                 "--work-dir", str(work), "--num-workers", "0", *TINY])
    assert result.exit_code == 0, result.stderr
    table = json.loads((work / "comparison.json").read_text())
    assert table["datasets"] == ["voc21"] and list(table["methods"]) == NAMES
    for name in NAMES:
        results = json.loads((work / name / "results.json").read_text())
        assert results["config"]["method"] == name and results["settings"]["method"] == name
        assert results["num_images"] == 1
        cell = table["methods"][name]["datasets"]["voc21"]
        assert cell["miou"] == pytest.approx(results["summary"]["mIoU"])
        assert cell["reported"] == METHODS[name].reported[0].miou["voc21"]
    sclip = json.loads((work / "sclip" / "results.json").read_text())["settings"]
    assert (sclip["logit_scale"], sclip["short_side"], sclip["crop"], sclip["stride"], sclip["area_thd"]) == (
        65.0, 336, 224, 112, 0.1)
    naclip = json.loads((work / "naclip" / "results.json").read_text())["settings"]
    assert naclip["pamr"] == {"iterations": 10, "dilations": [8, 16]} and naclip["whole_image"] is True
    assert set(naclip["weights"]) == {"ViT-B/16"}  # only what the method runs
    markdown = (work / "comparison.md").read_text()
    assert markdown.count("\n| ") == 1 + len(NAMES) and "| sclip | " in markdown and "(59.63)" in markdown


def test_eval_one_method_with_an_explicit_option(voc: Path, tmp_path: Path) -> None:
    work = tmp_path / "sclip"
    result = runner.invoke(app, ["eval", "--method", "sclip", "--dataset", "voc21", "--data-root", str(voc),
                                 "--work-dir", str(work), "--short-side", "200", "--num-workers", "0", *TINY])
    assert result.exit_code == 0, result.stderr
    results = json.loads((work / "results.json").read_text())
    assert results["config"]["method"] == "sclip" and results["config"]["short_side"] == 200
    assert (results["settings"]["short_side"], results["settings"]["logit_scale"]) == (200, 65.0)
    bad = runner.invoke(app, ["eval", "--method", "sclip", "--vfm", "dino_vitb16", "--dataset", "voc21",
                              "--data-root", str(voc), "--work-dir", str(tmp_path / "bad"), *TINY])
    assert bad.exit_code == 2 and "--vfm does not apply to sclip" in bad.stderr and "Traceback" not in bad.stderr
    unknown = runner.invoke(app, ["eval", "--method", "nope", "--dataset", "voc21", *TINY])
    assert unknown.exit_code == 2 and "nope" in unknown.stderr


@pytest.mark.parametrize("method", NAMES)
def test_segment_runs_every_method(method: str, photo: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["segment", str(photo), "--classes", "cat,dog", "--no-background", "--method", method,
                                 "--iou-thresh", "-1", "-o", str(tmp_path), *TINY])
    assert result.exit_code == 0, result.stderr
    record = json.loads((tmp_path / "photo.json").read_text())
    assert record["run"]["method"] == method and record["config"]["method"] == method
    assert Image.open(tmp_path / "photo_mask.png").size == (96, 72)
    assert record["run"]["sam_prompts"] == ("sam" in METHODS[method].postprocess)
    assert record["run"]["pamr"] == (method == "naclip")
    if method == "trident":
        assert {"sam_guidance", "sam_refine"} <= set(record["timings_s"])


def test_methods_command_lists_nine_rows() -> None:
    result = runner.invoke(app, ["methods"])
    assert result.exit_code == 0, result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines() if line.split() and line.split()[0] in METHODS]
    assert rows == NAMES
    sclip = next(line for line in result.stdout.splitlines() if line.startswith("sclip "))
    assert "csa" in sclip and "kept/kept" in sclip and "59.63" in sclip


# ------------------------------------------------------------------------------- Segmenter level
def test_pamr_is_applied_for_naclip(models: dict[str, LoadedModels]) -> None:
    image = _image()
    with_pamr = _segmenter("naclip", models)
    without = _segmenter("naclip", models, pamr=False)
    assert with_pamr.config.pamr and not without.config.pamr
    size = image.shape[:2]
    with torch.no_grad():
        logits = without.predict_logits(image)
        _, probs_plain = without.coarse(image, size)
        _, probs_pamr = with_pamr.coarse(image, size)
        # Independently: PAMR on the cosines at label size with NACLIP's `inputs` (the resized image,
        # mmseg's SegDataPreProcessor constants) resized to that size.
        resized = resize_short_side(image, with_pamr.config.short_side)
        x = torch.from_numpy(resized).permute(2, 0, 1).float()[None]
        mean = torch.tensor([122.771, 116.746, 104.094]).view(1, 3, 1, 1)
        std = torch.tensor([68.501, 66.632, 70.323]).view(1, 3, 1, 1)
        normed = F.interpolate((x - mean) / std, size=size, mode="bilinear", align_corners=False)
        up = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)
        expected = pamr(normed, up, iterations=10, dilations=(8, 16))[0]
        _, expected_probs = with_pamr.classify(expected, size)
    torch.testing.assert_close(probs_pamr, expected_probs, atol=1e-6, rtol=0)
    assert not torch.allclose(probs_pamr, probs_plain, atol=1e-3)


def test_sclip_area_threshold_matches_the_reference_rule(models: dict[str, LoadedModels]) -> None:
    seg = _segmenter("sclip", models)
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 20, 30, generator=gen) * 3, dim=0)
    probs[2] = 1e-3
    probs[2, :2, :2] = 5.0  # class 2 wins on 4 of 600 pixels only
    # SCLIP's postprocess_result: one-hot argmax [H, W, C], foreground areas, keep area > thd * total.
    pred = F.one_hot(probs.argmax(0), 3).to(probs.dtype)
    area = pred[:, :, 1:].sum((0, 1), keepdim=True)
    keep = (area > 0.1 * area.sum()).to(probs.dtype)
    expected = probs.clone()
    expected[1:] *= keep.transpose(0, -1)
    assert bool((expected[2] == 0).all()) and bool((expected[1] == probs[1]).all())
    assert torch.equal(seg.drop_small_classes(probs), expected)


def test_cliper_coarse_map_matches_a_transcription() -> None:
    gen = torch.Generator().manual_seed(3)
    layers, h, w, e, q, heads = 4, 3, 5, 8, 6, 2
    feats = torch.randn(layers, 1, h * w, e, generator=gen)
    attn = torch.softmax(torch.randn(1, heads, 1 + h * w, 1 + h * w, generator=gen), dim=-1)
    text = F.normalize(torch.randn(q, e, generator=gen), dim=-1)
    extra = F.normalize(text[2:].mean(0, keepdim=True), dim=-1)
    out = cliper_coarse_map(feats, attn, text, extra, (h, w), logit_scale=50.0, attention_thr=0.3)
    # CLIPer.forward: classify per layer against [fg, bg, mean fg], softmax, keep the first channels,
    # threshold the last layer in place, propagate with the head-mean attention, add the layer mean.
    text_features = torch.cat([text, text[2:].mean(0, keepdim=True)])
    x = feats[:, 0] / feats[:, 0].norm(dim=-1, keepdim=True)
    logits = 50.0 * x @ (text_features / text_features.norm(dim=-1, keepdim=True)).t()
    seg = logits.transpose(-1, -2).reshape(-1, len(text_features), h, w).softmax(-3)[:, :q]
    seg_last = seg[-1]
    seg_last[seg_last < seg_last.amax((-1, -2), keepdim=True) * 0.3] = 0
    seg_last = (seg_last.flatten(-2, -1) @ attn[0].mean(0)[1:, 1:]).unflatten(-1, (h, w))
    expected = seg_last + seg.mean(0)
    torch.testing.assert_close(out[0], expected, atol=1e-6, rtol=1e-6)


def test_trident_resize_and_sam_grid(models: dict[str, LoadedModels]) -> None:
    def preprocess_image(h: int, w: int, stride: int, crop: int) -> tuple[int, int]:  # Trident's, transcribed
        longer = max(h, w)
        if h % stride == 0 and w % stride == 0:
            return h, w
        dst = (longer // stride + 1) * stride if longer % stride else longer
        new_h, new_w = int(h * dst / longer), int(w * dst / longer)
        new_h = (new_h // stride + 1) * stride if new_h % stride else new_h
        new_w = (new_w // stride + 1) * stride if new_w % stride else new_w
        return max(new_h, crop), max(new_w, crop)

    for h, w in ((448, 597), (336, 448), (500, 375), (100, 700), (689, 1376)):
        assert stride_aligned_size(h, w, 16, 336) == preprocess_image(h, w, 16, 336)
    seg = _segmenter("trident", models)
    image = _image(60, 90)
    with torch.no_grad():
        logits = seg.predict_logits(image)
    _, valid = sam_input_from_image(models["dino_vitb16"].sam, round_up_to_multiple(image, 16))
    assert tuple(logits.shape) == (len(seg.queries.names), *valid)
    assert seg.layers == [seg.models.clip.num_blocks - 2]


@pytest.mark.parametrize("precision", ["bf16"])
def test_every_method_runs_under_reduced_precision(models: dict[str, LoadedModels], precision: str) -> None:
    image = _image(64, 80, seed=2)
    for method in NAMES:
        seg = _segmenter(method, models, preset=None, precision=precision, short_side=64)
        assert seg.dtype == torch.bfloat16
        result = seg(image)
        assert result.probs.dtype == torch.float32 and bool(torch.isfinite(result.probs).all()), method
        assert result.labels.shape == image.shape[:2], method
        assert set(np.unique(result.labels)) <= set(range(seg.queries.num_classes)), method


def test_layer_and_sam_options_that_a_method_cannot_use(models: dict[str, LoadedModels]) -> None:
    with pytest.raises(S2ClipError, match="--layers applies to the proxy-attention methods"):
        Segmenter.build(SegmenterConfig(method="clearclip", layers=[2], models="tiny", device="cpu"), [["cat"]], None,
                        models=models["dino_vitb8"])
    with pytest.raises(S2ClipError, match="trident needs a SAM model"):
        Segmenter.build(SegmenterConfig(method="trident", sam=None, models="tiny", device="cpu"), [["cat"]], None,
                        models=models["dino_vitb16"])
    proxy = _segmenter("proxyclip", models)
    assert proxy.layers == [proxy.models.clip.num_blocks - 2]
    assert _segmenter("proxyclip", models, layers=[2, 3]).layers == [2, 3]


def test_a_method_without_vfm_needs_no_vfm_weights(tmp_path: Path) -> None:
    """clearclip uses no VFM: a fresh machine is asked only for CLIP's weights."""
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    result = CliRunner().invoke(app, ["segment", str(image), "--classes", "cat", "--method", "clearclip",
                                      "--no-sam", "--offline", "--device", "cpu", "-o", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "ViT-B/16" in result.stderr and "dino" not in result.stderr
