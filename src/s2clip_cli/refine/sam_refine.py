"""SAM refinement of a coarse segmentation (Trident's `sam_refinement`): the public entry.

`sam_refine` validates its inputs and runs one of two implementations with the same output:

- ``original`` (`sam_original`): the reference, step for step, quirks included;
- ``optimized`` (`sam_optimized`, the default): vectorised regions and prompts, prompts of all
  classes decoded in bounded chunks by a batched decoder (`sam_decoder`): a hand-folded
  rearrangement of SAM's mask decoder (``decoder="fast"``, the default: 2.3–3.9× faster than SAM's
  own on the CPU, `benchmarks/bench_sam.py`) or SAM's own `MaskDecoder` with per-prompt dense
  embeddings (``decoder="sam"``, the plain-library reference; both equal `predict_torch`).

Prompt decoding runs in float32 whatever the caller's autocast.
"""

from __future__ import annotations

import numpy as np
import torch
from segment_anything import SamPredictor
from torch import Tensor

from ..errors import S2ClipError
from ..models.precision import full_precision
from ..profiling import StageTimer
from .components import IMPLS
from .sam_decoder import DECODERS
from .sam_optimized import refine_optimized
from .sam_original import refine_original
from .sam_prompts import DOWN_RATIO, RefineOptions, RefineResult

__all__ = ["DECODERS", "STAGES", "RefineResult", "sam_refine"]

STAGES = ("downsample", "components", "prompts", "decode", "mapping")


def sam_refine(image: np.ndarray, labels: Tensor, probs: Tensor, num_classes: int, predictor: SamPredictor,
               *, coarse_thresh: float = 0.2, min_area: int = 225, mask_coeff: float = 0.005,
               iou_thresh: float = 0.8, impl: str = "optimized", use_cca: bool = True, use_box: bool = True,
               use_mask: bool = True, use_point: bool = True, decoder: str = "fast",
               timings: dict[str, float] | None = None) -> RefineResult:
    """Refine `labels` ``[1, H, W]`` / `probs` ``[C, H, W]`` of `image` (H×W×3 uint8) with SAM.

    `predictor` must already hold the image's embedding (`set_image`). `use_cca`, `use_box`,
    `use_mask` and `use_point` switch off connected-component splitting (one region per class)
    and the box, mask and point prompts (at least one of box and point is needed). `decoder`
    picks the optimized implementation's prompt decoder (`DECODERS`; the original always calls
    `predict_torch`). When `timings` is a dict, seconds per stage (`STAGES`) are added to it.
    """
    _validate(image, labels, probs, num_classes, predictor, impl, decoder, use_box, use_point)
    opts = RefineOptions(coarse_thresh, min_area, mask_coeff, iou_thresh, use_cca, use_box, use_mask, use_point)
    stages = _stages(timings, probs.device)
    # Prompt decoding in float32 whatever the caller's autocast: SAM's mask logits are thresholded
    # at 0 and its IoU predictions at `iou_thresh`, both sensitive to rounding.
    with torch.no_grad(), full_precision(probs.device):
        if impl == "original":
            return refine_original(image, labels, probs, num_classes, predictor, opts, stages)
        return refine_optimized(image, labels, probs, num_classes, predictor, opts, stages, decoder)


def _stages(timings: dict[str, float] | None, device: torch.device) -> StageTimer:
    """A stage timer adding into `timings` (every stage listed, from 0), a no-op when it is None."""
    if timings is not None:
        for name in STAGES:
            timings.setdefault(name, 0.0)
    return StageTimer(device, enabled=timings is not None, times=timings)


def _validate(image: np.ndarray, labels: Tensor, probs: Tensor, num_classes: int, predictor: SamPredictor,
              impl: str, decoder: str, use_box: bool, use_point: bool) -> None:
    if impl not in IMPLS:
        raise S2ClipError(f"unknown SAM refinement implementation {impl!r}: use one of {', '.join(IMPLS)}")
    if decoder not in DECODERS:
        raise S2ClipError(f"unknown SAM prompt decoder {decoder!r}: use one of {', '.join(DECODERS)}")
    if not (use_box or use_point):
        raise S2ClipError("SAM refinement needs box or point prompts: use_box and use_point are both off")
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise S2ClipError(f"expected an HxWx3 image, got {getattr(image, 'shape', type(image))}")
    if probs.ndim != 3 or probs.shape[0] != num_classes:
        raise S2ClipError(f"expected probabilities of shape [{num_classes}, H, W], got {tuple(probs.shape)}")
    if labels.ndim != 3 or labels.shape[0] != 1:
        raise S2ClipError(f"expected labels of shape [1, H, W], got {tuple(labels.shape)}")
    if tuple(labels.shape[1:]) != tuple(probs.shape[1:]) or tuple(probs.shape[1:]) != image.shape[:2]:
        raise S2ClipError(f"image {image.shape[:2]}, labels {tuple(labels.shape[1:])} and probabilities "
                          f"{tuple(probs.shape[1:])} must have the same height and width")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise S2ClipError(f"labels must lie in [0, {num_classes}), got values in "
                          f"[{int(labels.min())}, {int(labels.max())}]")
    if min(image.shape[:2]) < DOWN_RATIO:
        raise S2ClipError(f"image {image.shape[:2]} is too small to refine")
    if not getattr(predictor, "is_image_set", False) or predictor.features is None:
        raise S2ClipError("the SAM predictor has no image set: call predictor.set_image(image) first")
