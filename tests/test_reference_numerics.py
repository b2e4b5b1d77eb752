"""The lineage's numerics, each held against our own transcription of the reference formulas (tiny
random models): mmseg's normalisation constants and the VFM's re-normalisation (ProxyCLIP, Trident),
the padding colour, NACLIP's whole-image pass (remainder dropped, logits stretched to the image) and
its renormalised class probabilities, SCLIP/ClearCLIP/ProxyCLIP's whole-image pass (logits straight
to the label size), Trident's mean(S) over its batch of windows against our per-window mean, and the
evaluation identity that refuses work dirs recorded before these numerics."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from eval_helpers import CONFIG, colour_predict

from s2clip_cli.commands.methods import method_config
from s2clip_cli.data.datasets import open_dataset
from s2clip_cli.data.synthetic import write_synthetic_dataset
from s2clip_cli.errors import S2ClipError
from s2clip_cli.evaluation.records import RecordLog, RunSignature, rank_log_path
from s2clip_cli.evaluation.runner import evaluate
from s2clip_cli.models.factory import LoadedModels, load_models
from s2clip_cli.pipeline.attention import dense_clip_features
from s2clip_cli.pipeline.fusion import proxy_attention
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig
from s2clip_cli.pipeline.transforms import clip_to_imagenet, normalize_pixels, resize_short_side

# Transcribed from the references: mmseg SegDataPreProcessor in every mmseg-family config; CLIP's and
# ImageNet's constants from ProxyCLIP's / Trident's UnNormalize and transforms.Normalize.
SEG_MEAN, SEG_STD = [122.771, 116.746, 104.094], [68.501, 66.632, 70.323]
OPENAI_MEAN, OPENAI_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IN_MEAN, IN_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def seg_data_preprocessor(pixels: torch.Tensor) -> torch.Tensor:
    """mmseg's ``SegDataPreProcessor`` on an RGB ``[3, H, W]`` uint8/float image."""
    mean, std = torch.tensor(SEG_MEAN).view(-1, 1, 1), torch.tensor(SEG_STD).view(-1, 1, 1)
    return (pixels.float() - mean) / std


def proxyclip_vfm_input(img: torch.Tensor) -> torch.Tensor:
    """ProxyCLIP's ``self.norm(self.unnorm(img[i]))`` for one ``[3, H, W]`` window."""
    image2 = torch.clone(img)
    for t, m, s in zip(image2, OPENAI_MEAN, OPENAI_STD, strict=True):
        t.mul_(s).add_(m)
    mean, std = torch.as_tensor(IN_MEAN), torch.as_tensor(IN_STD)
    return image2.sub(mean[:, None, None]).div(std[:, None, None])


def proxy_attention_reference(ex_feats: torch.Tensor, beta: float = 1.2, gamma: float = 3.0) -> torch.Tensor:
    """ProxyCLIP's / Trident's ``custom_attn`` attention: one ``torch.mean`` over the whole batch."""
    q_k = F.normalize(ex_feats.flatten(2, 3), dim=1)
    similarity = torch.einsum("b c m, b c n -> b m n", q_k, q_k)
    similarity = (similarity - torch.mean(similarity) * beta) * gamma
    similarity[similarity < 0.0] = float("-inf")
    return F.softmax(similarity, dim=-1)


def naclip_postprocess(seg_logits: torch.Tensor, query_idx: list[int], logit_scale: float,
                       prob_thd: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NACLIP's ``postprocess_result`` for one image ``[Q, H, W]``: (labels, class probabilities)."""
    seg_probs = torch.softmax(seg_logits * logit_scale, dim=0)
    idx = torch.tensor(query_idx)
    num_cls, num_queries = int(idx.max()) + 1, len(query_idx)
    if num_cls != num_queries:
        cls_index = F.one_hot(idx).T.view(num_cls, num_queries, 1, 1)
        seg_probs = (seg_probs.unsqueeze(0) * cls_index).max(1)[0]
    seg_pred = seg_probs.argmax(0, keepdim=True)
    seg_pred[seg_probs.max(0, keepdim=True)[0] < prob_thd] = 0
    seg_probs /= seg_probs.sum(0, keepdim=True)
    return seg_pred[0], seg_probs


@pytest.fixture(scope="module")
def models() -> dict[str, LoadedModels]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        base = load_models("ViT-B/16", "dino_vitb8", "vit_b", mode="tiny")
        b16 = load_models("ViT-B/16", "dino_vitb16", "vit_b", mode="tiny")
    return {"dino_vitb8": base, "dino_vitb16": dataclasses.replace(b16, clip=base.clip)}


def _segmenter(method: str, models: dict[str, LoadedModels], **fields) -> Segmenter:
    base = SegmenterConfig(models="tiny", device="cpu", precision="fp32", window_batch=1)
    cfg = dataclasses.replace(method_config(base, method, None), **fields)
    loaded = models["dino_vitb16" if cfg.vfm == "dino_vitb16" else "dino_vitb8"]
    return Segmenter.build(cfg, [["cat"], ["dog"]], ["sky", "wall"], models=loaded)


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    img[: h // 2, : w // 2] = (40, 200, 90)  # a flat region, where PAMR's sigma is rounding noise
    return img


# ----------------------------------------------------------------------------- cause 1: constants
def test_normalisation_is_mmseg_and_the_vfm_input_is_proxyclips() -> None:
    pixels = torch.from_numpy(_image(24, 40)).permute(2, 0, 1)
    clip_in = normalize_pixels(pixels.float())
    assert torch.equal(clip_in, seg_data_preprocessor(pixels))
    assert torch.equal(clip_to_imagenet(clip_in), proxyclip_vfm_input(clip_in))
    # Not CLIP's own transform: the constants differ at the 1e-5 level, which is the point.
    clip_own = (pixels.float() / 255 - torch.tensor(OPENAI_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_STD).view(3, 1, 1)
    assert 1e-7 < (clip_in - clip_own).abs().max().item() < 1e-3
    # ... and the VFM does not see the [0, 1] image either.
    imagenet_own = (pixels.float() / 255 - torch.tensor(IN_MEAN).view(3, 1, 1)) / torch.tensor(IN_STD).view(3, 1, 1)
    assert not torch.equal(clip_to_imagenet(clip_in), imagenet_own)


def test_the_segmenter_feeds_both_backbones_the_references_inputs_and_pads_with_zeros(models) -> None:
    seg = _segmenter("proxyclip", models, short_side=40, crop=48, stride=16)
    image = _image(30, 45, seed=1)
    resized = resize_short_side(image, 40)  # 40 x 60: windows 40 x 48, padded to 48 x 48
    expected = seg_data_preprocessor(torch.from_numpy(resized).permute(2, 0, 1))
    x = seg.prepare(image)
    assert torch.equal(x, expected)
    seen: dict[str, list[torch.Tensor]] = {"vfm": [], "clip": []}
    vfm_hook = seg.models.vfm.register_forward_pre_hook(lambda m, args: seen["vfm"].append(args[0].clone()))
    clip_hook = seg.models.clip.visual.conv1.register_forward_pre_hook(
        lambda m, args: seen["clip"].append(args[0].clone()))
    try:
        batches = seg.windows(x)
        seg.window_logits(batches[0].crops)
    finally:
        vfm_hook.remove()
        clip_hook.remove()
    (top, left), box = batches[0].offset, batches[0].boxes[0]
    assert (top, left) == (4, 0) and box == (0, 0, 40, 48)
    padded = F.pad(expected[:, 0:40, 0:48], (0, 0, 4, 4))  # ProxyCLIP: nn.functional.pad of the normalised crop
    assert torch.equal(seen["clip"][0][0], padded)
    assert torch.equal(seen["vfm"][0][0], proxyclip_vfm_input(padded))


# ----------------------------------------------------------------------------- cause 2: whole image
def test_naclip_whole_image_drops_the_remainder_and_stretches_to_the_image(models) -> None:
    seg = _segmenter("naclip", models, short_side=40, whole_image=True, pamr=False)
    image = _image(40, 57, seed=2)  # not resized; 57 = 3·16 + 9
    x = seg.prepare(image)
    clip = seg.models.clip
    # The patch conv ignores what does not fill a patch: cropping first changes nothing.
    conv = clip.visual.conv1
    assert torch.equal(conv(x[None]), conv(x[None, :, :32, :48]))
    tokens = dense_clip_features(clip, x[None, :, :32, :48], "neighbourhood", sigma=5.0)
    logits = F.normalize(tokens, dim=-1) @ seg.text.T  # NACLIP's forward_feature
    logits = logits.permute(0, 2, 1).reshape(-1, logits.shape[-1], 2, 3)
    expected = F.interpolate(logits, size=(40, 57), mode="bilinear", align_corners=False)[0]
    with torch.no_grad():
        ours = seg.predict_logits(image)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)
    # Padding to x16 instead (our earlier pass) gives other logits.
    padded = _segmenter("clip", models, short_side=40, whole_image=True)
    assert padded.method.window_remainder == "pad"


def test_sclip_whole_image_resizes_the_grid_straight_to_the_label_size(models) -> None:
    seg = _segmenter("sclip", models, short_side=48, whole_image=True)
    image = _image(40, 57, seed=3)  # resized to 48 x 68: grid 3 x 4, remainder 4 dropped
    x = seg.prepare(image)
    tokens = dense_clip_features(seg.models.clip, x[None, :, :48, :64], "csa", residual=True, ffn=True)
    grid = (F.normalize(tokens, dim=-1) @ seg.text.T).permute(0, 2, 1).reshape(1, -1, 3, 4)
    with torch.no_grad():
        ours = seg.predict_logits(image)
        labels, probs = seg.classify(ours, (40, 57))
    torch.testing.assert_close(ours, grid[0], rtol=1e-5, atol=1e-6)
    # SCLIP's forward_feature(inputs, ori_shape): one bilinear resize, then softmax and the name max.
    up = F.interpolate(grid, size=(40, 57), mode="bilinear", align_corners=False)[0]
    expected = torch.softmax(up * seg.config.logit_scale, dim=0)
    expected = torch.stack([expected[:2].amax(0), expected[2], expected[3]])
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def test_sclip_and_naclip_windows_are_unpadded_others_padded(models) -> None:
    for method, multiple in (("sclip", 1), ("naclip", 1), ("clearclip", 16)):
        seg = _segmenter(method, models, short_side=40, crop=48, stride=16)
        (batch, *_) = seg.windows(seg.prepare(_image(40, 60)))
        assert tuple(batch.crops.shape[-2:]) == ((40, 48) if multiple == 1 else (48, 48)), method


# ----------------------------------------------------------------------------- cause 3: NACLIP's renormalisation
def test_naclip_renormalises_the_merged_class_probabilities_after_the_labels(models) -> None:
    seg = _segmenter("naclip", models, prob_thd=0.3)
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 9, 11, generator=gen) * 0.05
    labels, probs = seg.classify(logits, (9, 11))
    ref_labels, ref_probs = naclip_postprocess(logits.clone(), [0, 0, 1, 2], 40.0, 0.3)
    assert torch.equal(labels, ref_labels)
    torch.testing.assert_close(probs, ref_probs, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs.sum(0), torch.ones(9, 11))
    # Without it (SCLIP) the max over two background names drops the other name's share: sums < 1.
    sclip = _segmenter("sclip", models, prob_thd=0.3, area_thd=None)
    _, plain = sclip.classify(logits, (9, 11))
    assert bool((plain.sum(0) < 1 - 1e-2).any())


# ----------------------------------------------------------------------------- cause 4: Trident's batch mean
def test_proxy_attention_means_per_window_or_over_the_batch() -> None:
    gen = torch.Generator().manual_seed(5)
    feats = torch.randn(2, 16, 5, 6, generator=gen)
    feats[1] += 0.7  # the second window is more self-similar: mean(S) 0.40 against 0.01
    batch = proxy_attention(feats, batch_mean=True)
    assert torch.equal(batch, proxy_attention_reference(feats))  # Trident: one batch, one mean
    per_window = proxy_attention(feats)
    for i in range(2):  # ProxyCLIP: one window per call
        assert torch.equal(per_window[i], proxy_attention_reference(feats[i : i + 1])[0])
    assert (per_window - batch).abs().max().item() > 1e-2


def test_trident_batches_every_window_of_the_image_and_s2clip_does_not_depend_on_batching(models) -> None:
    image = _image(64, 100, seed=6)
    trident = _segmenter("trident", models, short_side=64, crop=48, stride=32, window_batch=1)
    batches = trident.windows(trident.prepare(image))
    assert len(batches) == 1 and len(batches[0].boxes) == 6
    one, three = (_segmenter("s2clip", models, short_side=64, crop=48, stride=32, window_batch=b, sam=None)
                  for b in (1, 3))
    assert len(one.windows(one.prepare(image))) == 6
    with torch.no_grad():
        torch.testing.assert_close(one.predict_logits(image), three.predict_logits(image), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- old results are not resumed
def test_a_work_dir_recorded_before_the_lineage_numerics_is_refused(tmp_path: Path) -> None:
    root = write_synthetic_dataset("voc21", tmp_path / "VOC2012", n_images=2, size=(24, 32), seed=1)
    ds = open_dataset("voc21", root)
    old = {"config": CONFIG, "class_names": ds.class_names, "source": None}  # the identity before this change
    RecordLog(rank_log_path(tmp_path / "old", 0), RunSignature.create("voc21", 21, old)).close()
    with pytest.raises(S2ClipError, match="another configuration"):
        evaluate(ds, colour_predict, work_dir=tmp_path / "old", config=CONFIG, num_workers=0)
    evaluate(ds, colour_predict, work_dir=tmp_path / "new", config=CONFIG, limit=1, num_workers=0)
    resumed = evaluate(ds, colour_predict, work_dir=tmp_path / "new", config=CONFIG, num_workers=0)
    assert resumed["timings"]["images_this_run"] == 1
