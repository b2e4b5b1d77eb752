"""Positional-embedding resampling as the lineage does it, for CLIP, DINO and DINOv2 alike.

ProxyCLIP's and Trident's `interpolate_pos_encoding` (CLIP), the DINO hub's and the DINOv2 hub's
(`interpolate_offset=0.1`, `interpolate_antialias=False`) all resample the square patch grid with
``F.interpolate(grid, scale_factor=((gh + 0.1) / N, (gw + 0.1) / N), mode="bicubic")``: the
``+0.1`` is a historical kludge against rounding, and because a scale factor (not a size) is
given, the sampling positions follow the scale factor, so the result differs from resampling to a
size (timm's and open_clip's `resample_abs_pos_embed`, which also antialias). All return the
embedding unchanged when the grid is the native one. We keep the height on the first axis (the
references name height `w` and width `h`, which matters only for non-square grids) and compute
in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LINEAGE_OFFSET = 0.1


def resample_patch_pos_embed(patch_pos: Tensor, grid: tuple[int, int], *, offset: float = LINEAGE_OFFSET) -> Tensor:
    """Patch positional embedding ``[N, D]`` of a square ``√N × √N`` grid → ``[gh·gw, D]``.

    Bicubic (a = −0.75, no antialias), ``scale_factor = ((gh + offset) / √N, (gw + offset) / √N)``;
    the input itself (as float32) when `grid` is the native grid."""
    n, dim = patch_pos.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"expected a square patch grid, got {n} positions")
    gh, gw = grid
    if (gh, gw) == (side, side):
        return patch_pos.float()
    square = patch_pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    out = F.interpolate(square, scale_factor=((gh + offset) / side, (gw + offset) / side), mode="bicubic",
                        align_corners=False)
    if tuple(out.shape[-2:]) != (gh, gw):  # pragma: no cover - the offset keeps floor() exact
        raise RuntimeError(f"positional embedding resampled to {tuple(out.shape[-2:])}, expected {grid}")
    return out.permute(0, 2, 3, 1).reshape(gh * gw, dim)


def resample_pos_embed(pos: Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> Tensor:
    """``[P + N, D]`` (P prefix tokens, e.g. the class token, kept as they are) → ``[P + gh·gw, D]``."""
    prefix, patches = pos[:num_prefix_tokens].float(), pos[num_prefix_tokens:]
    return torch.cat([prefix, resample_patch_pos_embed(patches, grid)], dim=0)
