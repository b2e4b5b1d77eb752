"""Spatial entropy of feature maps (the paper's Algorithm 1, Figure 4).

A feature map is turned into one spatial probability distribution per channel (a softmax over
the positions of its standardized values); a low entropy means the channel's mass sits on few
positions, i.e. the layer localizes. Along with the mean entropy, Algorithm 1 computes the Gini
coefficient of those distributions and the mean correlation between channels.

`layer_entropy_weights` turns per-layer entropies into fusion weights, softmax(-H / tau), so that
lower-entropy CLIP layers weigh more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import S2ClipError

__all__ = ["spatial_entropy", "layer_entropy_weights", "channel_correlation", "gini"]


#: Relative spread below which a channel of P counts as constant in `channel_correlation`.
_CONST_RTOL = 1e-12


def _epsilon(sigma: Tensor) -> float:
    """Line 4 of Algorithm 1: eps = max(min(sigma) * 1e-2, 1e-6), a Python float.

    The minimum runs over every (batch, channel) entry. Non-finite entries of sigma (a channel
    holding NaN or inf) are left out of the minimum, so that eps is always a finite positive
    number; such a channel yields a non-finite entropy and the mean falls back to 0 anyway.
    """
    finite = sigma[torch.isfinite(sigma)]
    min_sigma = float(finite.min()) if finite.numel() else 0.0
    return max(min_sigma * 1e-2, 1e-6)


def gini(p: Tensor) -> Tensor:
    """Gini coefficient of each distribution along the last axis (lines 10-12 of Algorithm 1).

    Line 12 of the paper is garbled in the extracted text; this uses the standard coefficient of
    the ascending sort P_(1) <= ... <= P_(N) with i counted from 1:

        G = 2 * sum_i i * P_(i) / (N * sum_i P_(i)) - (N + 1) / N

    which is 0 for a uniform distribution and (N - 1) / N for a one-hot one.
    """
    n = p.shape[-1]
    p_sorted, _ = torch.sort(p, dim=-1)
    i = torch.arange(1, n + 1, dtype=p.dtype, device=p.device)
    return 2.0 * (i * p_sorted).sum(-1) / (n * p_sorted.sum(-1)) - (n + 1) / n


def channel_correlation(p: Tensor) -> Tensor:
    """Mean off-diagonal Pearson correlation between channels, per batch item (lines 13-19).

    `p` is [B, C, N]; rows (channels) are the variables, the N positions the observations.
    Returns a [B] tensor, all zeros when C == 1. A constant channel has an undefined
    correlation with every other channel (0 / 0); such NaN entries count as 0 in the mean.
    "Constant" allows for rounding: a channel whose centred norm is at most `_CONST_RTOL` times
    its norm is treated as exactly constant (otherwise the rounding noise of a uniform P would
    correlate with the other channels at random).
    """
    b, c, _ = p.shape
    if c < 2:
        return torch.zeros(b, dtype=p.dtype, device=p.device)
    centered = p - p.mean(-1, keepdim=True)
    norm = torch.linalg.vector_norm(centered, dim=-1)  # [B, C]
    scale = torch.linalg.vector_norm(p, dim=-1)
    constant = norm <= _CONST_RTOL * scale
    centered = centered.masked_fill(constant[..., None], 0.0)
    norm = norm.masked_fill(constant, 0.0)
    cov = centered @ centered.transpose(1, 2)  # [B, C, C]
    corr = cov / (norm[:, :, None] * norm[:, None, :])
    corr = torch.nan_to_num(corr, nan=0.0)
    off_diag = ~torch.eye(c, dtype=torch.bool, device=p.device)
    return (corr * off_diag).sum((1, 2)) / (c * (c - 1))


def _mean_or(value: Tensor, fallback: float) -> float:
    """Mean of `value` as a Python float, `fallback` when that mean is not finite."""
    mean = float(value.mean())
    return mean if math.isfinite(mean) else fallback


def spatial_entropy(features: Tensor) -> dict[str, float]:
    """Algorithm 1 on a [B, C, H, W] feature map; computed in float64.

    Steps (numbers are the paper's lines):
      1. flatten to [B, C, N], N = H * W;
      2-3. mu and sigma over N (sigma from `torch.std`, i.e. with Bessel's correction);
      4. eps = max(min(sigma) * 1e-2, 1e-6), min over all B and C (see `_epsilon`);
      5. F_hat = (F - mu) / (sigma + eps);
      6. F* = F_hat - max_N(F_hat);
      7. P = exp(F*) / (sum_N exp(F*) + eps);
      8. P = max(P, eps) / sum_N max(P, eps);
      9. H = -sum_N P log P per channel;
      10-12. Gini coefficient per channel (standard formula, see `gini`);
      13-19. rho_b = mean off-diagonal channel correlation of P_b (see `channel_correlation`).

    Returns ``{"entropy": mean H over B and C (0.0 if not finite, lines 20-23), "gini": mean
    Gini, "channel_corr": mean rho}`` as Python floats. A constant map gives entropy log N and
    Gini 0. "gini" and "channel_corr" are not guarded: NaN input gives a NaN Gini.

    Note that eps scales with the features (line 4) and also floors P (lines 7-8), so the
    result is invariant to adding a constant to the features but not to scaling them.
    """
    if not isinstance(features, Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise S2ClipError(f"spatial_entropy expects a [B, C, H, W] tensor, got {shape}")
    b, c, h, w = features.shape
    n = h * w
    if b == 0 or c == 0 or n < 2:
        raise S2ClipError(
            f"spatial_entropy needs B, C >= 1 and at least 2 spatial positions, got {tuple(features.shape)}"
        )
    f = features.detach().to(torch.float64).reshape(b, c, n)
    mu = f.mean(-1, keepdim=True)
    sigma = f.std(-1, keepdim=True)
    eps = _epsilon(sigma)
    f_hat = (f - mu) / (sigma + eps)
    f_star = f_hat - f_hat.amax(-1, keepdim=True)
    e = torch.exp(f_star)
    p = e / (e.sum(-1, keepdim=True) + eps)
    p = p.clamp_min(eps)
    p = p / p.sum(-1, keepdim=True)
    ent = -(p * torch.log(p)).sum(-1)  # [B, C]
    return {
        "entropy": _mean_or(ent, 0.0),
        "gini": float(gini(p).mean()),
        "channel_corr": float(channel_correlation(p).mean()),
    }


def layer_entropy_weights(entropies: Sequence[float] | Tensor, tau: float) -> Tensor:
    """Softmax(-H / tau) over layers: lower spatial entropy -> larger weight; sums to 1.

    Returns a 1-D tensor with one weight per layer, in the input tensor's floating dtype
    (float32 for a sequence or a non-floating tensor). Raises `S2ClipError` for an empty or
    non-finite input or a tau that is not a positive finite number.
    """
    if not (isinstance(tau, int | float) and math.isfinite(tau) and tau > 0):
        raise S2ClipError(f"tau must be a positive number, got {tau!r}")
    h = entropies.detach() if isinstance(entropies, Tensor) else torch.tensor(list(entropies))
    dtype = h.dtype if h.is_floating_point() else torch.float32
    h = h.to(torch.float64).reshape(-1)
    if h.numel() == 0:
        raise S2ClipError("layer_entropy_weights needs at least one entropy value")
    if not bool(torch.isfinite(h).all()):
        raise S2ClipError(f"layer entropies must be finite, got {h.tolist()}")
    return torch.softmax(-h / tau, dim=0).to(dtype)
