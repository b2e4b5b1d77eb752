"""Semantic-consistency AP: ground-truth reduction, pair sampling, scoring, pooling, sources."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from s2clip_cli.analysis.consistency import (
    VFM_SOURCES,
    APAccumulator,
    pair_scores,
    parse_sources,
    patch_labels,
    sample_pairs,
)
from s2clip_cli.errors import S2ClipError


def test_patch_labels_keeps_only_pure_patches() -> None:
    label = np.array(
        [
            [1, 1, 2, 2],
            [1, 1, 2, 3],
            [0, 0, 4, 4],
            [0, 255, 4, 4],
        ],
        dtype=np.uint8,
    )
    out = patch_labels(label, (2, 2))
    # top-left pure 1; top-right mixes 2 and 3; bottom-left holds an ignored pixel; bottom-right pure 4.
    assert out.tolist() == [[1, -1], [-1, 4]]
    assert out.dtype == np.int64
    # Another ignore index, and negative labels count as ignored.
    assert patch_labels(np.where(label == 255, 7, label), (2, 2), ignore_index=7).tolist() == [
        [1, -1],
        [-1, 4],
    ]
    neg = label.astype(np.int64)
    neg[0, 0] = -1
    assert patch_labels(neg, (2, 2))[0, 0] == -1


def test_patch_labels_proportional_mapping() -> None:
    # 5 rows onto 2 patch rows: floor(y * 2 / 5) puts rows 0-2 in patch row 0, rows 3-4 in row 1;
    # 3 columns onto 2 patch columns: columns 0-1 -> 0, column 2 -> 1.
    label = np.zeros((5, 3), dtype=np.int32)
    label[3:, :2] = 5
    label[3:, 2] = 6
    label[:3, 2] = 9
    assert patch_labels(label, (2, 2)).tolist() == [[0, 9], [5, 6]]
    # Moving the class boundary one row up mixes the bottom patches.
    label[2, :] = 5
    assert patch_labels(label, (2, 2)).tolist() == [[-1, -1], [5, 6]]
    # A grid finer than the label: patches without pixels are dropped.
    out = patch_labels(np.ones((2, 2), dtype=np.int64), (4, 4))
    assert (out == 1).sum() == 4 and (out == -1).sum() == 12


@pytest.mark.parametrize(
    "label, grid",
    [
        (np.zeros((4,), dtype=np.int64), (2, 2)),
        (np.zeros((4, 4)), (2, 2)),
        (np.zeros((4, 4), dtype=int), (0, 2)),
    ],
)
def test_patch_labels_rejects_bad_input(label: np.ndarray, grid: tuple[int, int]) -> None:
    with pytest.raises(S2ClipError):
        patch_labels(label, grid)


def test_sample_pairs_exhaustive_when_small() -> None:
    lbl = np.array([[0, 0, -1], [1, -1, 0]])
    a, b, same = sample_pairs(lbl, max_pairs=100, rng=np.random.default_rng(0))
    # Valid flat indices 0, 1, 3, 5 -> all 6 unordered pairs.
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [
        (0, 1),
        (0, 3),
        (0, 5),
        (1, 3),
        (1, 5),
        (3, 5),
    ]
    flat = lbl.ravel()
    assert same.tolist() == (flat[a] == flat[b]).tolist()
    assert same.sum() == 3  # (0,1), (0,5), (1,5) share class 0
    empty = sample_pairs(np.array([[3, -1]]), 10, np.random.default_rng(0))
    assert all(x.size == 0 for x in empty)


def test_sample_pairs_bounded_seeded_and_never_self() -> None:
    rng_lbl = np.random.default_rng(1)
    lbl = rng_lbl.integers(-1, 4, size=(20, 20))
    a, b, same = sample_pairs(lbl, max_pairs=5000, rng=np.random.default_rng(42))
    assert a.shape == b.shape == same.shape == (5000,)
    assert (a != b).all()
    flat = lbl.ravel()
    assert (flat[a] >= 0).all() and (flat[b] >= 0).all()
    assert (same == (flat[a] == flat[b])).all()
    a2, b2, _ = sample_pairs(lbl, max_pairs=5000, rng=np.random.default_rng(42))
    assert (a == a2).all() and (b == b2).all()
    a3, _, _ = sample_pairs(lbl, max_pairs=5000, rng=np.random.default_rng(43))
    assert not (a == a3).all()
    # Both members are spread over the valid patches (b is not biased to indices above a).
    assert np.unique(b).size > 0.9 * (flat >= 0).sum()
    with pytest.raises(S2ClipError):
        sample_pairs(lbl, 0, np.random.default_rng(0))


def test_pair_scores_cosine() -> None:
    feats = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 3.0], [2.0, 0.0]]])  # C=2, 2x2 grid
    # Flat vectors: 0 -> (1, 0), 1 -> (0, 3), 2 -> (2, 2), 3 -> (0, 0).
    s = pair_scores(feats, np.array([0, 0, 1, 3]), np.array([1, 2, 2, 0]))
    assert s.dtype == np.float64
    assert s.tolist() == pytest.approx([0.0, 1 / math.sqrt(2), 1 / math.sqrt(2), 0.0])
    with pytest.raises(S2ClipError):
        pair_scores(feats, np.array([0]), np.array([4]))
    with pytest.raises(S2ClipError):
        pair_scores(feats[0], np.array([0]), np.array([1]))


def _scene(rng: np.random.Generator) -> np.ndarray:
    """A 32x32 label map of random rectangles over 4 classes, with an ignored band."""
    label = np.full((32, 32), rng.integers(0, 4), dtype=np.int64)
    for _ in range(4):
        y, x = rng.integers(0, 24, size=2)
        label[y : y + rng.integers(4, 16), x : x + rng.integers(4, 16)] = rng.integers(0, 4)
    label[:, 30:] = 255
    return label


def _run_sources(n_images: int = 3) -> dict[str, dict]:
    rng = np.random.default_rng(0)
    acc = APAccumulator()
    for _ in range(n_images):
        pl = patch_labels(_scene(rng), (8, 8))
        a, b, same = sample_pairs(pl, max_pairs=800, rng=rng)
        one_hot = torch.nn.functional.one_hot(torch.from_numpy(pl).clamp_min(0), 4).permute(2, 0, 1).float()
        acc.add("perfect", pair_scores(one_hot, a, b), same)
        acc.add("constant", pair_scores(torch.ones(5, 8, 8), a, b), same)
        acc.add("noise", pair_scores(torch.randn(16, 8, 8), a, b), same)
        noisy = one_hot + 0.7 * torch.randn(4, 8, 8)
        acc.add("noisy", pair_scores(noisy, a, b), same)
    assert acc.sources == ["perfect", "constant", "noise", "noisy"]
    return acc.results()


def test_ap_of_perfect_constant_and_noisy_sources() -> None:
    res = _run_sources()
    rate = res["perfect"]["positive_rate"]
    assert 0.05 < rate < 0.95
    assert res["perfect"]["n_pairs"] == res["constant"]["n_pairs"] > 1000
    assert res["perfect"]["ap"] == pytest.approx(1.0)
    # All scores tie: one operating point at recall 1, precision = positive rate.
    assert res["constant"]["ap"] == pytest.approx(rate)
    assert res["constant"]["positive_rate"] == pytest.approx(rate)
    assert res["noise"]["ap"] < res["noisy"]["ap"] < res["perfect"]["ap"]
    for r in res.values():
        assert len(r["precision"]) == len(r["recall"]) <= 200
        assert r["recall"][0] == pytest.approx(1.0) and r["recall"][-1] == 0.0
        assert all(isinstance(v, float) for v in r["precision"])


def test_curve_subsampling_keeps_ends() -> None:
    acc = APAccumulator(max_curve_points=50)
    rng = np.random.default_rng(3)
    y = rng.random(5000) < 0.3
    acc.add("x", rng.random(5000) + y, y)
    r = acc.results()["x"]
    assert 2 < len(r["recall"]) <= 50
    assert r["recall"][0] == 1.0 and r["recall"][-1] == 0.0 and r["precision"][-1] == 1.0
    assert r["n_pairs"] == 5000


def test_ap_without_positives_or_pairs() -> None:
    acc = APAccumulator()
    acc.add("neg", np.array([0.1, 0.5]), np.array([False, False]))
    acc.add("none", np.zeros(0), np.zeros(0, dtype=bool))
    res = acc.results()
    assert math.isnan(res["neg"]["ap"]) and res["neg"]["positive_rate"] == 0.0
    assert res["none"]["n_pairs"] == 0 and math.isnan(res["none"]["positive_rate"])
    with pytest.raises(S2ClipError):
        acc.add("bad", np.zeros(3), np.zeros(2, dtype=bool))


def test_parse_sources() -> None:
    got = parse_sources("clip:0-10,dino_vitb8,dinov2_vitb14,sam_vitb16")
    assert got == [f"clip:{i}" for i in range(11)] + ["dino_vitb8", "dinov2_vitb14", "sam_vitb16"]
    assert parse_sources(" clip:3 , clip:2-4,dino_vits16 ") == ["clip:3", "clip:2", "clip:4", "dino_vits16"]
    assert parse_sources(",".join(VFM_SOURCES)) == list(VFM_SOURCES)
    assert parse_sources("clip:5-5", max_layer=5) == ["clip:5"]


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "  ",
        "clip:5-2",
        "clip:a",
        "clip:",
        "clip:1-",
        "clip 1",
        "clip:-1",
        "dino",
        "clip:0,,dino_vitb8",
        "sam_vith",
        "clip:0-12",
    ],
)
def test_parse_sources_rejects(spec: str) -> None:
    with pytest.raises(S2ClipError):
        parse_sources(spec, max_layer=11)
