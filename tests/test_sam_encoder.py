"""SAM's image encoder with its attention through `scaled_dot_product_attention` (`models/sam_fused.py`)
against segment-anything's own forward, on shared random weights: every variant's global and windowed
blocks (fp32 within 1e-5 relative), the whole encoder (tiny here; full-size ViT-B at 1024 in the slow
list), mixed precision within the reference's own error, the mask built a few heads at a time, and
`segment`'s labels with SAM refinement unchanged."""

from __future__ import annotations

import copy
from functools import partial

import numpy as np
import pytest
import torch
from sam_helpers import randomise_rel_pos
from segment_anything.modeling.image_encoder import Attention, Block

from s2clip_cli.models import sam_fused
from s2clip_cli.models.sam import _ENCODER_SHAPES, build_sam
from s2clip_cli.models.sam_fused import (
    CpuFloat32Conv2d,
    SdpaAttention,
    use_reference_attention,
    use_sdpa_attention,
)
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig


def _rel_diff(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def _pair(module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, segment-anything's) — the same weights, the two forwards."""
    return use_sdpa_attention(module), use_reference_attention(copy.deepcopy(module))


def test_build_sam_uses_sdpa_attention_with_segment_anythings_parameters() -> None:
    sam = build_sam("vit_b", tiny=True)
    attns = [m for m in sam.image_encoder.modules() if isinstance(m, Attention)]
    assert attns and all(type(m) is SdpaAttention for m in attns)
    keys = set(sam.state_dict())
    use_reference_attention(sam.image_encoder)
    assert all(type(m) is Attention for m in attns) and set(sam.state_dict()) == keys


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_encoder_convolutions_compute_in_float32_under_cpu_autocast(dtype: torch.dtype) -> None:
    """CPU autocast would send SAM's convolutions to PyTorch's slow bf16/fp16 reference kernel (18 s
    per image on CPUs without native support): they run in float32, exactly as without autocast."""
    sam = build_sam("vit_b", tiny=True)
    convs = [m for m in sam.image_encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(type(m) is CpuFloat32Conv2d for m in convs)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    conv = sam.image_encoder.patch_embed.proj
    with torch.no_grad():
        exact = conv(x)
        with torch.autocast("cpu", dtype=dtype):
            low = conv(x)
            plain = torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride)
    assert plain.dtype == dtype  # (what autocast alone does)
    assert low.dtype == torch.float32 and torch.equal(low, exact)


# (variant, global block?, grid): ViT-B's global blocks at SAM's own 64x64 grid; the others at 32x32,
# where segment-anything resizes the relative-position tables (the path of a smaller input).
@pytest.mark.parametrize(("variant", "window", "grid"), [
    ("vit_b", 0, 64), ("vit_b", 14, 64), ("vit_l", 0, 32), ("vit_l", 14, 32), ("vit_h", 0, 32), ("vit_h", 14, 32),
])
def test_each_variants_blocks_equal_segment_anythings(variant: str, window: int, grid: int) -> None:
    dim, _, heads, _ = _ENCODER_SHAPES[variant]
    torch.manual_seed(0)
    block = Block(dim, heads, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                  window_size=window, input_size=(64, 64) if window == 0 else (window, window)).eval()
    randomise_rel_pos(block, seed=1)
    ours, ref = _pair(block)
    x = torch.randn(1, grid, grid, dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert _rel_diff(ours(x), ref(x)) < 1e-5


def test_the_mask_built_a_few_heads_at_a_time_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    attn = Attention(96, num_heads=6, use_rel_pos=True, input_size=(24, 24)).eval()
    randomise_rel_pos(attn, seed=3)
    x = torch.randn(2, 24, 24, 96, generator=torch.Generator().manual_seed(4))  # two images
    ours, ref = _pair(attn)
    with torch.no_grad():
        whole = ours(x)
        monkeypatch.setattr(sam_fused, "MASK_BUDGET_BYTES", 5 * 576 * 576 * 4)  # 5 of 12 (image, head) maps
        chunked = ours(x)
        expected = ref(x)
    assert _rel_diff(whole, expected) < 1e-5
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_encoders() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    encoder = build_sam("vit_b", tiny=True).image_encoder
    randomise_rel_pos(encoder, seed=2)
    ours, ref = _pair(encoder)
    return ours, ref, torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(5))


def test_the_whole_tiny_encoder_equals_segment_anythings(tiny_encoders) -> None:
    ours, ref, x = tiny_encoders
    with torch.no_grad():
        assert _rel_diff(ours(x), ref(x)) < 1e-5


@pytest.mark.parametrize("window", [0, 14])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_under_autocast_the_error_is_the_references_own(dtype: torch.dtype, window: int) -> None:
    """Under CPU autocast (as on CUDA), a fused block is about as close to the fp32 output as
    segment-anything's own block is under the same autocast."""
    torch.manual_seed(0)
    block = Block(64, 2, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                  window_size=window, input_size=(64, 64) if window == 0 else (window, window)).eval()
    randomise_rel_pos(block, seed=9)
    ours, ref = _pair(block)
    x = torch.randn(1, 40, 40, 64, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        exact = ref(x)
        with torch.autocast("cpu", dtype=dtype):
            ours_low, ref_low = ours(x), ref(x)
    assert ours_low.dtype == ref_low.dtype
    ours_err, ref_err = _rel_diff(ours_low, exact), _rel_diff(ref_low, exact)
    # (measured: bf16 0.7x the reference's error, fp16 1.3-1.7x: the summed relative-position mask is
    # rounded to half precision once, where segment-anything rounds logits and terms separately)
    assert ref_err > 0 and ours_err <= 2 * ref_err, (ours_err, ref_err)


def test_segment_labels_with_sam_refinement_are_unchanged() -> None:
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 255, (6, 8, 3)), np.ones((20, 20, 1))).astype(np.uint8)  # 120x160 blocks
    cfg = SegmenterConfig(models="tiny", device="cpu", short_side=120, stride=112)
    seg = Segmenter.build(cfg, [["cat"], ["dog"], ["tree"]], None)
    seg.config.refine = type(seg.config.refine)(iou_thresh=-1.0, min_area=4)  # every region's mask is used
    encoder = seg.models.sam.image_encoder
    randomise_rel_pos(encoder, seed=6)
    results = {}
    with torch.no_grad():
        labels, probs = seg.classify(seg.predict_logits(image), image.shape[:2])
        for name, swap in (("sdpa", use_sdpa_attention), ("reference", use_reference_attention)):
            swap(encoder)
            seg._predictor = None  # a fresh image embedding
            results[name] = seg.refine(image, labels, probs)
    assert torch.equal(results["sdpa"][0], results["reference"][0])
    assert not torch.equal(results["sdpa"][0], labels)  # the refinement changed labels: the test can fail
    torch.testing.assert_close(results["sdpa"][1], results["reference"][1], atol=1e-5, rtol=0)


def test_the_full_size_vit_b_encoder_equals_segment_anythings_at_1024() -> None:
    """(slow list) SAM ViT-B whole, random weights, one 1024x1024 input."""
    torch.manual_seed(0)
    encoder = build_sam("vit_b").image_encoder
    randomise_rel_pos(encoder, seed=7)
    ours, ref = _pair(encoder)
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert _rel_diff(ours(x), ref(x)) < 1e-5
