"""PAMR against a transcription of the reference (1-stage-wseg ``models/mods/pamr.py``, as NACLIP ships it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from s2clip_cli.errors import S2ClipError
from s2clip_cli.refine.pamr import pamr


# ------------------------------------------------------------------ reference transcription
def _kernel_affinity() -> torch.Tensor:
    w = torch.zeros(8, 1, 3, 3)
    w[:, 0, 1, 1] = 1
    for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
        w[i, 0, r, c] = -1
    return w


def _kernel_copy() -> torch.Tensor:
    w = torch.zeros(8, 1, 3, 3)
    for i, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2)]):
        w[i, 0, r, c] = 1
    return w


def _kernel_std() -> torch.Tensor:
    w = torch.zeros(9, 1, 3, 3)
    for i in range(9):
        w[i, 0, i // 3, i % 3] = 1
    return w


def _local(x: torch.Tensor, kernel: torch.Tensor, dilations) -> torch.Tensor:
    b, k, h, w = x.size()
    x = x.view(b * k, 1, h, w)
    out = torch.empty((k * b, len(dilations) * kernel.size(0), h, w))
    for i, d in enumerate(dilations):
        x_pad = F.pad(x, [d] * 4, mode="replicate")
        out[:, kernel.size(0) * i:(i + 1) * kernel.size(0)] = F.conv2d(x_pad, kernel, dilation=d)
    return out.view(b, k, -1, h, w)


def reference_pamr(x: torch.Tensor, mask: torch.Tensor, num_iter: int, dilations) -> torch.Tensor:
    mask = F.interpolate(mask, size=x.size()[-2:], mode="bilinear", align_corners=True)
    x_std = _local(x, _kernel_std(), dilations).std(2, keepdim=True)
    x = -torch.abs(_local(x, _kernel_affinity(), dilations)) / (1e-8 + 0.1 * x_std)
    x = x.mean(1, keepdim=True)
    x = F.softmax(x, 2)
    for _ in range(num_iter):
        m = _local(mask, _kernel_copy(), dilations)
        mask = (m * x).sum(2)
    return mask


# ------------------------------------------------------------------ tests
def _inputs(b: int = 2, k: int = 5, h: int = 37, w: int = 45):
    g = torch.Generator().manual_seed(11)
    image = torch.randn(b, 3, h, w, generator=g)
    image[:, :, : h // 2] += 2.0  # some structure: a brighter top half
    masks = torch.randn(b, k, h, w, generator=g)
    return image, masks


def test_matches_reference() -> None:
    image, masks = _inputs()
    ours = pamr(image, masks)  # defaults: 10 iterations, dilations (8, 16)
    expected = reference_pamr(image, masks, 10, (8, 16))
    assert ours.dtype == torch.float32 and ours.shape == masks.shape
    assert (ours - expected).abs().max().item() < 1e-5
    assert (ours - masks).abs().max().item() > 0.1  # it does change the masks


@pytest.mark.parametrize(("iterations", "dilations"), [(1, (1,)), (3, (2, 4, 8)), (0, (8, 16))])
def test_matches_reference_other_settings(iterations, dilations) -> None:
    image, masks = _inputs(1, 3, 20, 26)
    expected = reference_pamr(image, masks, iterations, dilations)
    assert (pamr(image, masks, iterations=iterations, dilations=dilations) - expected).abs().max().item() < 1e-5


def test_masks_of_another_size_are_resized_like_the_reference() -> None:
    image, _ = _inputs(1, 4, 40, 48)
    small = torch.randn(1, 4, 10, 12, generator=torch.Generator().manual_seed(3))
    expected = reference_pamr(image, small, 10, (8, 16))
    assert (pamr(image, small) - expected).abs().max().item() < 1e-5


def test_batched_equals_per_sample() -> None:
    image, masks = _inputs(3, 4, 30, 34)
    batched = pamr(image, masks)
    for i in range(3):
        single = pamr(image[i : i + 1], masks[i : i + 1])
        assert (batched[i : i + 1] - single).abs().max().item() < 1e-6


def test_float32_inside_under_autocast_and_for_half_inputs() -> None:
    image, masks = _inputs(1, 3, 24, 24)
    expected = reference_pamr(image, masks, 10, (8, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = pamr(image, masks)
    assert ours.dtype == torch.float32
    assert (ours - expected).abs().max().item() < 1e-5
    half = pamr(image.half(), masks.half())
    assert half.dtype == torch.float32
    assert (half - reference_pamr(image.half().float(), masks.half().float(), 10, (8, 16))).abs().max() < 1e-5


def test_bad_inputs() -> None:
    with pytest.raises(S2ClipError, match="pamr expects"):
        pamr(torch.zeros(1, 3, 8, 8), torch.zeros(2, 3, 8, 8))
    with pytest.raises(S2ClipError, match="dilations >= 1"):
        pamr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), dilations=(0,))
