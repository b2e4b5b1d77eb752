"""Semantic-consistency average precision of patch features (the paper's Figure 3).

For each feature source (a CLIP layer or a vision foundation model), the cosine similarity of
two patches' features is a score for "these two patches carry the same ground-truth class".
Pooling the (score, same) pairs over a dataset gives a precision-recall curve and an average
precision per source: the higher, the better the source separates semantic categories.

Pipeline per image: `patch_labels` reduces the ground truth to the feature grid, `sample_pairs`
draws patch pairs among the patches with a clean label, `pair_scores` scores them, and
`APAccumulator.add` pools them per source; `APAccumulator.results` computes the curves.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import average_precision_score, precision_recall_curve
from torch import Tensor

from ..errors import S2ClipError

__all__ = [
    "VFM_SOURCES",
    "APAccumulator",
    "parse_sources",
    "patch_labels",
    "sample_pairs",
    "pair_scores",
]

#: Vision-foundation-model sources `parse_sources` accepts (besides ``clip:<layer>``).
VFM_SOURCES: tuple[str, ...] = (
    "dino_vitb8",
    "dino_vitb16",
    "dino_vits8",
    "dino_vits16",
    "dinov2_vits14",
    "dinov2_vitb14",
    "sam_vitb16",
)

#: Most points kept per precision-recall curve in `APAccumulator.results` (for JSON/plots).
MAX_CURVE_POINTS = 200

_CLIP_TOKEN = re.compile(r"^clip:(\d+)(?:-(\d+))?$")


def patch_labels(label: np.ndarray, grid: tuple[int, int], ignore_index: int = 255) -> np.ndarray:
    """Reduce an [H, W] ground-truth map to the [h, w] feature grid.

    A patch gets a class only if all its pixels carry that one class; a patch that mixes
    classes, contains an ignored pixel (`ignore_index`, or any negative value) or has no pixel
    at all gets -1 and is left out of the pairs.

    Pixels map to patches proportionally, so H and W need not be multiples of h and w: pixel
    row y belongs to patch row floor(y * h / H), column x to floor(x * w / W). When H is a
    multiple of h this is the usual block of H / h rows per patch.
    """
    lbl = np.asarray(label)
    if lbl.ndim != 2 or lbl.size == 0:
        raise S2ClipError(f"label must be a non-empty [H, W] array, got shape {lbl.shape}")
    if not np.issubdtype(lbl.dtype, np.integer):
        raise S2ClipError(f"label must hold integer class indices, got dtype {lbl.dtype}")
    if len(grid) != 2 or not all(isinstance(g, int | np.integer) and g >= 1 for g in grid):
        raise S2ClipError(f"grid must be two positive integers (h, w), got {grid!r}")
    h, w = int(grid[0]), int(grid[1])
    big_h, big_w = lbl.shape
    lbl = lbl.astype(np.int64)
    invalid = (lbl == ignore_index) | (lbl < 0)

    rows = np.arange(big_h, dtype=np.int64) * h // big_h
    cols = np.arange(big_w, dtype=np.int64) * w // big_w
    patch = (rows[:, None] * w + cols[None, :]).ravel()
    n_patches = h * w

    count = np.bincount(patch, minlength=n_patches)
    bad = np.bincount(patch, weights=invalid.ravel(), minlength=n_patches) > 0
    lo = np.full(n_patches, np.iinfo(np.int64).max, dtype=np.int64)
    hi = np.full(n_patches, np.iinfo(np.int64).min, dtype=np.int64)
    np.minimum.at(lo, patch, lbl.ravel())
    np.maximum.at(hi, patch, lbl.ravel())

    out = np.where((count > 0) & ~bad & (lo == hi), lo, -1)
    return out.reshape(h, w)


def sample_pairs(
    patch_lbl: np.ndarray, max_pairs: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patch pairs among the labelled patches (label >= 0) of a `patch_labels` grid.

    Returns ``(idx_a, idx_b, same)``: flat indices into the h * w grid (row-major, as
    ``features.reshape(C, -1)``) and whether the two patches share a class. Never pairs a patch
    with itself. If there are at most `max_pairs` unordered pairs they are all returned (in a
    fixed order); otherwise `max_pairs` pairs are drawn uniformly, with replacement, from `rng`,
    so the same seed gives the same pairs.
    """
    if max_pairs < 1:
        raise S2ClipError(f"max_pairs must be >= 1, got {max_pairs}")
    flat = np.asarray(patch_lbl).ravel()
    valid = np.flatnonzero(flat >= 0)
    n = valid.size
    if n < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros(0, dtype=bool)
    if n * (n - 1) // 2 <= max_pairs:
        ia, ib = np.triu_indices(n, k=1)
    else:
        ia = rng.integers(0, n, size=max_pairs)
        ib = rng.integers(0, n - 1, size=max_pairs)
        ib = ib + (ib >= ia)  # skip ia itself: ib is uniform over the other n - 1 patches
    idx_a, idx_b = valid[ia].astype(np.int64), valid[ib].astype(np.int64)
    return idx_a, idx_b, flat[idx_a] == flat[idx_b]


def pair_scores(features: Tensor, idx_a: np.ndarray, idx_b: np.ndarray) -> np.ndarray:
    """Cosine similarity of the feature vectors of patch pairs, as float64.

    `features` is [C, h, w]; `idx_a` / `idx_b` are flat indices into h * w (see
    `sample_pairs`). A zero feature vector has similarity 0 with everything.
    """
    if not isinstance(features, Tensor) or features.dim() != 3:
        raise S2ClipError("pair_scores expects a [C, h, w] feature tensor")
    ia = np.asarray(idx_a, dtype=np.int64)
    ib = np.asarray(idx_b, dtype=np.int64)
    if ia.shape != ib.shape or ia.ndim != 1:
        raise S2ClipError(f"idx_a and idx_b must be 1-D and of equal length, got {ia.shape} and {ib.shape}")
    flat = features.detach().reshape(features.shape[0], -1)
    n = flat.shape[1]
    if ia.size and (min(ia.min(), ib.min()) < 0 or max(ia.max(), ib.max()) >= n):
        raise S2ClipError(f"pair indices out of range for a grid of {n} patches")
    ta = torch.from_numpy(ia).to(flat.device)
    tb = torch.from_numpy(ib).to(flat.device)
    fa = F.normalize(flat[:, ta].to(torch.float64), dim=0)
    fb = F.normalize(flat[:, tb].to(torch.float64), dim=0)
    return (fa * fb).sum(0).cpu().numpy()


def _subsample(n: int, k: int) -> np.ndarray:
    """At most `k` evenly spread indices into range(n), always keeping the first and last."""
    if n <= k:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(np.int64))


class APAccumulator:
    """Pools (score, same-class) pairs per feature source and computes AP and PR curves.

    Scores are stored as float32 and labels as bool to keep memory at 5 bytes per pair.
    """

    def __init__(self, max_curve_points: int = MAX_CURVE_POINTS) -> None:
        if max_curve_points < 2:
            raise S2ClipError("max_curve_points must be >= 2")
        self.max_curve_points = max_curve_points
        self._scores: dict[str, list[np.ndarray]] = {}
        self._same: dict[str, list[np.ndarray]] = {}

    @property
    def sources(self) -> list[str]:
        """Source names in the order they were first added."""
        return list(self._scores)

    def add(self, source: str, scores: np.ndarray, same: np.ndarray) -> None:
        """Add one image's pairs for `source` (scores from `pair_scores`, same from `sample_pairs`)."""
        s = np.asarray(scores, dtype=np.float32).ravel()
        y = np.asarray(same, dtype=bool).ravel()
        if s.shape != y.shape:
            raise S2ClipError(f"{source}: {s.size} scores but {y.size} labels")
        self._scores.setdefault(source, []).append(s)
        self._same.setdefault(source, []).append(y)

    def results(self) -> dict[str, dict[str, Any]]:
        """Per source: ``{"ap", "positive_rate", "n_pairs", "precision", "recall"}``.

        AP is `sklearn.metrics.average_precision_score`; the curve is `precision_recall_curve`
        subsampled to at most `max_curve_points` points (plain lists, recall decreasing). A
        source without any positive pair has AP NaN; one without pairs also a NaN positive rate
        and empty curves.
        """
        out: dict[str, dict[str, Any]] = {}
        for source in self._scores:
            s = np.concatenate(self._scores[source]).astype(np.float64)
            y = np.concatenate(self._same[source])
            n_pos = int(y.sum())
            res: dict[str, Any] = {
                "ap": math.nan,
                "positive_rate": n_pos / y.size if y.size else math.nan,
                "n_pairs": int(y.size),
                "precision": [],
                "recall": [],
            }
            if n_pos > 0 and np.isfinite(s).all():
                res["ap"] = float(average_precision_score(y, s))
                precision, recall, _ = precision_recall_curve(y, s)
                keep = _subsample(precision.size, self.max_curve_points)
                res["precision"] = [float(v) for v in precision[keep]]
                res["recall"] = [float(v) for v in recall[keep]]
            out[source] = res
        return out


def parse_sources(spec: str, max_layer: int | None = None) -> list[str]:
    """Parse a comma-separated source list such as ``"clip:0-10,dino_vitb8,sam_vitb16"``.

    ``clip:A`` is CLIP layer A, ``clip:A-B`` layers A..B inclusive (A <= B); the other items
    must be names from `VFM_SOURCES`. Whitespace around items is ignored, repeats are dropped
    (first occurrence kept). With `max_layer`, CLIP layers above it are rejected. Raises
    `S2ClipError` on anything else.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise S2ClipError("empty source list; expected e.g. 'clip:0-10,dino_vitb8'")
    out: list[str] = []
    for raw in spec.split(","):
        token = raw.strip()
        if not token:
            raise S2ClipError(f"empty item in source list {spec!r}")
        match = _CLIP_TOKEN.match(token)
        if match:
            first = int(match.group(1))
            last = int(match.group(2)) if match.group(2) is not None else first
            if last < first:
                raise S2ClipError(f"bad CLIP layer range {token!r}: {first} > {last}")
            if max_layer is not None and last > max_layer:
                raise S2ClipError(f"CLIP layer {last} in {token!r} is beyond the last layer {max_layer}")
            names = [f"clip:{i}" for i in range(first, last + 1)]
        elif token.startswith("clip"):
            raise S2ClipError(f"bad CLIP source {token!r}; use clip:<layer> or clip:<first>-<last>")
        elif token in VFM_SOURCES:
            names = [token]
        else:
            raise S2ClipError(
                f"unknown source {token!r}; choose clip:<layers> or one of {', '.join(VFM_SOURCES)}"
            )
        for name in names:
            if name not in out:
                out.append(name)
    return out
