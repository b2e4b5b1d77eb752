"""CLIP–VFM fusion: proxy attention from VFM features, applied to CLIP values."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import BETA, GAMMA


def proxy_attention(features: Tensor, beta: float = BETA, gamma: float = GAMMA) -> Tensor:
    """Row-stochastic attention ``[B, h*w, h*w]`` from VFM features ``[B, C, h, w]``.

    ``S = F̂ᵀF̂`` (cosine similarity of patch features); logits ``γ·(S − β·mean(S))`` with the mean
    taken over each window's own matrix (so results do not depend on how windows are batched);
    entries with negative logits are masked to −inf before the softmax, so they are exactly 0.
    The diagonal (S = 1) always survives whenever β·mean(S) < 1, so no row is empty; a row that
    would be fully masked falls back to attending to itself.
    """
    f = F.normalize(features.float().flatten(2), dim=1)  # [B, C, N]
    sim = torch.bmm(f.transpose(1, 2), f)  # [B, N, N]
    logits = (sim - beta * sim.mean(dim=(1, 2), keepdim=True)) * gamma
    masked = logits.masked_fill(logits < 0, float("-inf"))
    # A row can only be fully masked if its own (diagonal) logit is; check that cheaply first.
    if bool((logits.diagonal(dim1=1, dim2=2) < 0).any()):
        empty = torch.isinf(masked).all(dim=-1)
        eye = torch.eye(masked.shape[-1], dtype=torch.bool, device=masked.device).expand_as(masked)
        masked = torch.where(empty.unsqueeze(-1) & eye, torch.zeros_like(masked), masked)
    return torch.softmax(masked, dim=-1)


def resample_matrix(src: tuple[int, int], dst: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """``[dst_h*dst_w, src_h*src_w]`` matrix of bilinear resampling (align_corners=False), so that
    ``R @ values`` equals ``F.interpolate`` of a ``src``-grid map to the ``dst`` grid."""
    n = src[0] * src[1]
    eye = torch.eye(n, device=device).reshape(n, 1, src[0], src[1])
    out = F.interpolate(eye, size=dst, mode="bilinear", align_corners=False)  # [n, 1, dh, dw]
    return out.reshape(n, -1).T.contiguous()
