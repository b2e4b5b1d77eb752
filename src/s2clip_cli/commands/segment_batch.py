"""`segment --batch N`: the windows of several images through the backbones in one forward pass.

`segment_many` gives the same labels as calling the `Segmenter` on each image (the windows are cut,
padded and stitched exactly as `Segmenter.predict_logits` does; only the forward passes hold
windows of several images). Windows are grouped by their padded size — images smaller than the
crop, or of other sizes, share a pass only with windows of the same size ("where sizes allow").
Heads that work on the whole image (Trident's, whose proxy mean runs over its batch of windows) run
image by image. Everything after the features (PAMR, classification, SD, SAM) runs per image, as
`Segmenter.finish` does for `Segmenter.__call__`.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..pipeline.segmenter import SegmentationResult, Segmenter, check_image
from ..pipeline.windows import Stitcher, WindowBatch
from ..profiling import StageTimer


def _batched_logits(seg: Segmenter, images: list[np.ndarray], timers: list[StageTimer],
                    shared: StageTimer) -> list[Tensor]:
    """Stitched per-name maps ``[Q, h, w]`` of each image (`Segmenter.predict_logits`), the windows
    of equal size of all images run through `Segmenter.window_logits` together."""
    logits: list[Tensor | None] = [None] * len(images)
    stitchers: dict[int, Stitcher] = {}
    groups: dict[tuple, list[tuple[int, WindowBatch]]] = defaultdict(list)
    for i, image in enumerate(images):
        with timers[i]("prepare"):
            x = seg.prepare(image)
        whole = seg.head.image_logits(x, image, timers[i])
        if whole is not None:
            logits[i] = whole
            continue
        h, w = x.shape[-2:]
        stitchers[i] = Stitcher(len(seg.queries.names), h, w, device=seg.device)
        for batch in seg.windows(x):
            groups[(tuple(batch.crops.shape[-2:]), batch.offset)].append((i, batch))
    per_pass = len(images)  # window batches (each at most window_batch windows) per forward pass
    for members in groups.values():
        for start in range(0, len(members), per_pass):
            chunk = members[start:start + per_pass]
            crops = torch.cat([batch.crops for _, batch in chunk])
            out = seg.window_logits(crops, shared)
            with shared("stitch"):
                out = F.interpolate(out, size=crops.shape[-2:], mode="bilinear", align_corners=False)
                offset = 0
                for i, batch in chunk:
                    count = len(batch.boxes)
                    full = batch.unpad(out[offset:offset + count])
                    offset += count
                    for box, values in zip(batch.boxes, full, strict=True):
                        stitchers[i].add(box, values)
    for i, stitcher in stitchers.items():
        with timers[i]("stitch"):
            logits[i] = stitcher.result()
    return [t for t in logits if t is not None]


def segment_many(seg: Segmenter, images: list[np.ndarray]) -> list[SegmentationResult]:
    """Segment `images` (H×W×3 uint8 RGB each) with their windows batched across images; the same
    labels as ``[seg(image) for image in images]``. A stage run for all images together is timed
    once and its time shared equally among them."""
    if len(images) <= 1:
        return [seg(image) for image in images]
    for image in images:
        check_image(image)
    timers = [seg.timer() for _ in images]
    shared = seg.timer()
    with torch.no_grad():
        logits = _batched_logits(seg, images, timers, shared)
        results = [seg.finish(image, maps, timer) for image, maps, timer in zip(images, logits, timers, strict=True)]
    for result in results:
        for stage, seconds in shared.times.items():
            result.timings[stage] = result.timings.get(stage, 0.0) + seconds / len(images)
    return results
