"""Positional-embedding resampling equals the lineage's formulas (transcribed here from ProxyCLIP /
Trident's CLIP `interpolate_pos_encoding`, the DINO hub's and the DINOv2 hub's), for CLIP and the
timm VFMs as the pipeline runs them."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from s2clip_cli.models.clip import ClipBackbone, build_clip
from s2clip_cli.models.pos_embed import resample_pos_embed
from s2clip_cli.models.registry import clip_spec, vfm_spec
from s2clip_cli.models.vfm import TimmVFM, build_timm_vit


def proxyclip_clip(positional_embedding: torch.Tensor, x_tokens: int, w: int, h: int, patch: int) -> torch.Tensor:
    """ProxyCLIP's / Trident's `VisionTransformer.interpolate_pos_encoding` (x.shape = B, nc, w, h)."""
    npatch = x_tokens - 1
    n = positional_embedding.shape[0] - 1
    if npatch == n and w == h:
        return positional_embedding
    class_pos_embed = positional_embedding[[0]]
    patch_pos_embed = positional_embedding[1:]
    dim = positional_embedding.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)[0]


def dino_hub(pos_embed: torch.Tensor, npatch: int, w: int, h: int, patch: int) -> torch.Tensor:
    """facebookresearch/dino `VisionTransformer.interpolate_pos_encoding` (pos_embed [1, 1+N, D])."""
    n = pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch + 0.1, h // patch + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")
    assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def dinov2_hub(pos_embed: torch.Tensor, npatch: int, w: int, h: int, patch: int) -> torch.Tensor:
    """facebookresearch/dinov2 `DinoVisionTransformer.interpolate_pos_encoding` with its hub
    settings interpolate_offset=0.1, interpolate_antialias=False."""
    previous_dtype = pos_embed.dtype
    n = pos_embed.shape[1] - 1
    if npatch == n and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch, h // patch
    m = int(math.sqrt(n))
    sx, sy = float(w0 + 0.1) / m, float(h0 + 0.1) / m
    patch_pos_embed = F.interpolate(patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic",
                                    antialias=False, scale_factor=(sx, sy))
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)


def smooth_embedding(n_side: int, dim: int, seed: int = 0) -> torch.Tensor:
    """A class token + smooth random patch grid (real embeddings are smooth), [1 + n², dim]."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, dim, 4, 4, generator=gen)
    grid = F.interpolate(coarse, size=(n_side, n_side), mode="bicubic", align_corners=True)
    return torch.cat([torch.randn(1, dim, generator=gen), grid[0].flatten(1).T], dim=0)


def assert_same_resampling(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Same formula: equal to float32 rounding. The transcriptions reshape and permute in their own
    order, so the bicubic kernel may see another memory layout and sum in another order on another
    CPU; 1e-6 relative is four orders of magnitude below the 1-3 % that a different formula (timm's
    antialiased resize, another scale factor) moves the embedding."""
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("native", "target"), [(14, (21, 21)), (14, (14, 14)), (28, (42, 42)), (37, (24, 24)),
                                                 (14, (21, 28))])
def test_helper_equals_each_lineage_formula_on_square_windows_and_matches_height_first(native, target) -> None:
    pos = smooth_embedding(native, 32)
    ours = resample_pos_embed(pos, target)
    gh, gw = target
    patch = 8
    if gh == gw:  # the references agree with each other (and with us) on square windows
        ref_clip = proxyclip_clip(pos, 1 + gh * gw, gh * patch, gw * patch, patch)
        ref_dino = dino_hub(pos[None], gh * gw, gh * patch, gw * patch, patch)[0]
        ref_dinov2 = dinov2_hub(pos[None], gh * gw, gh * patch, gw * patch, patch)[0]
        for ref in (ref_clip, ref_dino, ref_dinov2):
            assert_same_resampling(ours, ref)
    else:  # non-square: the hubs take x.shape = (B, C, H, W) as (.., w, h), i.e. height first, as we do
        ref = dinov2_hub(pos[None], gh * gw, gh * patch, gw * patch, patch)[0]
        assert_same_resampling(ours, ref)


def test_lineage_resampling_differs_from_timms_antialiased_resize() -> None:
    """The reason for the helper: timm/open_clip resample to a size with antialias, which moves the
    embedding by several percent (the code review measured 6-24 %)."""
    pos = smooth_embedding(14, 32)
    ours = resample_pos_embed(pos, (21, 21))
    timm_version = resample_abs_pos_embed(pos[None], new_size=[21, 21], num_prefix_tokens=1)[0]
    rel = ((ours - timm_version).norm() / ours.norm()).item()
    assert rel > 0.01


def test_clip_backbone_uses_the_lineage_embedding() -> None:
    torch.manual_seed(0)
    clip = ClipBackbone(build_clip(clip_spec("ViT-B/16"), weights=None), "ViT-B/16", "ViT-B-16")
    pos = clip.visual.positional_embedding.detach()
    ref = proxyclip_clip(pos, 1 + 21 * 21, 336, 336, 16)
    assert_same_resampling(clip.positional_embedding((21, 21)), ref)
    assert torch.equal(clip.positional_embedding((14, 14)), pos)  # the native grid is returned as it is


@pytest.mark.parametrize(("name", "hub"), [("dino_vitb8", dino_hub), ("dinov2_vitb14", dinov2_hub),
                                           ("dinov2_vitb14_reg", dinov2_hub)])
def test_timm_vfm_tokens_use_the_hub_embedding(name, hub) -> None:
    """The VFM's forward equals timm's own forward with the hub-resampled embedding put in place."""
    torch.manual_seed(0)
    spec = vfm_spec(name)
    vfm = TimmVFM(build_timm_vit(spec, weights=None, tiny=True), spec.name)
    m = vfm.model
    side = m.patch_embed.grid_size[0]
    with torch.no_grad():  # a smooth embedding, so that resampling methods differ measurably
        smooth = smooth_embedding(side, m.pos_embed.shape[-1])
        m.pos_embed.copy_(smooth[None, 1:] if m.no_embed_class else smooth[None])
    size = 24 * spec.patch_size
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ours = vfm.tokens(x)
        # Reference: the same timm model made static at this size with the hub-resampled embedding.
        ref_model = timm.create_model(spec.arch, pretrained=False, num_classes=0, img_size=size, embed_dim=64,
                                      depth=2, num_heads=2)
        state = {k: v for k, v in m.state_dict().items()}
        full = torch.cat([torch.zeros(1, 1, m.pos_embed.shape[-1]), m.pos_embed], 1) if m.no_embed_class \
            else m.pos_embed
        resampled = hub(full, 24 * 24, size, size, spec.patch_size)
        state["pos_embed"] = resampled[:, 1:] if m.no_embed_class else resampled
        ref_model.load_state_dict(state)
        ref = ref_model.forward_features(x)
    assert (ours - ref).abs().max().item() < 1e-5
