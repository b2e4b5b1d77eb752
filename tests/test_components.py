"""Connected-region splitting: the optimized implementation equals the original (Algorithm 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s2clip_cli.errors import S2ClipError
from s2clip_cli.refine.components import split_regions

IMPLS = ("original", "optimized")


def _random_case(seed: int, num_classes: int = 12, size: tuple[int, int] = (64, 80),
                 coarse_thresh: float = 0.2) -> tuple[np.ndarray, torch.Tensor, bool]:
    """Blobby softmax probabilities and the one-hot the refinement would build from them."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, num_classes, size[0] // 6, size[1] // 6, generator=gen)
    probs = torch.softmax(F.interpolate(noise, size, mode="bilinear", align_corners=False)[0] * 3, dim=0)
    labels = probs.argmax(0)
    if coarse_thresh > 0:
        labels[probs.max(0).values < coarse_thresh] = num_classes
        onehot = F.one_hot(labels, num_classes + 1).permute(2, 0, 1).numpy()
        return onehot, probs, False
    return F.one_hot(labels, num_classes).permute(2, 0, 1).numpy(), probs, True


def _assert_same(a, b) -> None:
    assert a.classes() == b.classes()
    assert torch.equal(a.class_ids, b.class_ids)
    assert np.array_equal(a.region_map, b.region_map)
    assert torch.equal(a.boxes, b.boxes)
    assert torch.equal(a.points, b.points)
    torch.testing.assert_close(a.scores, b.scores, rtol=0, atol=1e-6)
    for c in a.classes():
        assert torch.equal(a.masks(c), b.masks(c))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("coarse_thresh", [0.0, 0.2, 0.45])
@pytest.mark.parametrize("min_area", [0, 15])
def test_optimized_equals_original(seed: int, coarse_thresh: float, min_area: int) -> None:
    onehot, probs, split_last = _random_case(seed, coarse_thresh=coarse_thresh)
    kw = dict(split_last=split_last, min_area=min_area, coarse_thresh=coarse_thresh)
    original = split_regions(onehot, probs, impl="original", **kw)
    optimized = split_regions(onehot, probs, impl="optimized", **kw)
    assert len(original) > 20  # many regions, several per class
    _assert_same(original, optimized)
    if not split_last:  # the extra low-confidence channel is never split
        assert onehot[-1].any() and onehot.shape[0] - 1 not in original.classes()


def test_classes_below_coarse_thresh_and_absent_classes_have_no_regions() -> None:
    onehot, probs, _ = _random_case(5, num_classes=12, coarse_thresh=0.0)
    probs = probs.clone()
    probs[3] *= 0.1  # class 3 never reaches the threshold
    onehot[7] = 0  # class 7 absent from the map
    onehot[0] = onehot[0] | onehot[7]
    kw = dict(split_last=True, min_area=0, coarse_thresh=0.15)
    original = split_regions(onehot, probs, impl="original", **kw)
    optimized = split_regions(onehot, probs, impl="optimized", **kw)
    _assert_same(original, optimized)
    assert 3 not in original.classes() and 7 not in original.classes()
    assert original.indices(3).numel() == 0 and original.masks(3).shape[0] == 0


@pytest.mark.parametrize("seed", [0, 1])
def test_without_cca_one_region_per_class(seed: int) -> None:
    onehot, probs, split_last = _random_case(seed)
    kw = dict(split_last=split_last, min_area=10, coarse_thresh=0.2, use_cca=False)
    original = split_regions(onehot, probs, impl="original", **kw)
    optimized = split_regions(onehot, probs, impl="optimized", **kw)
    _assert_same(original, optimized)
    assert len(original.classes()) == len(original)
    for c in original.classes():
        assert np.array_equal(original.masks(c)[0].numpy(), onehot[c])


def _hand_made() -> tuple[np.ndarray, torch.Tensor]:
    """Class 0: an L (rows 1-3) touching a diagonal pixel (8-connected), and a 2x2 square;
    class 1: a lone pixel left of class 0's first pixel but one row lower, and a bar."""
    onehot = np.zeros((2, 8, 10), dtype=np.uint8)
    onehot[0, 1, 6:9] = 1
    onehot[0, 2:4, 6] = 1
    onehot[0, 4, 5] = 1  # diagonal neighbour of (3, 6)
    onehot[0, 6:8, 1:3] = 1
    onehot[1, 2, 1] = 1
    onehot[1, 5, 3:9] = 1
    probs = torch.full((2, 8, 10), 0.25)
    probs[0, 2, 6] = 0.9
    probs[0, 1, 8] = 0.9  # tie with (2, 6): the first in row-major order wins
    probs[0, 7, 2] = 0.6
    probs[1, 5, 5] = 0.7
    return onehot, probs


@pytest.mark.parametrize("impl", IMPLS)
def test_boxes_points_scores_of_hand_made_masks(impl: str) -> None:
    onehot, probs = _hand_made()
    regions = split_regions(onehot, probs, split_last=True, min_area=1, coarse_thresh=0.0, impl=impl)
    by_class = regions.by_class()
    assert sorted(by_class) == [0, 1]
    l_shape = np.zeros((8, 10), dtype=np.uint8)
    l_shape[1, 6:9] = l_shape[2:4, 6] = l_shape[4, 5] = 1
    square = np.zeros((8, 10), dtype=np.uint8)
    square[6:8, 1:3] = 1
    assert np.array_equal(by_class[0]["masks"].numpy(), np.stack([l_shape, square]))
    assert by_class[0]["boxes"].tolist() == [[5, 1, 8, 4], [1, 6, 2, 7]]
    assert by_class[0]["points"].tolist() == [[8, 1], [2, 7]]
    expected = [(0.9 * 2 + 0.25 * 4) / 6, (0.25 * 3 + 0.6) / 4]
    torch.testing.assert_close(by_class[0]["scores"], torch.tensor(expected), rtol=0, atol=1e-6)
    assert by_class[1]["boxes"].tolist() == [[1, 2, 1, 2], [3, 5, 8, 5]]
    assert by_class[1]["points"].tolist() == [[1, 2], [5, 5]]
    assert regions.region_map[2, 1] == 2 and regions.region_map[0, 0] == -1


@pytest.mark.parametrize("impl", IMPLS)
def test_regions_are_numbered_in_raster_order_of_first_pixel(impl: str) -> None:
    # Region A starts at row 0, column 9; region B at row 1, column 0 (same 2x2 block row).
    onehot = np.zeros((1, 6, 12), dtype=np.uint8)
    onehot[0, 0:5, 9:11] = 1
    onehot[0, 1:6, 0:2] = 1
    probs = torch.rand(1, 6, 12)
    regions = split_regions(onehot, probs, split_last=True, min_area=1, coarse_thresh=0.0, impl=impl)
    assert regions.boxes.tolist() == [[9, 0, 10, 4], [0, 1, 1, 5]]


@pytest.mark.parametrize("impl", IMPLS)
def test_min_area_drops_small_regions(impl: str) -> None:
    onehot, probs = _hand_made()
    regions = split_regions(onehot, probs, split_last=True, min_area=5, coarse_thresh=0.0, impl=impl)
    assert regions.class_ids.tolist() == [0, 1]  # the L (6 px) and the bar (6 px)
    assert regions.boxes.tolist() == [[5, 1, 8, 4], [3, 5, 8, 5]]


def test_bad_inputs_raise() -> None:
    onehot, probs = _hand_made()
    with pytest.raises(S2ClipError, match="do not match"):
        split_regions(onehot, probs[:, :4], split_last=True, min_area=0, coarse_thresh=0.0)
    with pytest.raises(S2ClipError, match="unknown implementation"):
        split_regions(onehot, probs, split_last=True, min_area=0, coarse_thresh=0.0, impl="fast")
    overlapping = onehot.copy()
    overlapping[1, 1, 6] = 1
    with pytest.raises(S2ClipError, match="more than one class"):
        split_regions(overlapping, probs, split_last=True, min_area=0, coarse_thresh=0.0)
