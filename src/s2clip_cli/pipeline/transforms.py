"""Image transforms of the evaluation protocol: mmseg's keep-ratio resize."""

from __future__ import annotations

import cv2
import numpy as np


def rescale_size(h: int, w: int, short_side: int, max_long: int = 2048) -> tuple[int, int]:
    """``(new_h, new_w)`` of mmseg's ``Resize(scale=(max_long, short_side), keep_ratio=True)``.

    As ``mmcv.rescale_size``: ``f = min(long_edge / max(h, w), short_edge / min(h, w))`` where the
    edges are the larger and smaller of the two scale values, and each side becomes
    ``int(side * f + 0.5)`` (clamped to at least 1).
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    if short_side <= 0 or max_long <= 0:
        raise ValueError(f"resize scale must be positive, got short {short_side}, long {max_long}")
    long_edge, short_edge = max(max_long, short_side), min(max_long, short_side)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


def resize_short_side(image: np.ndarray, short_side: int, max_long: int = 2048) -> np.ndarray:
    """Resize as mmseg's test pipeline: short side to ``short_side`` unless that would push the
    long side past ``max_long`` (see :func:`rescale_size`), bilinear (``cv2.INTER_LINEAR``).

    Returns the input array itself when the size does not change.
    """
    if image.ndim not in (2, 3) or 0 in image.shape[:2]:
        raise ValueError(f"expected a non-empty H x W (x C) image, got shape {image.shape}")
    h, w = image.shape[:2]
    new_h, new_w = rescale_size(h, w, short_side, max_long)
    if (new_h, new_w) == (h, w):
        return image
    return cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
