"""SAM refinement: the optimized implementation equals the original (Trident's reference, step
for step) on a tiny random SAM; the batched decoder equals SAM's own `predict_torch`."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from s2clip_cli.errors import S2ClipError
from s2clip_cli.models.sam import SAM_CHECKPOINT_FILES, SAM_VARIANTS, build_sam
from s2clip_cli.refine.benchmark import benchmark_refinement, synthetic_refine_inputs
from s2clip_cli.refine.sam_refine import _BatchedDecoder, sam_refine

sam_refine_module = importlib.import_module("s2clip_cli.refine.sam_refine")

H, W, C = 64, 96, 8
MIN_AREA = 20


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return build_sam("vit_b", tiny=True)


@pytest.fixture(scope="module")
def case(sam):
    """A predictor with the image set, the coarse maps, and an IoU threshold that splits the
    prompts roughly in half (midway between two predicted IoUs, so no value sits on it)."""
    image, labels, probs = synthetic_refine_inputs(1, seed=3, height=H, width=W, num_classes=C, cell=10)[0]
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    everything = sam_refine(image, labels, probs, C, predictor, min_area=MIN_AREA, iou_thresh=-1.0,
                            impl="original")
    ious = everything.scores.sort().values
    assert ious.numel() >= 8
    mid = ious.numel() // 2
    return image, labels, probs, predictor, float(ious[mid - 1] + ious[mid]) / 2


def _both(case, **kw):
    image, labels, probs, predictor, _ = case
    kw.setdefault("min_area", MIN_AREA)
    original = sam_refine(image, labels, probs, C, predictor, impl="original", **kw)
    optimized = sam_refine(image, labels, probs, C, predictor, impl="optimized", **kw)
    return original, optimized


def _assert_same(original, optimized) -> None:
    assert optimized.labels.dtype == original.labels.dtype == torch.long
    assert optimized.labels.shape == original.labels.shape == (1, H, W)
    assert torch.equal(original.labels, optimized.labels)
    torch.testing.assert_close(optimized.probs, original.probs, rtol=0, atol=1e-5)
    assert torch.equal(original.boxes, optimized.boxes)
    torch.testing.assert_close(optimized.scores, original.scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("coarse_thresh", [0.2, 0.0])
def test_some_pass_some_fail(case, coarse_thresh: float) -> None:
    image, labels, probs, _, thresh = case
    original, optimized = _both(case, iou_thresh=thresh, coarse_thresh=coarse_thresh)
    _assert_same(original, optimized)
    assert 0 < original.scores.numel()
    assert bool((original.scores > thresh).all())
    assert not torch.equal(original.labels, labels)  # the refinement changed something
    assert not torch.equal(original.probs, probs)


def test_all_pass(case) -> None:
    original, optimized = _both(case, iou_thresh=-1.0)
    _assert_same(original, optimized)


def test_all_fail_returns_the_inputs(case) -> None:
    image, labels, probs, _, _ = case
    original, optimized = _both(case, iou_thresh=1.01)
    for result in (original, optimized):
        assert torch.equal(result.labels, labels) and torch.equal(result.probs, probs)
        assert result.scores.numel() == 0 and result.boxes.shape == (0, 4)


def test_no_region_returns_the_inputs(case) -> None:
    image, labels, probs, _, _ = case
    original, optimized = _both(case, min_area=H * W)
    for result in (original, optimized):
        assert torch.equal(result.labels, labels) and torch.equal(result.probs, probs)


@pytest.mark.parametrize("ablation", ["use_cca", "use_box", "use_mask", "use_point"])
def test_ablations_agree(case, ablation: str) -> None:
    thresh = case[-1]
    original, optimized = _both(case, iou_thresh=thresh if ablation != "use_cca" else -1.0, **{ablation: False})
    _assert_same(original, optimized)
    full = sam_refine(*case[:3], C, case[3], min_area=MIN_AREA, iou_thresh=-1.0)
    if ablation == "use_cca":  # one prompt per class
        assert original.scores.numel() == len(torch.unique(case[1])) < full.scores.numel()
    else:
        assert not torch.equal(original.probs, full.probs)  # the dropped prompt mattered


def test_chunking_does_not_change_results(case, monkeypatch) -> None:
    """Chunk boundaries split classes; the per-class maxima still come out the same."""
    thresh = case[-1]
    reference = sam_refine(*case[:3], C, case[3], min_area=MIN_AREA, iou_thresh=thresh, impl="original")
    n_prompts = sam_refine(*case[:3], C, case[3], min_area=MIN_AREA, iou_thresh=-1.0).scores.numel()
    run = _BatchedDecoder.run
    calls: list[int] = []

    def counting_run(self, dense, group_of, sparse):
        calls.append(sparse.shape[0])
        return run(self, dense, group_of, sparse)

    monkeypatch.setattr(_BatchedDecoder, "run", counting_run)
    for size in (1, 3):
        calls.clear()
        monkeypatch.setattr(sam_refine_module, "_chunk_size", lambda device, image_hw, size=size: size)
        result = sam_refine(*case[:3], C, case[3], min_area=MIN_AREA, iou_thresh=thresh)
        _assert_same(reference, result)
        assert max(calls) == size and sum(calls) == n_prompts


def test_batched_decoder_equals_predict_torch(sam, case) -> None:
    predictor = case[3]
    gen = torch.Generator().manual_seed(1)
    n = 5
    points = torch.rand(n, 1, 2, generator=gen) * 1000
    ones = torch.ones(n, 1)
    boxes = torch.sort(torch.rand(n, 2, 2, generator=gen) * 1000, dim=1).values.reshape(n, 4)
    masks = [torch.rand(1, 256, 256, generator=gen) * 0.01 for _ in range(2)]
    group_of = torch.tensor([0, 0, 1, 1, 1])
    decoder = _BatchedDecoder(sam, predictor.features)
    with torch.no_grad():
        sparse, _ = sam.prompt_encoder(points=(points, ones), boxes=boxes, masks=None)
        dense = torch.stack([decoder.dense_from_3d_mask(m) for m in masks])
        iou, final, keys = decoder.run(dense, group_of, sparse)
        low_res = decoder.masks(final, keys)
        for g, mask in enumerate(masks):
            sel = group_of == g
            _, ref_iou, ref_low = predictor.predict_torch(points[sel], ones[sel], boxes[sel], mask,
                                                          multimask_output=False)
            torch.testing.assert_close(iou[sel], ref_iou[:, 0], rtol=0, atol=1e-5)
            torch.testing.assert_close(low_res[sel], ref_low, rtol=0, atol=1e-4)


def test_three_d_mask_prompt_quirk(sam) -> None:
    """The reference's [1, 256, 256] mask prompt gives a different dense embedding from a proper
    [1, 1, 256, 256] batch (LayerNorm2d over the wrong axis); the decoder reproduces the former."""
    mask = torch.rand(1, 256, 256) * 0.01
    decoder = _BatchedDecoder(sam, torch.zeros(1, 256, 64, 64))
    with torch.no_grad():
        quirky = decoder.dense_from_3d_mask(mask)
        proper = sam.prompt_encoder._embed_masks(mask[None])[0]
        _, reference_dense = sam.prompt_encoder(points=None, boxes=torch.zeros(1, 4), masks=mask)
    assert torch.equal(quirky, reference_dense)
    assert (quirky - proper).abs().max() > 1e-3


def test_bad_inputs_raise(sam, case) -> None:
    image, labels, probs, predictor, _ = case
    with pytest.raises(S2ClipError, match="same height and width"):
        sam_refine(image, labels[:, :-1], probs, C, predictor)
    with pytest.raises(S2ClipError, match=r"\[8, H, W\]"):
        sam_refine(image, labels, probs[:-1], C, predictor)
    with pytest.raises(S2ClipError, match="no image set"):
        sam_refine(image, labels, probs, C, SamPredictor(sam))
    with pytest.raises(S2ClipError, match="box or point"):
        sam_refine(image, labels, probs, C, predictor, use_box=False, use_point=False)
    with pytest.raises(S2ClipError, match="unknown SAM refinement"):
        sam_refine(image, labels, probs, C, predictor, impl="fast")


def test_benchmark_report(sam) -> None:
    samples = synthetic_refine_inputs(1, seed=0, height=H, width=W, num_classes=C, cell=10)
    report = benchmark_refinement(samples, sam, min_area=MIN_AREA, iou_thresh=1.01)
    assert report["agreement"]["label_pixels_equal"] == 1.0
    for impl in ("original", "optimized"):
        stages = report["median"][impl]
        assert stages["decode"] > 0 and stages["components"] > 0 and stages["passed"] == 0


def test_synthetic_inputs_have_many_regions() -> None:
    from s2clip_cli.refine.components import split_label_map
    from s2clip_cli.refine.sam_refine import _coarse_labels, _downsample

    image, labels, probs = synthetic_refine_inputs(1, seed=0)[0]
    assert image.shape == (448, 608, 3) and image.dtype == np.uint8
    assert labels.shape == (1, 448, 608) and probs.shape == (21, 448, 608)
    torch.testing.assert_close(probs.sum(0), torch.ones(448, 608))
    labels_down, probs_down = _downsample(labels, probs)
    labels_down, channels, split_last = _coarse_labels(labels_down, probs_down, 21, 0.2)
    regions = split_label_map(labels_down[0].numpy(), channels, probs_down, split_last=split_last,
                              min_area=225, coarse_thresh=0.2)
    assert len(regions) >= 100


def test_build_sam_variants_and_checkpoints(tmp_path) -> None:
    assert SAM_VARIANTS == ("vit_b", "vit_l", "vit_h") and set(SAM_CHECKPOINT_FILES) == set(SAM_VARIANTS)
    torch.manual_seed(1)
    model = build_sam("vit_l", tiny=True)
    path = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), path)
    torch.manual_seed(2)
    loaded = build_sam("vit_l", tiny=True, checkpoint=path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values(),
                                                   strict=True))
    state = model.state_dict()
    state.pop(next(iter(state)))
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(S2ClipError, match="partial.pth"):
        build_sam("vit_l", tiny=True, checkpoint=tmp_path / "partial.pth")
    (tmp_path / "corrupt.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(S2ClipError, match="corrupt.pth"):
        build_sam("vit_b", tiny=True, checkpoint=tmp_path / "corrupt.pth")
    with pytest.raises(S2ClipError, match="unknown SAM variant"):
        build_sam("vit_x")
