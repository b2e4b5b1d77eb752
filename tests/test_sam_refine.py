"""SAM refinement: the optimized implementation (with either batched decoder) equals the original
(Trident's reference, step for step) on a tiny random SAM, also under CPU autocast; both batched
decoders equal SAM's own `predict_torch` per class."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from s2clip_cli.errors import S2ClipError
from s2clip_cli.models.sam import SAM_CHECKPOINT_FILES, SAM_VARIANTS, build_sam
from s2clip_cli.refine import sam_optimized
from s2clip_cli.refine.benchmark import benchmark_refinement, synthetic_refine_inputs
from s2clip_cli.refine.sam_decoder import (
    DECODERS,
    FastDecoder,
    SamDecoder,
    class_dense_embeddings,
    make_decoder,
)
from s2clip_cli.refine.sam_refine import sam_refine

H, W, C = 64, 96, 8
MIN_AREA = 40  # 13 regions of 8 classes: enough to split, few enough to keep the tests fast


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return build_sam("vit_b", tiny=True)


@pytest.fixture(scope="module")
def refine(sam):
    """`refine(**kw)`: `sam_refine` on the module's coarse maps, memoised by its arguments (the
    reference runs several tests compare against are computed once). `refine.inputs` holds
    (image, labels, probs, predictor)."""
    image, labels, probs = synthetic_refine_inputs(1, seed=3, height=H, width=W, num_classes=C, cell=10)[0]
    predictor = SamPredictor(sam)
    predictor.set_image(image)
    cache: dict[tuple, object] = {}

    def run(**kw):
        kw = {"min_area": MIN_AREA, "impl": "optimized", "decoder": "sam", **kw}
        if kw["impl"] == "original":
            kw.pop("decoder")  # the original always decodes with predict_torch
        key = tuple(sorted(kw.items()))
        if key not in cache:
            cache[key] = sam_refine(image, labels, probs, C, predictor, **kw)
        return cache[key]

    run.inputs = (image, labels, probs, predictor)
    return run


@pytest.fixture(scope="module")
def split_thresh(refine) -> float:
    """An IoU threshold that splits the prompts roughly in half (midway between two predicted
    IoUs, so no value sits on it)."""
    ious = refine(impl="original", iou_thresh=-1.0).scores.sort().values
    assert ious.numel() >= 8
    mid = ious.numel() // 2
    return float(ious[mid - 1] + ious[mid]) / 2


def _both(refine, decoder: str = "sam", **kw):
    return refine(impl="original", **kw), refine(impl="optimized", decoder=decoder, **kw)


def _assert_same(original, optimized) -> None:
    assert optimized.labels.dtype == original.labels.dtype == torch.long
    assert optimized.labels.shape == original.labels.shape == (1, H, W)
    assert torch.equal(original.labels, optimized.labels)
    torch.testing.assert_close(optimized.probs, original.probs, rtol=0, atol=1e-5)
    assert torch.equal(original.boxes, optimized.boxes)
    torch.testing.assert_close(optimized.scores, original.scores, rtol=0, atol=1e-5)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("coarse_thresh", [0.2, 0.0])
def test_some_pass_some_fail(refine, split_thresh, coarse_thresh: float, decoder: str) -> None:
    _, labels, probs, _ = refine.inputs
    original, optimized = _both(refine, decoder, iou_thresh=split_thresh, coarse_thresh=coarse_thresh)
    _assert_same(original, optimized)
    assert 0 < original.scores.numel() < refine(impl="original", iou_thresh=-1.0).scores.numel()
    assert bool((original.scores > split_thresh).all())
    assert not torch.equal(original.labels, labels)  # the refinement changed something
    assert not torch.equal(original.probs, probs)


@pytest.mark.parametrize("decoder", DECODERS)
def test_all_pass(refine, decoder: str) -> None:
    _assert_same(*_both(refine, decoder, iou_thresh=-1.0))


def test_all_fail_returns_the_inputs(refine) -> None:
    _, labels, probs, _ = refine.inputs
    for result in _both(refine, iou_thresh=1.01):
        assert torch.equal(result.labels, labels) and torch.equal(result.probs, probs)
        assert result.scores.numel() == 0 and result.boxes.shape == (0, 4)


def test_no_region_returns_the_inputs(refine) -> None:
    _, labels, probs, _ = refine.inputs
    for result in _both(refine, min_area=H * W):
        assert torch.equal(result.labels, labels) and torch.equal(result.probs, probs)


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("ablation", ["use_cca", "use_box", "use_mask", "use_point"])
def test_ablations_agree(refine, split_thresh, ablation: str, decoder: str) -> None:
    thresh = split_thresh if ablation != "use_cca" else -1.0
    original, optimized = _both(refine, decoder, iou_thresh=thresh, **{ablation: False})
    _assert_same(original, optimized)
    full = refine(impl="original", iou_thresh=-1.0)
    if ablation == "use_cca":  # one prompt per class
        assert original.scores.numel() == len(torch.unique(refine.inputs[1])) < full.scores.numel()
    else:
        assert not torch.equal(original.probs, full.probs)  # the dropped prompt mattered


@pytest.mark.parametrize("decoder_class", [SamDecoder, FastDecoder])
def test_chunking_does_not_change_results(refine, split_thresh, monkeypatch, decoder_class) -> None:
    """Chunk boundaries split classes; the per-class maxima still come out the same."""
    decoder = "sam" if decoder_class is SamDecoder else "fast"
    reference = refine(impl="original", iou_thresh=split_thresh)
    n_prompts = refine(impl="original", iou_thresh=-1.0).scores.numel()
    decode = decoder_class.decode
    calls: list[tuple[int, int]] = []

    def counting_decode(self, dense, group_of, sparse):
        calls.append((sparse.shape[0], dense.shape[0]))
        return decode(self, dense, group_of, sparse)

    monkeypatch.setattr(decoder_class, "decode", counting_decode)
    image, labels, probs, predictor = refine.inputs
    for size in (1, 5) if decoder_class is FastDecoder else (5,):
        calls.clear()
        monkeypatch.setattr(sam_optimized, "_chunk_size", lambda device, image_hw, size=size: size)
        result = sam_refine(image, labels, probs, C, predictor, min_area=MIN_AREA, iou_thresh=split_thresh,
                            decoder=decoder)
        _assert_same(reference, result)
        assert max(n for n, _ in calls) == size and sum(n for n, _ in calls) == n_prompts
    assert max(k for _, k in calls) > 1  # a chunk held prompts of several classes


def test_chunk_size_follows_the_image_size() -> None:
    cpu = torch.device("cpu")
    sizes = [sam_optimized._chunk_size(cpu, hw) for hw in [(64, 96), (448, 608), (2048, 4096), (20000, 20000)]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[2] and sizes[-1] == 1
    per_prompt = sam_optimized.CHUNK_BUDGET_CPU // sizes[1]  # 448x608: maps plus the decoder's working set
    assert 16 * 448 * 608 + sam_optimized.DECODER_BYTES_PER_PROMPT < per_prompt < 2 * sam_optimized.DECODER_BYTES_PER_PROMPT


@pytest.mark.parametrize("decoder", DECODERS)
def test_batched_decoder_equals_predict_torch(sam, refine, decoder: str) -> None:
    """Prompts of two classes (their own dense embeddings) in one batch equal one `predict_torch`
    call per class with that class's 3-D mask prompt."""
    predictor = refine.inputs[3]
    gen = torch.Generator().manual_seed(1)
    n = 5
    points = torch.rand(n, 1, 2, generator=gen) * 1000
    ones = torch.ones(n, 1)
    boxes = torch.sort(torch.rand(n, 2, 2, generator=gen) * 1000, dim=1).values.reshape(n, 4)
    masks = torch.rand(2, 256, 256, generator=gen) * 0.01
    group_of = torch.tensor([0, 0, 1, 1, 1])
    batch_decoder = make_decoder(decoder, sam, predictor.features)
    with torch.no_grad():
        sparse, _ = sam.prompt_encoder(points=(points, ones), boxes=boxes, masks=None)
        iou = batch_decoder.decode(class_dense_embeddings(sam, masks), group_of, sparse)
        passing = torch.tensor([True, False, True, True, False])
        low_res = batch_decoder.low_res_masks(passing)
        assert low_res.shape == (int(passing.sum()), 1, 256, 256)
        for g, mask in enumerate(masks):
            sel = group_of == g
            _, ref_iou, ref_low = predictor.predict_torch(points[sel], ones[sel], boxes[sel], mask[None],
                                                          multimask_output=False)
            torch.testing.assert_close(iou[sel], ref_iou[:, 0], rtol=0, atol=1e-5)
            torch.testing.assert_close(low_res[sel[passing]], ref_low[passing[sel]], rtol=0, atol=1e-4)


def test_three_d_mask_prompt_quirk(sam) -> None:
    """The reference's [1, 256, 256] mask prompt gives a different dense embedding from a proper
    [1, 1, 256, 256] batch (LayerNorm2d over the wrong axis); the decoders are given the former."""
    mask = torch.rand(1, 256, 256) * 0.01
    with torch.no_grad():
        quirky = class_dense_embeddings(sam, mask)[0]
        _, proper = sam.prompt_encoder(points=None, boxes=None, masks=mask[None])
        _, reference_dense = sam.prompt_encoder(points=None, boxes=torch.zeros(1, 4), masks=mask)
    # vmap runs the classes as one batched convolution, the reference one at a time: other kernels,
    # so float32 agreement (the quirk itself moves values by > 1e-3, a thousand times more).
    torch.testing.assert_close(quirky, reference_dense, rtol=1e-5, atol=1e-6)
    assert (quirky - proper[0]).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_callers(sam, refine, split_thresh, dtype: torch.dtype) -> None:
    """Under a caller's CPU autocast (image embedding in low precision too) nothing crashes, the
    implementations agree, and decoding is float32: the results equal a run outside autocast on
    the same embedding."""
    image, labels, probs, fp32_predictor = refine.inputs
    predictor = SamPredictor(sam)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        predictor.set_image(image)
    assert not torch.allclose(predictor.features.float(), fp32_predictor.features, rtol=0, atol=1e-4)  # rounded
    kw = {"min_area": MIN_AREA, "iou_thresh": split_thresh}
    fp32 = sam_refine(image, labels, probs, C, predictor, impl="optimized", **kw)
    with torch.autocast("cpu", dtype=dtype):
        results = [sam_refine(image, labels, probs, C, predictor, impl="optimized", decoder=d, **kw)
                   for d in DECODERS]
        results.append(sam_refine(image, labels, probs, C, predictor, impl="original", **kw))
    assert 0 < fp32.scores.numel() and not torch.equal(fp32.labels, labels)
    for result in results:
        assert result.probs.dtype == torch.float32
        _assert_same(fp32, result)


def test_bad_inputs_raise(sam, refine) -> None:
    image, labels, probs, predictor = refine.inputs
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
    with pytest.raises(S2ClipError, match="unknown SAM prompt decoder"):
        sam_refine(image, labels, probs, C, predictor, decoder="slow")


def test_benchmark_report(sam) -> None:
    samples = synthetic_refine_inputs(1, seed=0, height=H, width=W, num_classes=C, cell=10)
    report = benchmark_refinement(samples, sam, min_area=60, iou_thresh=1.01)
    assert report["agreement"]["label_pixels_equal"] == 1.0
    for impl in ("original", "optimized"):
        stages = report["median"][impl]
        assert stages["decode"] > 0 and stages["components"] > 0 and stages["passed"] == 0


def test_synthetic_inputs_have_many_regions() -> None:
    from s2clip_cli.refine.components import split_label_map
    from s2clip_cli.refine.sam_prompts import prepare_coarse

    image, labels, probs = synthetic_refine_inputs(1, seed=0)[0]
    assert image.shape == (448, 608, 3) and image.dtype == np.uint8
    assert labels.shape == (1, 448, 608) and probs.shape == (21, 448, 608)
    torch.testing.assert_close(probs.sum(0), torch.ones(448, 608))
    coarse = prepare_coarse(labels, probs, 21, 0.2)
    regions = split_label_map(coarse.labels[0].numpy(), coarse.n_channels, coarse.probs,
                              split_last=coarse.split_last, min_area=225, coarse_thresh=0.2)
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
