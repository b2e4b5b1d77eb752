"""Our CLIP feature path against open_clip's own, on a full-size ViT-B/16 with random weights."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from s2clip_cli.models.clip import ClipBackbone, build_clip, default_layers
from s2clip_cli.models.registry import clip_spec
from s2clip_cli.pipeline.fusion import proxy_attention


@pytest.fixture(scope="module")
def vit_b16() -> ClipBackbone:
    torch.manual_seed(0)
    model = build_clip(clip_spec("ViT-B/16"), weights=None)
    return ClipBackbone(model, "ViT-B/16", "ViT-B-16")


def test_every_residual_stream_equals_forward_intermediates(vit_b16: ClipBackbone) -> None:
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = vit_b16.visual.forward_intermediates(
            x, indices=list(range(12)), output_fmt="NLC", intermediates_only=True, output_extra_tokens=True
        )
        ours = vit_b16.residual_streams(x, list(range(11)))
    assert ours.layers == list(range(11)) and ours.grid == (14, 14)
    for i, stream in enumerate(ours.streams):
        expected = torch.cat([ref["image_intermediates_prefix"][i], ref["image_intermediates"][i]], dim=1)
        assert (stream - expected).abs().max().item() < 1e-4, f"layer {i}"


def test_stream_at_336_uses_resampled_embedding(vit_b16: ClipBackbone) -> None:
    x = torch.randn(1, 3, 336, 336)
    with torch.no_grad():
        target = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None, force_image_size=336)
        state = vit_b16.model.state_dict()
        # The lineage's resampling (tests/test_pos_embed.py checks it against their formulas).
        state["visual.positional_embedding"] = vit_b16.positional_embedding((21, 21))
        target.load_state_dict(state)
        ref = target.visual.forward_intermediates(x, indices=[10], output_fmt="NLC", intermediates_only=True,
                                                  output_extra_tokens=True)
        ours = vit_b16.residual_streams(x, [10]).streams[0]
    expected = torch.cat([ref["image_intermediates_prefix"][0], ref["image_intermediates"][0]], dim=1)
    assert (ours - expected).abs().max().item() < 1e-4


def test_correlation_block_matches_direct_formula(vit_b16: ClipBackbone) -> None:
    """y = proj(ln_post(W_o · A · resample(W_v · LN1(x)))) computed the ProxyCLIP way (interpolate the
    values per head to the VFM grid, attend, then out_proj) equals our path, which fuses W_o into the
    value projection on the CLIP grid and resamples through a matrix."""
    x = torch.randn(1, 3, 224, 224)
    vfm_feats = torch.randn(1, 32, 28, 28)
    with torch.no_grad():
        stream = vit_b16.residual_streams(x, [8]).streams[0]
        attn = proxy_attention(vfm_feats)
        last = vit_b16.visual.transformer.resblocks[-1]
        _, _, v = F.linear(last.ln_1(stream), last.attn.in_proj_weight, last.attn.in_proj_bias).chunk(3, dim=-1)
        v = v[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
        v = F.interpolate(v, size=(28, 28), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        direct = vit_b16.visual.ln_post(last.attn.out_proj(attn @ v)) @ vit_b16.visual.proj
        from s2clip_cli.pipeline.fusion import resample_matrix

        ours = vit_b16.project_values((attn @ resample_matrix((14, 14), (28, 28))) @ vit_b16.value_tokens(stream))
    torch.testing.assert_close(ours, direct, atol=1e-4, rtol=1e-4)


def test_default_layers_are_the_deeper_half() -> None:
    assert default_layers(12) == [6, 7, 8, 9, 10]
    assert default_layers(24) == list(range(12, 23))
    assert default_layers(32) == list(range(16, 31))


def test_layer_out_of_range_is_a_clear_error(vit_b16: ClipBackbone) -> None:
    from s2clip_cli.errors import S2ClipError

    with pytest.raises(S2ClipError, match=r"out of range.*0\.\.10"):
        vit_b16.residual_streams(torch.zeros(1, 3, 224, 224), [11])
