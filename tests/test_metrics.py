"""Confusion matrix and mIoU/mAcc/aAcc against hand-computed values and mmseg's IoUMetric algorithm."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from s2clip_cli.data.datasets import read_label
from s2clip_cli.errors import S2ClipError
from s2clip_cli.evaluation.metrics import confusion_matrix, per_class, summarize


def test_confusion_matrix_by_hand() -> None:
    gt = np.array([[0, 0, 1, 255], [2, 2, 2, 7]])  # 255 ignored; 7 is outside 0..2 and dropped like mmseg
    pred = np.array([[0, 1, 1, 2], [2, 0, 2, 0]])
    conf = confusion_matrix(pred, gt, 3)
    expected = np.array([[1, 1, 0],   # gt 0: predicted 0 once, 1 once
                         [0, 1, 0],   # gt 1: predicted 1
                         [1, 0, 2]])  # gt 2: predicted 2, 0, 2
    assert conf.dtype == np.int64 and conf.shape == (3, 3)
    np.testing.assert_array_equal(conf, expected)
    # another ignore index
    np.testing.assert_array_equal(confusion_matrix(pred, np.where(gt == 255, 1, gt), 3, ignore_index=1).sum(axis=1),
                                  [2, 0, 3])


def test_confusion_matrix_errors() -> None:
    with pytest.raises(S2ClipError, match="shape"):
        confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), 4)
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(np.array([0, 4]), np.array([0, 1]), 4)
    # an out-of-range prediction on an ignored pixel is not counted, hence not an error
    assert confusion_matrix(np.array([0, 9]), np.array([0, 255]), 4).sum() == 1


def test_summarize_by_hand_absent_classes_are_nan_and_excluded() -> None:
    # class 1: never in the ground truth but predicted once -> IoU 0 (counted), Acc NaN (excluded)
    # class 3: neither present nor predicted -> IoU and Acc NaN (excluded)
    conf = np.array([[2, 1, 0, 0],
                     [0, 0, 0, 0],
                     [1, 0, 3, 0],
                     [0, 0, 0, 0]])
    iou, acc = per_class(conf)
    np.testing.assert_allclose(iou[:3], [2 / 4, 0.0, 3 / 4])
    assert math.isnan(iou[3]) and math.isnan(acc[1]) and math.isnan(acc[3])
    out = summarize(conf, ["a", "b", ["c", "c2"], "d"])
    assert out["mIoU"] == pytest.approx((0.5 + 0 + 0.75) / 3 * 100)
    assert out["mAcc"] == pytest.approx((2 / 3 + 3 / 4) / 2 * 100)
    assert out["aAcc"] == pytest.approx(5 / 7 * 100)
    assert out["IoU"] == {"a": 50.0, "b": 0.0, "c": 75.0, "d": None}
    assert out["Acc"]["b"] is None and out["Acc"]["d"] is None and out["Acc"]["c"] == 75.0
    assert out["num_pixels"] == 7
    json.dumps(out, allow_nan=False)  # JSON-friendly: NaN became None


def test_summarize_empty_and_duplicate_names() -> None:
    out = summarize(np.zeros((2, 2), np.int64), ["x", "x"])
    assert out["mIoU"] is None and out["mAcc"] is None and out["aAcc"] is None
    assert list(out["IoU"]) == ["x#0", "x#1"]
    with pytest.raises(ValueError):
        summarize(np.zeros((2, 2)), ["only one"])


def _mmseg_metrics(preds: list[np.ndarray], gts: list[np.ndarray], k: int, ignore: int = 255) -> dict:
    """mmseg IoUMetric.intersect_and_union + compute_metrics, transcribed with torch.histc."""
    tot = [torch.zeros(k, dtype=torch.float64) for _ in range(3)]
    for p, g in zip(preds, gts, strict=True):
        pred, label = torch.from_numpy(p).long(), torch.from_numpy(g).long()
        mask = label != ignore
        pred, label = pred[mask], label[mask]
        inter = pred[pred == label]
        a_i = torch.histc(inter.float(), bins=k, min=0, max=k - 1)
        a_p = torch.histc(pred.float(), bins=k, min=0, max=k - 1)
        a_l = torch.histc(label.float(), bins=k, min=0, max=k - 1)
        for t, v in zip(tot, (a_i, a_p, a_l), strict=True):
            t += v.double()
    inter, a_p, a_l = tot
    union = a_p + a_l - inter
    iou, acc = (inter / union).numpy(), (inter / a_l).numpy()
    return {"aAcc": float(inter.sum() / a_l.sum()) * 100, "mIoU": float(np.nanmean(iou)) * 100,
            "mAcc": float(np.nanmean(acc)) * 100, "IoU": iou * 100, "Acc": acc * 100}


def test_matches_mmseg_iou_metric_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    k = 7
    preds, gts = [], []
    for _ in range(5):
        gt = rng.integers(0, k - 2, size=(20, 30))  # classes 5, 6 never in the ground truth
        gt[rng.random(gt.shape) < 0.1] = 255
        pred = np.where(rng.random(gt.shape) < 0.6, gt, rng.integers(0, k - 1, size=gt.shape))  # 6 never predicted
        pred = np.where(pred == 255, 0, pred)
        preds.append(pred)
        gts.append(gt)
    conf = sum(confusion_matrix(p, g, k) for p, g in zip(preds, gts, strict=True))
    ours, ref = summarize(conf, [str(i) for i in range(k)]), _mmseg_metrics(preds, gts, k)
    for key in ("aAcc", "mIoU", "mAcc"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-9)
    for i in range(k):
        for key in ("IoU", "Acc"):
            v = ours[key][str(i)]
            assert (v is None and math.isnan(ref[key][i])) or v == pytest.approx(ref[key][i])
    assert ours["IoU"]["6"] is None and ours["IoU"]["5"] == 0.0 and ours["Acc"]["5"] is None


def test_reduce_zero_label_then_metrics(tmp_path) -> None:
    raw = np.array([[0, 1, 2], [3, 255, 0]], dtype=np.uint8)  # ADE-style: 0 = "other"
    Image.fromarray(raw).save(tmp_path / "l.png")
    label = read_label(tmp_path / "l.png", reduce_zero_label=True)
    np.testing.assert_array_equal(label, [[255, 0, 1], [2, 255, 255]])
    np.testing.assert_array_equal(read_label(tmp_path / "l.png", reduce_zero_label=False), raw)
    pred = np.array([[2, 0, 0], [2, 1, 1]])
    conf = confusion_matrix(pred, label, 3)
    np.testing.assert_array_equal(conf, [[1, 0, 0], [1, 0, 0], [0, 0, 1]])
    out = summarize(conf, ["a", "b", "c"])
    assert out["IoU"] == {"a": 50.0, "b": 0.0, "c": 100.0} and out["aAcc"] == pytest.approx(200 / 3)
