"""Sliding windows (mmseg slide-inference semantics), stitching, proxy attention, resampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s2clip_cli.pipeline.fusion import proxy_attention, resample_matrix
from s2clip_cli.pipeline.windows import Stitcher, sliding_windows


def mmseg_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """MMSegmentation's slide_inference loop, transcribed literally."""
    h_grids = max(h - crop + stride - 1, 0) // stride + 1
    w_grids = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * stride, wi * stride
            y2, x2 = min(y1 + crop, h), min(x1 + crop, w)
            y1, x1 = max(y2 - crop, 0), max(x2 - crop, 0)
            out.append((y1, x1, y2, x2))
    return out


@pytest.mark.parametrize("h,w,crop,stride", [(448, 608, 336, 112), (448, 597, 336, 224), (336, 336, 336, 112),
                                             (20, 20, 336, 112), (10, 2048, 336, 224), (500, 337, 336, 224)])
def test_windows_match_mmseg_and_cover(h: int, w: int, crop: int, stride: int) -> None:
    boxes = sliding_windows(h, w, crop, stride)
    assert boxes == mmseg_windows(h, w, crop, stride)
    cover = torch.zeros(h, w)
    for y1, x1, y2, x2 in boxes:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        assert (y2 - y1, x2 - x1) == (min(crop, h), min(crop, w))  # every window the same size
        cover[y1:y2, x1:x2] += 1
    assert bool((cover > 0).all())


def test_windows_known_layout() -> None:
    # 448 x 608, crop 336, stride 112: 2 rows x 4 columns, the last column shifted inside.
    boxes = sliding_windows(448, 608, 336, 112)
    assert len(boxes) == 8
    assert boxes[3] == (0, 272, 336, 608)
    assert boxes[-1] == (112, 272, 448, 608)


def test_constant_map_stitches_to_constant() -> None:
    h, w = 200, 530
    st = Stitcher(3, h, w)
    for y1, x1, y2, x2 in sliding_windows(h, w, 96, 40):
        st.add((y1, x1, y2, x2), torch.full((3, y2 - y1, x2 - x1), 2.5))
    out = st.result()
    assert out.shape == (3, h, w)
    torch.testing.assert_close(out, torch.full((3, h, w), 2.5))


def test_stitch_averages_overlaps_and_rejects_gaps() -> None:
    st = Stitcher(1, 4, 6)
    st.add((0, 0, 4, 4), torch.ones(1, 4, 4))
    st.add((0, 2, 4, 6), torch.full((1, 4, 4), 3.0))
    out = st.result()[0]
    assert out[0, 0] == 1 and out[0, 2] == 2 and out[0, 5] == 3
    gap = Stitcher(1, 4, 6)
    gap.add((0, 0, 4, 4), torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="cover"):
        gap.result()


def test_proxy_attention_properties() -> None:
    feats = torch.randn(3, 16, 7, 9)
    attn = proxy_attention(feats, beta=1.2, gamma=3.0)
    assert attn.shape == (3, 63, 63)
    torch.testing.assert_close(attn.sum(-1), torch.ones(3, 63))
    # Entries whose logit gamma*(S - beta*mean(S)) is negative are exactly zero.
    f = F.normalize(feats.flatten(2), dim=1)
    sim = f.transpose(1, 2) @ f
    logits = 3.0 * (sim - 1.2 * sim.mean(dim=(1, 2), keepdim=True))
    assert bool((attn[logits < 0] == 0).all())
    assert bool((attn[logits >= 0] > 0).all())
    # Kept entries follow the softmax of the kept logits.
    row = logits[0, 0]
    keep = row >= 0
    expected = torch.softmax(row[keep], dim=0)
    torch.testing.assert_close(attn[0, 0, keep], expected)


def test_proxy_attention_independent_of_batching() -> None:
    feats = torch.randn(4, 8, 6, 6)
    together = proxy_attention(feats)
    alone = torch.cat([proxy_attention(feats[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone)


def test_proxy_attention_never_empty_rows() -> None:
    # beta large enough to mask every logit: each row falls back to itself.
    attn = proxy_attention(torch.randn(1, 4, 3, 3), beta=100.0)
    torch.testing.assert_close(attn[0], torch.eye(9))


@pytest.mark.parametrize("src,dst", [((21, 21), (42, 42)), ((24, 24), (42, 42)), ((5, 7), (9, 4))])
def test_resample_matrix_equals_interpolate(src: tuple[int, int], dst: tuple[int, int]) -> None:
    values = torch.randn(2, 11, *src)
    expected = F.interpolate(values, size=dst, mode="bilinear", align_corners=False)
    mat = resample_matrix(src, dst)
    got = (mat @ values.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(2, 11, *dst)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
