"""CLIP–VFM fusion: proxy attention from VFM features, applied to CLIP values."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import BETA, GAMMA


def proxy_attention(features: Tensor, beta: float = BETA, gamma: float = GAMMA, *, batch_mean: bool = False) -> Tensor:
    """Row-stochastic attention ``[B, h*w, h*w]`` from VFM features ``[B, C, h, w]``.

    ``S = F̂ᵀF̂`` (cosine similarity of patch features); logits ``γ·(S − mean(S)·β)``, the mean over
    each window's own matrix (ProxyCLIP, one window per batch), or with `batch_mean` over the whole
    batch (Trident, which batches all windows of an image); entries with negative logits are masked
    to −inf before the softmax, so they are exactly 0. The arithmetic is ProxyCLIP's, in its order
    (``torch.mean`` of the matrix, ×β, subtracted, ×γ, float32): the mask is a hard threshold, and
    another rounding of the mean flips the entries that sit on it. The diagonal (S = 1) always
    survives whenever β·mean(S) < 1, so no row is empty; a row that would be fully masked falls back
    to attending to itself.
    """
    f = F.normalize(features.float().flatten(2), dim=1)  # [B, C, N]
    sim = torch.einsum("bcm,bcn->bmn", f, f)  # [B, N, N]
    if batch_mean:
        mean = torch.mean(sim)
    else:
        mean = torch.stack([torch.mean(window) for window in sim]).view(-1, 1, 1)
    logits = (sim - mean * beta) * gamma
    masked = logits.masked_fill(logits < 0.0, float("-inf"))
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
