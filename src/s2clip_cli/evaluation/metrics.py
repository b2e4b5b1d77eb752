"""Confusion matrices and the metrics MMSegmentation's ``IoUMetric`` reports from them.

With ``conf[g, p]`` = number of pixels of ground-truth class ``g`` predicted as ``p``:

* intersect = diag(conf), area_label = row sums, area_pred = column sums,
  union = area_label + area_pred - intersect;
* IoU = intersect / union (NaN when the union is empty: the class is neither present nor predicted);
* Acc = intersect / area_label (NaN when the class has no ground-truth pixel);
* aAcc = sum(intersect) / sum(area_label);
* mIoU / mAcc = the mean over the classes whose value is not NaN (``np.nanmean``).

All values are in percent, unrounded (MMSegmentation prints them rounded to 2 decimals). A class
predicted but absent from the ground truth has IoU 0 (it counts in mIoU) and Acc NaN, as in mmseg.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..data.class_names import display_names
from ..errors import S2ClipError


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """``[K, K]`` int64 counts, rows = ground truth, columns = prediction.

    Pixels whose ground truth is ``ignore_index`` — or outside ``0..K-1``, which mmseg's histograms
    drop too — are not counted. ``pred`` and ``gt`` must have the same shape (``S2ClipError``);
    a prediction outside ``0..K-1`` on a counted pixel is a ``ValueError``.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise S2ClipError(f"prediction shape {pred.shape} differs from the label's {gt.shape}")
    k = int(num_classes)
    gt = gt.reshape(-1).astype(np.int64, copy=False)
    pred = pred.reshape(-1).astype(np.int64, copy=False)
    keep = (gt != ignore_index) & (gt >= 0) & (gt < k)
    gt, pred = gt[keep], pred[keep]
    if pred.size and (pred.min() < 0 or pred.max() >= k):
        bad = pred[(pred < 0) | (pred >= k)][0]
        raise ValueError(f"prediction holds class index {int(bad)} outside 0..{k - 1}")
    return np.bincount(gt * k + pred, minlength=k * k).reshape(k, k).astype(np.int64, copy=False)


def per_class(conf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU and Acc as fractions (NaN where undefined, see the module docstring)."""
    conf = np.asarray(conf, dtype=np.float64)
    intersect = np.diag(conf)
    area_label = conf.sum(axis=1)
    union = area_label + conf.sum(axis=0) - intersect
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, intersect / union, np.nan)
        acc = np.where(area_label > 0, intersect / area_label, np.nan)
    return iou, acc


def _pct(values: np.ndarray) -> float | None:
    """Mean of the non-NaN values in percent; None when every value is NaN."""
    finite = values[~np.isnan(values)]
    return float(finite.mean() * 100.0) if finite.size else None


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def summarize(conf: np.ndarray, class_names: Sequence[str] | Sequence[Sequence[str]]) -> dict:
    """mIoU, mAcc, aAcc (percent) and per-class ``IoU`` / ``Acc`` dicts keyed by class name.

    JSON-friendly: an undefined value (NaN: empty union / no ground-truth pixel, or a mean over no
    class, or aAcc with no counted pixel) is ``None``. A class given as a list of names is keyed by
    its first name; repeated keys get a ``#index`` suffix. Also ``num_pixels`` (counted pixels).
    """
    conf = np.asarray(conf)
    k = conf.shape[0]
    if conf.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"confusion matrix {conf.shape} does not match {len(class_names)} class names")
    names = display_names([[n] if isinstance(n, str) else list(n) for n in class_names])
    iou, acc = per_class(conf)
    total = int(conf.sum())
    return {
        "mIoU": _pct(iou),
        "mAcc": _pct(acc),
        "aAcc": float(np.trace(conf) / total * 100.0) if total else None,
        "IoU": {name: _json_float(v * 100.0) for name, v in zip(names, iou, strict=True)},
        "Acc": {name: _json_float(v * 100.0) for name, v in zip(names, acc, strict=True)},
        "num_pixels": total,
    }
