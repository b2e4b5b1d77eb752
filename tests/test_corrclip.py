"""CorrCLIP's numerics against transcriptions of its reference code (``zdk258/CorrCLIP``,
``CorrCLIPv1/open_clip/transformer.py`` ``VisionTransformer.forward`` and
``corrclip_segmentor.py``), on tiny random models: the window's three branches with the mask class
tokens' attention mask (nn.MultiheadAttention with a boolean mask, as the reference), mask merging
with the same scikit-learn DBSCAN call, the scope-reconstructed attention, DINO's q+k features taken
at the last block's qkv, the map correction (torch.mode's tie rule) and the spatial layers."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from sklearn.cluster import DBSCAN

from s2clip_cli.models.clip import ClipBackbone, build_clip
from s2clip_cli.models.registry import clip_spec
from s2clip_cli.models.vfm import TINY_VIT_KWARGS, TimmVFM
from s2clip_cli.pipeline.corrclip import (
    PAD_ID,
    corrclip_window_tokens,
    correct_labels,
    dino_qk_features,
    merge_regions,
    nearest,
    scoped_attention,
    spatial_layers,
)

TAU, EPS, MIN_SAMPLES, ALPHA, BETA = 4, 0.2, 1, 1.0, 0.5  # transcribed from the reference


@pytest.fixture(scope="module")
def clip() -> ClipBackbone:
    torch.manual_seed(3)
    logging.disable(logging.WARNING)
    try:
        return ClipBackbone(build_clip(clip_spec("ViT-B/16"), weights=None, tiny=True), "tiny").eval()
    finally:
        logging.disable(logging.NOTSET)


def _masks(h: int, w: int, seed: int, pad: int = 0) -> torch.Tensor:
    """Instance ids [h, w]: 0 uncovered, painted rectangles, and `pad` columns of PAD_ID on the right."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(h, w, dtype=torch.int32)
    for i in range(1, 7):
        y, x = torch.randint(0, h - 4, (2,), generator=g).tolist()
        m[y:y + 8, x:x + 12] = i
    if pad:
        m[:, w - pad:] = PAD_ID
    return m


# ------------------------------------------------------------------------------------ transcriptions
def ref_block(blk, x: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """The reference's ``blk(x, attn_mask=attn_mask)``: nn.MultiheadAttention with a boolean mask
    (True = not allowed), batch-first here, residual and MLP."""
    ln = blk.ln_1(x)
    x = x + blk.ls_1(blk.attn(ln, ln, ln, need_weights=False, attn_mask=masked)[0])
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))


def ref_merge_and_scope(dino_feats: torch.Tensor, masks: torch.Tensor, feat_shape: tuple[int, int]):
    """Mask merging + scope reconstruction of the reference forward, one window (B = 1)."""
    similarity = torch.einsum("b m c, b n c -> b m n", dino_feats, dino_feats)
    masks = F.interpolate(masks.float(), size=feat_shape, mode="nearest").int().squeeze(1)
    feats = dino_feats.reshape(1, *feat_shape, -1)
    mask_values = torch.unique(masks[0])
    if mask_values.shape[0] > 2:
        region_masks = [idx == masks[0] for idx in mask_values]
        instance_feats = torch.stack([feats[0][mask].mean(dim=0) for mask in region_masks])
        instance_feats = F.normalize(instance_feats, dim=1)[1:]
        instance_sim = torch.einsum("m c, n c -> m n", instance_feats, instance_feats)
        cluster = DBSCAN(metric="precomputed", eps=EPS, min_samples=MIN_SAMPLES).fit_predict(
            (instance_sim.max() - instance_sim).cpu().numpy())
        cluster = torch.from_numpy(cluster).to(masks.dtype)
        for idx, cluster_v in enumerate(cluster, start=1):
            if cluster_v != -1:
                masks[0][region_masks[idx]] = cluster_v + 10000
    region_masks = [(idx == masks[0]).view(-1) for idx in torch.unique(masks[0])]
    equal_idx = torch.zeros_like(similarity[0]).bool()
    for mask in region_masks[1:]:
        equal_idx += torch.outer(mask, mask)
    mask = region_masks[0]
    equal_idx += (mask.unsqueeze(0) + mask.unsqueeze(1)) * (similarity[0] > similarity[0].mean())
    similarity[0][~equal_idx] = float("-inf")
    return masks, (similarity * TAU).softmax(dim=-1)


def ref_window_tokens(clip: ClipBackbone, image: torch.Tensor, dino_feats: torch.Tensor,
                      feat_shape: tuple[int, int], masks: torch.Tensor) -> torch.Tensor:
    """The reference ``VisionTransformer.forward`` (batch-first), from the embedded tokens on."""
    visual = clip.visual
    blocks = visual.transformer.resblocks
    num_layers = len(blocks)
    num_spatial = {12: 5, 24: 12, 32: 28}.get(num_layers, num_layers - 4)
    token_size = (image.shape[-2] // clip.patch_size, image.shape[-1] // clip.patch_size)
    x = clip.embed(image)
    masks, attn_weights = ref_merge_and_scope(dino_feats, masks, feat_shape)
    masks = F.interpolate(masks.float().unsqueeze(1), size=token_size, mode="nearest").int().squeeze(1)[0]
    region_masks = [idx == masks for idx in torch.unique(masks)]
    mct = x[:, :1].repeat(1, len(region_masks), 1)
    num_mct = mct.shape[1]
    x = torch.cat([mct, x], dim=1)
    attn_mask = torch.zeros((x.shape[1], x.shape[1])).bool()
    attn_mask[num_mct:, num_mct:] = True
    attn_mask[:num_mct, num_mct] = True
    region_masks = torch.stack(region_masks, dim=0)
    attn_mask[:num_mct, num_mct + 1:] = region_masks.view(region_masks.shape[0], -1)
    attn_mask = ~attn_mask
    feats_spatial = []
    for idx, blk in enumerate(blocks[:-1]):
        x = ref_block(blk, x, attn_mask)
        if num_layers - 2 - num_spatial <= idx <= num_layers - 3:
            feats_spatial.append(x[:, num_mct:])
    blk = blocks[-1]
    x_main_spatial = torch.cat([x[:, num_mct:], torch.stack(feats_spatial).mean(0)], dim=0)
    d = blk.attn.embed_dim
    v = F.linear(blk.ln_1(x_main_spatial), blk.attn.in_proj_weight[2 * d:], blk.attn.in_proj_bias[2 * d:])
    v = v.permute(0, 2, 1)[:, :, 1:].unflatten(2, token_size)
    v = F.interpolate(v, size=feat_shape, mode="bilinear", align_corners=False).flatten(2, 3).transpose(1, 2)
    x_main_spatial = blk.attn.out_proj(torch.bmm(attn_weights.expand(2, -1, -1), v))
    mct = ref_block(blk, x, attn_mask)[0, :num_mct]
    expand_masks = F.interpolate(region_masks.unsqueeze(1).to(mct.dtype), size=feat_shape, mode="nearest").flatten(1)
    x_semantic = (expand_masks.T @ mct)[None]
    out = visual.ln_post(torch.cat([x_main_spatial, x_semantic], dim=0))
    x_main, x_spatial, x_semantic = out.chunk(3, dim=0)
    return ((x_main + x_spatial * ALPHA + x_semantic * BETA) @ visual.proj)[0]


# ------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(("size", "pad"), [((64, 96), 0), ((64, 112), 16)])
def test_window_equals_the_reference_forward(clip: ClipBackbone, size: tuple[int, int], pad: int) -> None:
    h, w = size
    image = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
    feat_shape = (h // 8, w // 8)
    qk = torch.randn(1, 32, *feat_shape, generator=torch.Generator().manual_seed(2))
    masks = _masks(h, w, seed=h + w, pad=pad)
    dino_feats = F.normalize(qk.flatten(2).transpose(1, 2), dim=-1)
    with torch.no_grad():
        expected = ref_window_tokens(clip, image, dino_feats, feat_shape, masks[None, None].clone())
        regions = merge_regions(nearest(masks, feat_shape), dino_feats[0])
        attention = scoped_attention(qk, regions[None])
        ours = corrclip_window_tokens(clip, image, attention, regions, feat_shape, torch.float32)
    assert ours.shape == expected.shape == (feat_shape[0] * feat_shape[1], clip.embed_dim)
    assert (ours - expected).abs().max().item() < 1e-5 * expected.abs().max().item()


def test_merging_and_scope_equal_the_reference() -> None:
    feat_shape = (12, 16)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(4, 24, generator=g)
    masks = _masks(48, 64, seed=9)
    small = nearest(masks, feat_shape)
    # Regions 1 and 2 share a feature direction (they must merge); the others are their own.
    which = torch.where(small == 2, torch.ones_like(small), torch.clamp(small, max=3)).long().flatten()
    feats = F.normalize(base[which] + 0.01 * torch.randn(which.numel(), 24, generator=g), dim=-1)
    ref_masks, ref_attn = ref_merge_and_scope(feats[None], masks[None, None].clone(), feat_shape)
    merged = merge_regions(small, feats)
    assert torch.equal(merged, ref_masks[0])
    assert merged[small == 1].unique().tolist() == merged[small == 2].unique().tolist()
    assert bool((merged[small == 0] == 0).all())
    qk = feats.T.reshape(1, 24, *feat_shape) * 3.0  # (normalised inside: the scale is irrelevant)
    assert torch.allclose(scoped_attention(qk, merged[None])[0], ref_attn[0], atol=1e-6)
    # Two ids or fewer: nothing is merged (the reference's `mask_values.shape[0] > 2`).
    two = torch.where(small > 0, torch.full_like(small, 5), small)
    assert torch.equal(merge_regions(two, feats), two)


def test_scope_without_uncovered_pixels_takes_the_smallest_id_as_uncovered() -> None:
    ids = torch.tensor([[3, 3, 4], [4, 5, 5]], dtype=torch.int32)
    feats = torch.randn(1, 8, 2, 3, generator=torch.Generator().manual_seed(5))
    attn = scoped_attention(feats, ids[None])[0]
    flat = ids.flatten()
    s = F.normalize(feats.flatten(2).transpose(1, 2), dim=-1)[0]
    s = s @ s.T
    for i in range(6):
        for j in range(6):
            kept = (flat[i] == flat[j] and flat[i] != 3) or ((flat[i] == 3 or flat[j] == 3) and s[i, j] > s.mean())
            assert (attn[i, j] > 0) == kept, (i, j)


def test_dino_qk_is_the_last_blocks_q_plus_k() -> None:
    torch.manual_seed(6)
    vit = timm.create_model("vit_base_patch8_224.dino", pretrained=False, num_classes=0, dynamic_img_size=True,
                            **TINY_VIT_KWARGS).eval()
    vfm = TimmVFM(vit, "dino_vitb8")
    images = torch.randn(2, 3, 48, 64, generator=torch.Generator().manual_seed(7))
    seen = []
    handle = vit.blocks[-1].attn.qkv.register_forward_hook(lambda m, a, out: seen.append(out))
    with torch.no_grad():
        vfm.tokens(images)  # the whole network, as the reference's get_intermediate_layers + hook
        handle.remove()
        ours = dino_qk_features(vfm, images)
    qkv = seen[0].reshape(2, seen[0].shape[1], 3, -1).permute(2, 0, 1, 3)
    expected = (qkv[0] + qkv[1])[:, 1:].transpose(1, 2).reshape(2, -1, 6, 8)
    assert torch.equal(ours, expected)


def test_map_correction_equals_the_reference_loop() -> None:
    g = torch.Generator().manual_seed(8)
    labels = torch.randint(0, 4, (30, 40), generator=g)
    instance = torch.zeros(30, 40, dtype=torch.int64)
    instance[2:12, 3:20], instance[10:25, 15:35], instance[20:30, 0:10] = 1, 2, 7
    instance[0:4, 30:34] = 3  # 16 pixels: a tie is likely, the smallest label wins
    labels[0:4, 30:32], labels[0:4, 32:34] = 3, 1
    expected = labels.clone()[None]
    mask_values = torch.unique(instance)[1:]
    masks = (mask_values[:, None, None] == instance[None]).unsqueeze(1)
    for mask in masks:
        expected[mask] = torch.mode(expected[mask])[0]
    ours = correct_labels(labels, instance)
    assert torch.equal(ours, expected[0])
    assert int(ours[0, 30]) == 1  # the tie of labels 1 and 3
    # No 0 in the mask: the smallest id is left as it is (the reference skips unique()[0]).
    shifted = correct_labels(labels, instance + 4)
    assert torch.equal(shifted, ours)


def test_spatial_layers_follow_the_reference_rule() -> None:
    assert spatial_layers(12) == [5, 6, 7, 8, 9]
    assert spatial_layers(24) == list(range(10, 22))
    assert spatial_layers(32) == list(range(2, 30))
    assert spatial_layers(6) == [2, 3]


def test_map_correction_is_applied_after_the_threshold() -> None:
    """prob_thd first (pixels fall to 0), then each region takes its mode: a region mostly under the
    threshold becomes background entirely."""
    labels = torch.tensor([[0, 0, 2], [1, 1, 1]])
    instance = torch.tensor([[5, 5, 5], [0, 0, 0]])
    assert correct_labels(labels, instance).tolist() == [[0, 0, 0], [1, 1, 1]]
    assert np.array_equal(correct_labels(labels, torch.zeros(2, 3, dtype=torch.int64)).numpy(), labels.numpy())
