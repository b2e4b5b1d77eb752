"""Last-block attention strategies against straightforward implementations of their formulas.

Full-size ViT-B/16 with random weights at 224 (shared by the module). The references below read
the last block's input from open_clip's own forward (``forward_intermediates`` / its blocks), take
q, k, v from ``in_proj_weight`` by hand and use an explicit softmax — nothing from our module."""

from __future__ import annotations

import logging
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from s2clip_cli.errors import S2ClipError
from s2clip_cli.models.clip import ClipBackbone, build_clip
from s2clip_cli.models.registry import clip_spec
from s2clip_cli.pipeline.attention import (
    STRATEGIES,
    attention_matrix,
    cliper_layer_features,
    correlation_tokens,
    dense_clip_features,
    early_blocks,
    fused_attention,
    fused_attention_sequence,
)

HEADS, HEAD_DIM = 12, 64
SCALE = HEAD_DIM ** -0.5


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    logging.disable(logging.WARNING)
    try:
        clip = open_clip.create_model("ViT-B-16", pretrained=None)
    finally:
        logging.disable(logging.NOTSET)
    return clip.eval()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def open_clip_pass(model, image):
    """open_clip's own blocks 0..10: each block's input, and the last block's input."""
    with torch.no_grad():
        x = model.visual._embeds(image)
        inputs = []
        for blk in list(model.visual.transformer.resblocks)[:-1]:
            inputs.append(x)
            x = blk(x)
    return inputs, x


# ------------------------------------------------------------------ reference formulas
def softmax(logits: torch.Tensor) -> torch.Tensor:
    e = (logits - logits.max(dim=-1, keepdim=True).values).exp()
    return e / e.sum(dim=-1, keepdim=True)


def split_heads(t: torch.Tensor) -> torch.Tensor:
    b, n, _ = t.shape
    return t.reshape(b, n, HEADS, HEAD_DIM).permute(0, 2, 1, 3)


def last_qkv(model, x_last):
    blk = model.visual.transformer.resblocks[-1]
    qkv = blk.ln_1(x_last) @ blk.attn.in_proj_weight.T + blk.attn.in_proj_bias
    q, k, v = qkv.split(768, dim=-1)
    return split_heads(q), split_heads(k), split_heads(v)


def finish(model, x_last, mixed, residual, ffn):
    """mixed [B, heads, M, d] -> out_proj, optional residual/FFN, ln_post, proj."""
    blk = model.visual.transformer.resblocks[-1]
    b, _, m, _ = mixed.shape
    out = mixed.permute(0, 2, 1, 3).reshape(b, m, 768) @ blk.attn.out_proj.weight.T + blk.attn.out_proj.bias
    if residual:
        out = x_last + out
    if ffn:
        out = out + blk.mlp(blk.ln_2(out))
    return model.visual.ln_post(out) @ model.visual.proj


def nacLIP_addition(h: int, w: int, std: float) -> torch.Tensor:
    """NACLIP's construction: a (2h−1)×(2w−1) Gaussian window convolved ('same') with a one-hot per
    position; zero class-token row/column."""
    constant = 1 / (std * math.sqrt(2))
    ks = []
    for dim in (2 * h - 1, 2 * w - 1):
        start = -(dim - 1) / 2.0
        ks.append(torch.linspace(start * constant, (start + dim - 1) * constant, dim))
    window = torch.exp(-(torch.stack(torch.meshgrid(*ks, indexing="ij")) ** 2).sum(0))
    m = torch.einsum("ij,kl->ijkl", torch.eye(h), torch.eye(w)).permute(0, 3, 1, 2).contiguous()
    out = F.conv2d(m.view(-1, h, w).unsqueeze(1), window[None, None], padding="same").squeeze(1)
    out = out.view(h * w, h * w)
    out = torch.vstack([torch.zeros(1, h * w), out])
    return torch.hstack([torch.zeros(h * w + 1, 1), out])


def cliper_fused(attn_sum: torch.Tensor, calls: int) -> list[torch.Tensor]:
    """CLIPer's custom_attn('fused-attn') called `calls` times on one shared tensor (in place)."""
    attn_maps = attn_sum.clone()
    outs = []
    for _ in range(calls):
        attn_mask = attn_maps
        attn_mask /= torch.sum(attn_mask, dim=-2, keepdim=True)
        attn_mask /= torch.sum(attn_mask, dim=-1, keepdim=True)
        attn_mask = (attn_mask + attn_mask.transpose(-2, -1)) / 2
        attn_mask -= attn_mask.mean(-2, keepdim=True)
        attn_mask = torch.clamp(attn_mask, 0)
        attn_mask /= torch.sum(attn_mask, dim=-1, keepdim=True)
        outs.append(attn_mask)
    return outs


def reference(model, open_clip_pass, strategy, residual, ffn, vfm=None, regions=None):
    block_inputs, x_last = open_clip_pass
    q, k, v = last_qkv(model, x_last)
    n = q.shape[2]
    if strategy == "vanilla":
        a = softmax(q @ k.transpose(-1, -2) * SCALE)
    elif strategy == "identity":
        a = torch.eye(n).expand(1, HEADS, n, n)
    elif strategy == "csa":
        a = softmax(q @ q.transpose(-1, -2) * SCALE) + softmax(k @ k.transpose(-1, -2) * SCALE)
    elif strategy in ("qq", "kk", "vv"):
        t = {"qq": q, "kk": k, "vv": v}[strategy]
        a = softmax(t @ t.transpose(-1, -2) * SCALE)
    elif strategy == "neighbourhood":
        a = softmax(k @ k.transpose(-1, -2) * SCALE + nacLIP_addition(14, 14, 5.0))
    elif strategy == "fused":
        total = 0
        for blk, x in zip(model.visual.transformer.resblocks, block_inputs, strict=False):
            ln = blk.ln_1(x)
            total = total + blk.attn(ln, ln, ln, need_weights=True, average_attn_weights=False)[1]
        a = cliper_fused(total, 12)[-1]
    elif strategy == "scoped":  # CorrCLIP's scope reconstruction (its open_clip/transformer.py forward)
        _, _, fh, fw = vfm.shape
        dino_feats = F.normalize(vfm.flatten(2).transpose(1, 2), dim=-1)
        similarity = torch.einsum("b m c, b n c -> b m n", dino_feats, dino_feats)
        masks = regions
        region_masks = [(idx == masks[0]).view(-1) for idx in torch.unique(masks[0])]
        equal_idx = torch.zeros_like(similarity[0]).bool()
        for mask in region_masks[1:]:
            equal_idx += torch.outer(mask, mask)
        mask = region_masks[0]
        equal_idx += (mask.unsqueeze(0) + mask.unsqueeze(1)) * (similarity[0] > similarity[0].mean())
        similarity[0][~equal_idx] = float("-inf")
        a = softmax(similarity * 4.0)[:, None]
        vp = v[:, :, 1:].reshape(HEADS, 14, 14, HEAD_DIM).permute(0, 3, 1, 2)
        vp = F.interpolate(vp, size=(fh, fw), mode="bilinear", align_corners=False)
        v = vp.permute(0, 2, 3, 1).reshape(1, HEADS, fh * fw, HEAD_DIM)
        return finish(model, x_last, a @ v, False, False)
    elif strategy == "proxy":  # ProxyCLIP's custom_attn
        _, _, fh, fw = vfm.shape
        f = F.normalize(vfm.flatten(2), dim=1)
        sim = torch.einsum("bcm,bcn->bmn", f, f)
        sim = (sim - sim.mean() * 1.2) * 3.0
        sim[sim < 0] = float("-inf")
        a = softmax(sim)[:, None]
        vp = v[:, :, 1:].reshape(HEADS, 14, 14, HEAD_DIM).permute(0, 3, 1, 2)
        vp = F.interpolate(vp, size=(fh, fw), mode="bilinear", align_corners=False)
        v = vp.permute(0, 2, 3, 1).reshape(1, HEADS, fh * fw, HEAD_DIM)
        return finish(model, x_last, a @ v, False, False)
    else:
        raise AssertionError(strategy)
    return finish(model, x_last, a @ v, residual, ffn)[:, 1:]


# The combinations the methods use: CLIP (vanilla, kept), MaskCLIP (identity, kept), SCLIP (csa, kept),
# ClearCLIP (qq), NACLIP (neighbourhood), ProxyCLIP/Trident/S2CLIP (proxy), CLIPer (fused), and the
# residual-free vanilla/qq/kk/vv of the Figure-6 comparison.
CASES = [
    ("vanilla", True, True), ("identity", True, True), ("csa", True, True), ("vanilla", False, False),
    ("qq", False, False), ("kk", False, False), ("vv", False, False), ("neighbourhood", False, False),
    ("proxy", False, False), ("fused", False, False), ("scoped", False, False),
]


def mask_regions(h: int, w: int, batch: int = 1) -> torch.Tensor:
    """Instance-mask ids [B, h, w] on a VFM grid: 0 (uncovered) and a few painted rectangles."""
    g = torch.Generator().manual_seed(7)
    out = torch.zeros(batch, h, w, dtype=torch.int32)
    for b in range(batch):
        for i in range(1, 6):
            y, x = torch.randint(0, h - 2, (2,), generator=g).tolist()
            out[b, y:y + h // 3, x:x + w // 3] = i
    return out


def test_cases_cover_every_strategy() -> None:
    assert {name for name, _, _ in CASES} == set(STRATEGIES)


@pytest.mark.parametrize(("strategy", "residual", "ffn"), CASES)
def test_strategy_matches_its_formula(model, image, open_clip_pass, strategy, residual, ffn) -> None:
    on_vfm = strategy in ("proxy", "scoped")
    vfm = torch.randn(1, 48, 28, 28, generator=torch.Generator().manual_seed(2)) if on_vfm else None
    regions = mask_regions(28, 28) if strategy == "scoped" else None
    with torch.no_grad():
        ours = dense_clip_features(model, image, strategy, residual=residual, ffn=ffn, vfm_features=vfm,
                                   regions=regions)
        expected = reference(model, open_clip_pass, strategy, residual, ffn, vfm, regions)
    tokens = 28 * 28 if on_vfm else 14 * 14
    assert ours.shape == (1, tokens, 512)
    assert (ours - expected).abs().max().item() < 1e-4
    if (strategy, residual, ffn) == ("vanilla", True, True):
        # ... and that is plain CLIP: open_clip's own visual forward, tokens after ln_post, then proj.
        with torch.no_grad():
            model.visual.output_tokens = True
            try:
                _, tokens_out = model.visual(image)
            finally:
                model.visual.output_tokens = False
        assert (ours - tokens_out @ model.visual.proj).abs().max().item() < 1e-4


def test_fused_sequence_reproduces_clipers_in_place_calls(model, open_clip_pass) -> None:
    block_inputs, _ = open_clip_pass
    with torch.no_grad():
        total = 0
        for blk, x in zip(model.visual.transformer.resblocks, block_inputs, strict=False):
            ln = blk.ln_1(x)
            total = total + blk.attn(ln, ln, ln, need_weights=True, average_attn_weights=False)[1]
    # Random weights give near-uniform early attention; a skewed synthetic sum makes the number of
    # in-place passes visible.
    skewed = torch.rand(2, 3, 50, 50, generator=torch.Generator().manual_seed(7)) ** 6 * 11
    for attn_sum in (total, skewed):
        expected = cliper_fused(attn_sum, 12)
        ours = list(fused_attention_sequence(attn_sum, 12))
        for i in (0, 5, 11):
            assert (ours[i] - expected[i]).abs().max().item() < 1e-6
            assert (fused_attention(attn_sum, i + 1) - expected[i]).abs().max().item() < 1e-6
    assert (ours[0] - ours[11]).abs().max().item() > 1e-3  # slot 0 is not the last slot
    # attention_matrix defaults to the last slot's attention: as many passes as blocks (12)
    a = attention_matrix(model, "fused", None, (7, 7), early_attention=skewed)
    assert (a.weights - expected[11]).abs().max().item() < 1e-6


def test_attention_matrix_rows_and_correlation_on_another_stream(model, open_clip_pass) -> None:
    """attention_matrix alone, applied to an earlier layer's stream through correlation_tokens."""
    block_inputs, x_last = open_clip_pass
    with torch.no_grad():
        for name in ("vanilla", "csa", "kk", "neighbourhood", "identity"):
            a = attention_matrix(model, name, x_last, (14, 14))
            assert a.weights.dtype == torch.float32 and a.with_cls and a.weights.shape[-1] == 197
            rows = a.weights.sum(-1)
            torch.testing.assert_close(rows, torch.full_like(rows, 2.0 if name == "csa" else 1.0))
        a = attention_matrix(model, "kk", x_last, (14, 14))
        stream = block_inputs[8]
        ours = correlation_tokens(model, a, stream, (14, 14))
        _, _, v = last_qkv(model, stream)
        blk = model.visual.transformer.resblocks[-1]
        expected = (a.weights @ v).permute(0, 2, 1, 3).reshape(1, 197, 768) @ blk.attn.out_proj.weight.T
        expected = expected + blk.attn.out_proj.bias
    assert (ours - expected).abs().max().item() < 1e-4


def test_neighbourhood_gaussian_on_a_non_square_grid(model) -> None:
    x = torch.randn(1, 1 + 5 * 7, 768)
    with torch.no_grad():
        a = attention_matrix(model, "neighbourhood", x, (5, 7), sigma=2.0)
        _, k, _ = last_qkv(model, x)
        expected = softmax(k @ k.transpose(-1, -2) * SCALE + nacLIP_addition(5, 7, 2.0))
    assert (a.weights - expected).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def tiny_backbone() -> ClipBackbone:
    """The small CLIP of the real architecture (6 blocks, width 64, 2 heads): the autocast checks
    exercise the code paths, not the size."""
    torch.manual_seed(5)
    return ClipBackbone(build_clip(clip_spec("ViT-B/16"), weights=None, tiny=True), "tiny")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_strategy_runs_under_cpu_autocast(tiny_backbone, dtype) -> None:
    """Non-square 64x96 input (positional embedding resampled to 4x6): finite, close to float32,
    attention itself float32."""
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(3))
    vfm = torch.randn(2, 32, 8, 12, generator=torch.Generator().manual_seed(4))
    last_input = early_blocks(tiny_backbone, images).last_input
    for name, entry in STRATEGIES.items():
        kwargs = {"vfm_features": vfm} if name in ("proxy", "scoped") else {}
        if name == "scoped":
            kwargs["regions"] = mask_regions(8, 12, batch=2)
        keep = entry.with_cls
        with torch.no_grad():
            full = dense_clip_features(tiny_backbone, images, name, residual=keep, ffn=keep, **kwargs)
            with torch.autocast("cpu", dtype=dtype):
                low = dense_clip_features(tiny_backbone, images, name, residual=keep, ffn=keep, **kwargs)
                early = torch.ones(2, 2, 25, 25) if name == "fused" else None
                attn = attention_matrix(tiny_backbone, name, last_input, (4, 6), early_attention=early, **kwargs)
        assert full.shape == low.shape == (2, 96 if name in ("proxy", "scoped") else 24, 64), name
        assert torch.isfinite(low).all(), name
        rel = (low.float() - full).norm() / full.norm()
        assert rel.item() < 0.1, (name, rel.item())
        assert attn.weights.dtype == torch.float32, name


def test_full_size_runs_under_cpu_autocast(model) -> None:
    images = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        full = dense_clip_features(model, images, "csa", residual=True, ffn=True)
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                low = dense_clip_features(model, images, "csa", residual=True, ffn=True)
            assert torch.isfinite(low).all()
            assert ((low.float() - full).norm() / full.norm()).item() < 0.1


def cliper_forward_transformer(model, images, attn_type):
    """CLIPer's forward_transformer + custom_attn ('fused-attn' or 'k-k'), batch-first transcription."""
    blocks = model.visual.transformer.resblocks
    heads = blocks[0].attn.num_heads
    x = model.visual._embeds(images)
    attn_maps, img_features = 0, []
    for blk in list(blocks)[:-1]:
        ln_x = blk.ln_1(x)
        img_features.append(ln_x)
        out, attn_map = blk.attn(ln_x, ln_x, ln_x, need_weights=True, average_attn_weights=False)
        attn_maps = attn_maps + attn_map
        x = x + out
        x = x + blk.mlp(blk.ln_2(x))
    img_features.append(x)
    res = blocks[-1]
    outs = []
    for feat in img_features:
        b, n, d = feat.shape
        q, k, v = (res.ln_1(feat) @ res.attn.in_proj_weight.T + res.attn.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
        if attn_type == "fused-attn":
            attn_mask = attn_maps
            attn_mask /= torch.sum(attn_mask, dim=-2, keepdim=True)
            attn_mask /= torch.sum(attn_mask, dim=-1, keepdim=True)
            attn_mask = (attn_mask + attn_mask.transpose(-2, -1)) / 2
            attn_mask -= attn_mask.mean(-2, keepdim=True)
            attn_mask = torch.clamp(attn_mask, 0)
            attn_mask /= torch.sum(attn_mask, dim=-1, keepdim=True)
            weights = attn_mask
        else:
            weights = softmax(k * (d // heads) ** -0.5 @ k.transpose(-1, -2))
        out = (weights @ v).transpose(1, 2).reshape(b, n, d)
        outs.append(res.attn.out_proj(out))
    feats = model.visual.ln_post(torch.stack(outs)) @ model.visual.proj
    return feats[:, :, 1:], weights


@pytest.mark.parametrize(("strategy", "attn_type"), [("fused", "fused-attn"), ("kk", "k-k")])
def test_cliper_layer_fusion_matches_clipers_forward(tiny_backbone, strategy, attn_type) -> None:
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ours = cliper_layer_features(tiny_backbone, images, strategy)
        expected, last_attn = cliper_forward_transformer(tiny_backbone.model, images, attn_type)
        last_slot = dense_clip_features(tiny_backbone, images, strategy)
    assert ours.features.shape == (6, 2, 196, 64)
    assert (ours.features - expected).abs().max().item() < 1e-5
    assert (ours.attention.weights - last_attn).abs().max().item() < 1e-6
    assert (ours.features[-1] - last_slot).abs().max().item() < 1e-6


def test_errors_are_clear(model, image) -> None:
    with pytest.raises(S2ClipError, match="unknown attention strategy 'nope'"):
        dense_clip_features(model, image, "nope")
    with pytest.raises(S2ClipError, match="needs VFM features"):
        dense_clip_features(model, image, "proxy")
    with pytest.raises(S2ClipError, match="cannot keep the last block's residual"):
        dense_clip_features(model, image, "proxy", residual=True, vfm_features=torch.randn(1, 8, 28, 28))
    with pytest.raises(S2ClipError, match="not a multiple of the patch size 16"):
        dense_clip_features(model, torch.zeros(1, 3, 100, 224), "vanilla")
