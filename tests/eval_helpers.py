"""A deterministic stand-in model for the evaluation tests (shared with tests/dist_eval_worker.py)."""

from __future__ import annotations

import zlib

import numpy as np

from s2clip_cli.data.datasets import label_colours

CONFIG = {"model": "colour-lookup", "short_side": 448}
NUM_CLASSES = 21


def colour_predict(image: np.ndarray, image_id: str) -> np.ndarray:
    """Nearest VOC colour among the 21 classes, with every third row (offset by the id) shifted by one
    class, so results are neither perfect nor independent of which image is which."""
    colours = label_colours(NUM_CLASSES).astype(np.int32)
    dist = ((image[:, :, None, :].astype(np.int32) - colours[None, None]) ** 2).sum(-1)
    pred = dist.argmin(-1)
    offset = zlib.crc32(image_id.encode()) % 3
    rows = (np.arange(pred.shape[0]) + offset) % 3 == 0
    pred[rows] = (pred[rows] + 1) % NUM_CLASSES
    return pred
