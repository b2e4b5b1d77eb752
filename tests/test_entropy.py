"""Algorithm 1 (spatial entropy, Gini, channel correlation) against hand-worked cases."""

from __future__ import annotations

import math

import pytest
import torch

from s2clip_cli.errors import S2ClipError
from s2clip_cli.pipeline.spatial_entropy import layer_entropy_weights, spatial_entropy


def _one_hot_by_hand(n: int, eps: float | None = None, scale: float = 1.0) -> tuple[float, float, bool]:
    """Entropy and Gini of a one-hot channel (scale * e_k) of n positions, Algorithm 1 in float64.

    Returns (H, G, clamped) where `clamped` tells whether line 8's max(P, eps) bit.
    `eps` overrides line 4 (when other channels in the batch set a smaller one).
    """
    # Line 1: values x = s * (1, 0, ..., 0), s = scale.
    # Lines 2-3: mu = s/n; with Bessel's correction
    #   sigma^2 = s^2 ((1 - 1/n)^2 + (n - 1) / n^2) / (n - 1) = s^2 ((n - 1) n / n^2) / (n - 1) = s^2 / n.
    mu = scale / n
    sigma = scale * math.sqrt(1.0 / n)
    # Line 4: eps = max(sigma * 1e-2, 1e-6)  (= s * 1e-2 / sqrt(n) for any reasonable n).
    if eps is None:
        eps = max(sigma * 1e-2, 1e-6)
    # Line 5: hot = (s - mu) / (sigma + eps), others = -mu / (sigma + eps).
    hot = (scale - mu) / (sigma + eps)
    other = -mu / (sigma + eps)
    # Line 6: subtract the max (the hot value): hot -> 0, others -> -s / (sigma + eps).
    other_star = other - hot
    assert math.isclose(other_star, -scale / (sigma + eps))
    # Line 7: P = exp(F*) / (sum exp(F*) + eps), the sum being 1 + (n - 1) exp(other_star).
    e_other = math.exp(other_star)
    denom = 1.0 + (n - 1) * e_other + eps
    p_hot, p_other = 1.0 / denom, e_other / denom
    # Line 8: clamp at eps, then renormalize. For n = 64: p_other = 3.6e-4 < eps = 1.25e-3,
    # so every non-hot position becomes eps: the clamp, not the softmax, sets their mass.
    clamped = p_other < eps
    p_other = max(p_other, eps)
    p_hot = max(p_hot, eps)
    total = p_hot + (n - 1) * p_other
    p_hot, p_other = p_hot / total, p_other / total
    # Line 9: H = -sum P log P.
    h = -(p_hot * math.log(p_hot) + (n - 1) * p_other * math.log(p_other))
    # Gini of the ascending sort (p_other x (n-1), then p_hot), i from 1, sum P = 1:
    #   G = 2 (sum_{i<n} i p_other + n p_hot) / n - (n + 1) / n.
    g = 2.0 * (p_other * (n - 1) * n / 2 + n * p_hot) / n - (n + 1) / n
    return h, g, clamped


def _hot(side: int) -> torch.Tensor:
    x = torch.zeros(side, side)
    x[0, 0] = 1.0
    return x[None, None]


def test_constant_map_is_uniform_even_with_zero_sigma() -> None:
    # sigma = 0 everywhere -> eps = 1e-6, F_hat = 0 / 1e-6 = 0, P = 1/N: H = log N, Gini 0.
    feats = torch.tensor([3.0, -1.5, 0.0]).reshape(1, 3, 1, 1).expand(2, 3, 4, 5).contiguous()
    stats = spatial_entropy(feats)
    assert stats["entropy"] == pytest.approx(math.log(20), abs=1e-12)
    assert stats["gini"] == pytest.approx(0.0, abs=1e-12)
    # Constant channels have undefined correlation; counted as 0, and the mean stays finite.
    assert stats["channel_corr"] == 0.0
    assert all(isinstance(v, float) for v in stats.values())


@pytest.mark.parametrize("side", [4, 8])
def test_one_hot_matches_hand_derivation(side: int) -> None:
    n = side * side
    h, g, clamped = _one_hot_by_hand(n)
    # For N = 64 the clamp of line 8 dominates; for N = 16 it does not (both paths covered).
    assert clamped == (n == 64)
    feats = torch.zeros(1, 1, side, side)
    feats[0, 0, 1, 2] = 1.0
    stats = spatial_entropy(feats)
    assert stats["entropy"] == pytest.approx(h, rel=1e-10)
    assert stats["gini"] == pytest.approx(g, rel=1e-10)
    # Shifting the values changes nothing (mu absorbs it) ...
    assert spatial_entropy(feats + 3.0)["entropy"] == pytest.approx(h, rel=1e-9)
    # ... but scaling does: eps grows with sigma and also floors P in lines 7-8.
    h5, g5, _ = _one_hot_by_hand(n, scale=5.0)
    scaled = spatial_entropy(feats * 5.0 + 3.0)
    assert scaled["entropy"] == pytest.approx(h5, rel=1e-9)
    assert scaled["gini"] == pytest.approx(g5, rel=1e-9)
    assert h5 > h


def test_one_hot_n64_value_without_clamp_would_differ() -> None:
    # The N = 64 reference is not the plain softmax entropy: the clamp raised the tail's mass.
    n = 64
    h, _, _ = _one_hot_by_hand(n)
    sigma, eps = 1 / 8, 1e-2 / 8
    e_other = math.exp(-1 / (sigma + eps))
    z = 1 + (n - 1) * e_other
    h_softmax = -(math.log(1 / z) / z + (n - 1) * (e_other / z) * math.log(e_other / z))
    assert h > h_softmax + 0.1
    assert spatial_entropy(_hot(8))["entropy"] == pytest.approx(h, rel=1e-10)


def test_eps_is_the_minimum_over_all_channels() -> None:
    # A constant second channel has sigma = 0, so line 4 gives eps = 1e-6 for the whole batch:
    # the one-hot channel's entropy changes accordingly and the constant one contributes log N.
    side, n = 8, 64
    feats = torch.cat([_hot(side), torch.full((1, 1, side, side), 2.0)], dim=1)
    h_hot, _, clamped = _one_hot_by_hand(n, eps=1e-6)
    assert not clamped
    stats = spatial_entropy(feats)
    assert stats["entropy"] == pytest.approx((h_hot + math.log(n)) / 2, rel=1e-10)
    assert stats["entropy"] != pytest.approx((_one_hot_by_hand(n)[0] + math.log(n)) / 2, rel=1e-3)


def test_entropy_falls_as_the_map_gets_more_peaked() -> None:
    side = 16
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    r2 = ((ys - 7.3) ** 2 + (xs - 8.1) ** 2).double()
    widths = [8.0, 4.0, 2.0, 1.0, 0.5]
    stats = [spatial_entropy(torch.exp(-r2 / (2 * w * w))[None, None]) for w in widths]
    entropies = [s["entropy"] for s in stats]
    ginis = [s["gini"] for s in stats]
    assert all(a > b for a, b in zip(entropies, entropies[1:], strict=False)), entropies
    assert ginis[-1] > ginis[0]
    assert entropies[0] < math.log(side * side)


def test_channel_correlation() -> None:
    x = torch.randn(3, 1, 6, 6)
    assert spatial_entropy(x)["channel_corr"] == 0.0  # C = 1
    # Identical channels correlate perfectly.
    assert spatial_entropy(x.repeat(1, 4, 1, 1))["channel_corr"] == pytest.approx(1.0, abs=1e-9)
    # A constant channel next to a varying one: NaN correlation counted as 0.
    mixed = torch.cat([x, torch.ones_like(x)], dim=1)
    assert spatial_entropy(mixed)["channel_corr"] == 0.0
    # Independent noise channels correlate weakly.
    noise = spatial_entropy(torch.randn(2, 8, 16, 16))["channel_corr"]
    assert abs(noise) < 0.2


def test_non_finite_input_gives_zero_entropy() -> None:
    assert spatial_entropy(torch.full((1, 2, 3, 3), float("nan")))["entropy"] == 0.0
    x = torch.randn(2, 3, 4, 4)
    x[1, 2, 0, 0] = float("nan")
    assert spatial_entropy(x)["entropy"] == 0.0
    x[1, 2, 0, 0] = float("inf")
    assert spatial_entropy(x)["entropy"] == 0.0


def test_float32_and_float64_agree() -> None:
    x = torch.randn(2, 5, 7, 9, dtype=torch.float64)
    a, b = spatial_entropy(x), spatial_entropy(x.float())
    for key in a:
        assert a[key] == pytest.approx(b[key], abs=1e-5)


@pytest.mark.parametrize("shape", [(4, 4), (1, 2, 3), (1, 1, 1, 1), (0, 2, 3, 3)])
def test_bad_shapes_raise(shape: tuple[int, ...]) -> None:
    with pytest.raises(S2ClipError):
        spatial_entropy(torch.zeros(shape))


def test_layer_entropy_weights() -> None:
    h = [2.0, 1.0, 3.0]
    w = layer_entropy_weights(h, tau=0.5)
    expected = [math.exp(-v / 0.5) for v in h]
    expected = [v / sum(expected) for v in expected]
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(w.sum()) == pytest.approx(1.0)
    assert int(w.argmax()) == 1  # lowest entropy weighs most
    # Larger tau flattens the weights.
    assert float(layer_entropy_weights(h, tau=100.0).max()) < float(w.max())
    t = layer_entropy_weights(torch.tensor(h, dtype=torch.float64), tau=1.0)
    assert t.dtype == torch.float64 and t.shape == (3,)
    for bad_tau in (0.0, -1.0, float("nan")):
        with pytest.raises(S2ClipError):
            layer_entropy_weights(h, tau=bad_tau)
    with pytest.raises(S2ClipError):
        layer_entropy_weights([], tau=1.0)
    with pytest.raises(S2ClipError):
        layer_entropy_weights([1.0, float("nan")], tau=1.0)
