"""Trident's splice-then-segment guidance: SAM last-block attention capture and the guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sam_helpers import randomise_rel_pos
from segment_anything import SamPredictor
from segment_anything.modeling import ImageEncoderViT

from s2clip_cli.errors import S2ClipError
from s2clip_cli.models.sam import build_sam
from s2clip_cli.models.sam_attention import (
    BlockInputCapture,
    block_attention,
    block_qkv,
    iter_head_attention,
    last_block_input,
    last_global_block,
)
from s2clip_cli.pipeline.trident import (
    apply_guidance,
    guidance_from_attention,
    guide_token_map,
    round_up_to_multiple,
    sam_guidance_attention,
    sam_input_from_image,
)


@pytest.fixture(scope="module")
def tiny_sam():
    torch.manual_seed(1)
    sam = build_sam("vit_b", tiny=True, checkpoint=None)
    randomise_rel_pos(sam.image_encoder, seed=2)
    return sam


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _rebuild_block_output(block, x: torch.Tensor, attn: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The block's output from the recomputed attention: proj(attn @ v) + residual, then the MLP."""
    heads, h, w, d = values.shape
    mixed = (attn @ values.reshape(heads, h * w, d)).permute(1, 0, 2).reshape(1, h, w, heads * d)
    y = x + block.attn.proj(mixed)
    return y + block.mlp(block.norm2(y))


def _block_output_and_attention(block, run):
    """Run `run()` capturing `block`'s input and real output; recompute its attention."""
    outputs = []
    handle = block.register_forward_hook(lambda _m, _a, out: outputs.append(out.detach()))
    try:
        with BlockInputCapture(block) as capture:
            run()
    finally:
        handle.remove()
    attn, values = block_attention(block, capture.input)
    return capture.input, outputs[-1], attn, values


# ---------------------------------------------------------------- attention capture


def test_captured_attention_reproduces_tiny_sam_last_block(tiny_sam) -> None:
    encoder = tiny_sam.image_encoder
    block = last_global_block(encoder)
    sam_input, _ = sam_input_from_image(tiny_sam, _image(96, 128))
    with torch.no_grad():
        x, real, attn, values = _block_output_and_attention(block, lambda: encoder(sam_input))
        assert attn.shape == (2, 4096, 4096) and attn.dtype == torch.float32
        assert values.shape == (2, 64, 64, 32)
        assert torch.allclose(attn.sum(-1), torch.ones(2, 4096), atol=1e-5)
        rebuilt = _rebuild_block_output(block, x, attn, values)
        assert (rebuilt - real).abs().max().item() < 1e-4
        # The relative-position terms are part of what is reproduced: without them it is far off.
        qkv = block_qkv(block, x)
        plain = torch.softmax((qkv.q * block.attn.scale) @ qkv.k.transpose(-2, -1), dim=-1)
        assert (_rebuild_block_output(block, x, plain, values) - real).abs().max().item() > 1e-2


def test_captured_attention_reproduces_full_size_vit_b_last_block() -> None:
    torch.manual_seed(3)
    sam = build_sam("vit_b", tiny=False, checkpoint=None)
    randomise_rel_pos(sam.image_encoder, seed=4)
    block = last_global_block(sam.image_encoder)
    assert block.attn.num_heads == 12
    # A 32x32 grid keeps the test fast; the 127-long relative tables are resampled as SAM does.
    x_in = torch.randn(1, 32, 32, 768)
    with torch.no_grad():
        x, real, attn, values = _block_output_and_attention(block, lambda: block(x_in))
        assert attn.shape == (12, 1024, 1024) and values.shape == (12, 32, 32, 64)
        assert (_rebuild_block_output(block, x, attn, values) - real).abs().max().item() < 1e-4
        guidance = guidance_from_attention(attn, values, (24, 32), cos_fac=1.2)
    assert guidance.shape == (768, 768)
    assert torch.allclose(guidance.sum(-1), torch.ones(768), atol=1e-5)


def test_capture_without_a_forward_is_an_error(tiny_sam) -> None:
    with BlockInputCapture(tiny_sam.image_encoder.blocks[-1]) as capture:
        pass
    with pytest.raises(S2ClipError, match="did not run"):
        _ = capture.input


def test_windowed_last_block_is_rejected() -> None:
    encoder = ImageEncoderViT(img_size=64, patch_size=16, embed_dim=32, depth=1, num_heads=2,
                              use_rel_pos=True, window_size=2, global_attn_indexes=())
    with pytest.raises(S2ClipError, match="not a global-attention block"):
        last_global_block(encoder)


# ---------------------------------------------------------------- Trident transcription

def _trident_get_sam_sim(sam_v, sam_attn, cos_fac, heads, refine_neg_cos=True):
    """Line-by-line transcription of Trident's `VisionTransformer.get_sam_sim` (float32)."""
    sam_v = sam_v.flatten(2, 3)
    sam_v = F.normalize(sam_v, dim=-1)
    sam_sim = torch.einsum("b h m c, b h n c -> b h m n", sam_v, sam_v)
    sim_thresh = cos_fac * sam_sim.mean(dim=1, keepdim=True).mean(dim=-1, keepdim=True)
    if not refine_neg_cos:
        sim_thresh = torch.where(sim_thresh < 0.0, 0.6, sim_thresh)
    sim_thresh = torch.where(sim_thresh > 0.9, 0.9, sim_thresh)
    refined = torch.where(sam_sim > sim_thresh, sam_attn, torch.zeros_like(sam_attn))
    refined = refined.mean(dim=1)
    similarity = refined / refined.sum(dim=-1, keepdim=True)
    return similarity.unsqueeze(0).repeat(1, heads, 1, 1)


def _trident_crop(last_attn, last_v, heads, grid, valid):
    """Trident's `get_sam_feat` cropping of `last_attn` [1*heads, N, N] and `last_v`."""
    (hw_h, hw_w), (vh, vw) = grid, valid
    attn = last_attn.view(1, heads, hw_h, hw_w, hw_h, hw_w)[:, :, :vh, :vw, :vh, :vw]
    attn = attn.flatten(2, 3).flatten(3, 4)
    v = last_v[:, :, :vh, :vw, :]
    return attn, v


def _sam_like_tensors(heads=3, grid=(6, 7), d=5, seed=0):
    """Random attention rows and values whose row thresholds cover negative, ordinary and >0.9
    cases: each token is a_t·common + noise with a_t from -1 to 2."""
    gen = torch.Generator().manual_seed(seed)
    n = grid[0] * grid[1]
    attn = torch.softmax(torch.randn(heads, n, n, generator=gen) * 2, dim=-1)
    common = torch.randn(heads, 1, d, generator=gen)
    coeff = torch.linspace(-1.0, 2.0, n)[torch.randperm(n, generator=gen)].view(1, n, 1)
    values = coeff * common + 0.4 * torch.randn(heads, n, d, generator=gen)
    return attn, values.view(heads, *grid, d)


@pytest.mark.parametrize(("cos_fac", "refine_neg_cos"), [(1.2, True), (3.0, False), (3.0, True), (0.0, True)])
def test_guidance_matches_trident_get_sam_sim(cos_fac: float, refine_neg_cos: bool) -> None:
    heads, grid, valid = 3, (6, 7), (5, 6)
    attn, values = _sam_like_tensors(heads, grid)
    t_attn, t_v = _trident_crop(attn, values[None], heads, grid, valid)
    expected = _trident_get_sam_sim(t_v, t_attn, cos_fac, heads, refine_neg_cos)[0, 0]
    raw = cos_fac * torch.einsum(
        "bhmc,bhnc->bhmn", F.normalize(t_v.flatten(2, 3), dim=-1), F.normalize(t_v.flatten(2, 3), dim=-1)
    ).mean(dim=(1, 3))
    if cos_fac == 3.0:  # the data exercise both of Trident's threshold rules
        assert bool((raw < 0).any()) and bool((raw > 0.9).any())

    got = guidance_from_attention(attn, values, valid, cos_fac, refine_neg_cos)
    assert got.shape == (30, 30) and got.dtype == torch.float32
    assert torch.allclose(got, expected, atol=1e-6)
    # An iterator of per-head maps gives the same result as the stacked tensor.
    streamed = guidance_from_attention(iter(list(attn)), values, valid, cos_fac, refine_neg_cos)
    assert torch.equal(streamed, got)
    assert torch.allclose(got.sum(-1), torch.ones(30), atol=1e-6)
    # Thresholding is not a no-op: some entries of the cropped mean attention were dropped.
    assert bool(((got == 0) & (t_attn[0].mean(0) > 0)).any())


def test_refine_neg_cos_changes_the_result() -> None:
    attn, values = _sam_like_tensors()
    a = guidance_from_attention(attn, values, (6, 7), 3.0, refine_neg_cos=True)
    b = guidance_from_attention(attn, values, (6, 7), 3.0, refine_neg_cos=False)
    assert (a - b).abs().max().item() > 1e-3


def test_apply_guidance_matches_trident_guidance_attn() -> None:
    heads, head_dim, clip_grid, valid = 2, 4, (3, 5), (5, 6)
    gen = torch.Generator().manual_seed(5)
    dst_v = torch.randn(1, heads * head_dim, *clip_grid, generator=gen)
    attn = torch.softmax(torch.randn(30, 30, generator=gen), dim=-1)
    # Trident's single-image path of `guidance_attn` after the splice.
    attn_weights = attn[None, None].repeat(1, heads, 1, 1)
    v = F.interpolate(dst_v, size=valid, mode="bilinear", align_corners=False)
    v = v.view(1, heads, head_dim, -1).permute(0, 1, 3, 2).contiguous()
    expected = torch.matmul(attn_weights, v).permute(2, 0, 1, 3).flatten(2)[:, 0]  # [M, D]

    got = apply_guidance(attn, dst_v[0], valid)
    assert got.shape == (8, 5, 6)
    assert torch.allclose(got.reshape(8, -1).T, expected, atol=1e-6)


def test_apply_guidance_rejects_mismatched_grid() -> None:
    with pytest.raises(ValueError, match="does not match the valid grid"):
        apply_guidance(torch.eye(12), torch.zeros(4, 2, 2), (3, 3))


def test_valid_area_larger_than_grid_is_rejected() -> None:
    attn, values = _sam_like_tensors()
    with pytest.raises(ValueError, match="does not fit"):
        guidance_from_attention(attn, values, (7, 7), 1.2)


# ---------------------------------------------------------------- end to end on tiny SAM


def test_sam_input_matches_predictor_and_guidance_rows_sum_to_one(tiny_sam) -> None:
    image = _image(50, 90, seed=1)  # not a multiple of 16: Trident's rounding first
    rounded = round_up_to_multiple(image)
    assert rounded.shape == (64, 96, 3)
    sam_input, valid = sam_input_from_image(tiny_sam, rounded)
    assert valid == (683 // 16, 64)  # resized to 683 x 1024 (64 * 1024 / 96 rounded)

    # SamPredictor.set_image feeds the encoder the same tensor, and a capture around it works too.
    predictor = SamPredictor(tiny_sam)
    seen = []
    handle = tiny_sam.image_encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    block = last_global_block(tiny_sam.image_encoder)
    try:
        with torch.no_grad(), BlockInputCapture(block) as capture:
            predictor.set_image(rounded)
    finally:
        handle.remove()
    assert torch.equal(seen[0], sam_input)
    assert tuple(predictor.input_size) == (683, 1024)

    with torch.no_grad():
        qkv = block_qkv(block, capture.input)
        guidance = guidance_from_attention(iter_head_attention(block, qkv), qkv.values_grid(), valid, 1.2)
    m = valid[0] * valid[1]
    assert guidance.shape == (m, m) and guidance.dtype == torch.float32
    assert bool((guidance >= 0).all())
    assert torch.allclose(guidance.sum(-1), torch.ones(m), atol=1e-5)
    assert bool((guidance.diagonal() > 0).all())


@pytest.fixture(scope="module")
def fp32_reference(tiny_sam):
    """(SAM input, valid grid, fp32 last-block attention) of one image."""
    sam_input, valid = sam_input_from_image(tiny_sam, _image(64, 96, seed=2))
    block = last_global_block(tiny_sam.image_encoder)
    with torch.no_grad(), BlockInputCapture(block) as capture:
        tiny_sam.image_encoder(sam_input)
    with torch.no_grad():
        reference, _ = block_attention(block, capture.input)
    return sam_input, valid, reference


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_guidance_under_cpu_autocast(tiny_sam, fp32_reference, dtype: torch.dtype) -> None:
    sam_input, valid, reference = fp32_reference
    block = last_global_block(tiny_sam.image_encoder)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=dtype):
            guidance = sam_guidance_attention(tiny_sam.image_encoder, sam_input, valid, cos_fac=1.2)
            block_input = last_block_input(tiny_sam.image_encoder, sam_input)  # what the guidance read
            with BlockInputCapture(block) as capture:  # = the full encoder's, under the same autocast
                tiny_sam.image_encoder(sam_input)
            assert torch.equal(block_input, capture.input)
            attn, values = block_attention(block, block_input)
            token_map = torch.randn(16, 4, 6).to(dtype)
            guided = apply_guidance(guidance, token_map, valid)
    m = valid[0] * valid[1]
    assert guidance.dtype == attn.dtype == values.dtype == guided.dtype == torch.float32
    assert bool(torch.isfinite(guidance).all()) and bool(torch.isfinite(guided).all())
    assert torch.allclose(guidance.sum(-1), torch.ones(m), atol=1e-5)
    # Only the encoder ran in reduced precision: the attention stays close to the fp32 one.
    diff = (attn - reference).abs().max().item()
    assert 0 < diff < 0.05, diff
    assert torch.allclose(guidance, guidance_from_attention(attn, values, valid, 1.2), atol=1e-6)
    assert guided.shape == (16, *valid)


def test_cityscapes_halves(tiny_sam) -> None:
    image = _image(16, 128, seed=3)  # halves 16 x 64 -> resized 256 x 1024 -> valid 16 x 64
    token_map = torch.randn(8, 1, 8)
    cos_fac, refine_neg_cos = 3.0, False  # Trident's Cityscapes settings
    encoder = tiny_sam.image_encoder
    block = last_global_block(encoder)
    encoder_inputs, block_inputs, last_block_runs = [], [], []
    # (the encoder runs up to its last block: its input is the block before's output)
    hooks = [encoder.patch_embed.register_forward_pre_hook(lambda _m, a: encoder_inputs.append(a[0])),
             encoder.blocks[-2].register_forward_hook(lambda _m, _a, out: block_inputs.append(out)),
             block.register_forward_pre_hook(lambda _m, a: last_block_runs.append(a[0]))]
    try:
        out = guide_token_map(tiny_sam, image, token_map, cos_fac=cos_fac, refine_neg_cos=refine_neg_cos,
                              halves=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert out.shape == (8, 16, 128) and out.dtype == torch.float32

    # SAM ran once per half, on that half alone; each half of the map is guided by its own attention.
    assert len(encoder_inputs) == len(block_inputs) == 2 and not last_block_runs
    halves = []
    for i, (img_half, map_half) in enumerate(((image[:, :64], token_map[..., :4]),
                                              (image[:, 64:], token_map[..., 4:]))):
        sam_input, valid = sam_input_from_image(tiny_sam, np.ascontiguousarray(img_half))
        assert valid == (16, 64)
        assert torch.equal(encoder_inputs[i], sam_input)
        with torch.no_grad():
            attn, values = block_attention(block, block_inputs[i])
        guidance = guidance_from_attention(attn, values, valid, cos_fac, refine_neg_cos)
        halves.append(apply_guidance(guidance, map_half, valid))
    assert torch.allclose(out, torch.cat(halves, dim=-1), atol=1e-6)
    assert not torch.allclose(halves[0], halves[1])


def test_the_threshold_is_computed_in_tridents_order_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The threshold is a hard cut on the very cosines it is the mean of: it must be Trident's float32
    value (full cosine matrix, mean over heads, then over keys), whatever the row chunking."""
    from s2clip_cli.pipeline import trident as trident_mod

    gen = torch.Generator().manual_seed(11)
    heads, m, d = 4, 300, 16
    v = F.normalize(torch.randn(heads, m, d, generator=gen), dim=-1)
    sim = torch.einsum("b h m c, b h n c -> b h m n", v[None], v[None])
    expected = sim.mean(dim=1, keepdim=True).mean(dim=-1, keepdim=True)[0, 0, :, 0]
    for rows in (256, 7, 300):  # two uneven chunks, many small ones, one
        monkeypatch.setattr(trident_mod, "THRESHOLD_ROWS", rows)
        assert torch.equal(trident_mod._mean_value_cosine(v), expected)
    shortcut = torch.einsum("hmd,hd->hm", v, v.mean(dim=1)).mean(dim=0)  # equal in exact arithmetic only
    torch.testing.assert_close(shortcut, expected, rtol=0, atol=1e-6)
