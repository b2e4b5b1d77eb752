"""What both SAM refinements share: their options and result, and the steps of Trident's
`sam_refinement` that turn a coarse segmentation into SAM prompts and SAM's masks back into
image-sized logits (the notes, "Trident's SAM refinement, in order", steps 1, 2, 4 and 7).

Both `sam_original` and `sam_optimized` call these, so the two implementations cannot drift apart
on the prompts SAM sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from torch import Tensor

DOWN_RATIO = 2
MASK_PROMPT_SIZE = 256


@dataclass
class RefineResult:
    """Refined segmentation.

    labels: ``[1, H, W]`` long. probs: ``[C, H, W]`` refined class probabilities.
    scores: ``[P]`` SAM IoU predictions of the P prompts that passed (class order).
    boxes: ``[P, 4]`` their boxes (x1, y1, x2, y2) in image pixels.
    """

    labels: Tensor
    probs: Tensor
    scores: Tensor
    boxes: Tensor


def unchanged(labels: Tensor, probs: Tensor) -> RefineResult:
    """The result when no prompt passed (or there was none): the inputs, no scores, no boxes."""
    return RefineResult(labels, probs, torch.zeros(0, device=probs.device), torch.zeros(0, 4))


@dataclass(frozen=True)
class RefineOptions:
    """The thresholds and ablation switches of one refinement (see `sam_refine.sam_refine`)."""

    coarse_thresh: float
    min_area: int
    mask_coeff: float
    iou_thresh: float
    use_cca: bool
    use_box: bool
    use_mask: bool
    use_point: bool


@dataclass(frozen=True)
class CoarseMaps:
    """Steps 1–2: the coarse maps at half resolution.

    labels: ``[1, h, w]`` long, with the extra class C where the max probability is below the
    coarse threshold (when it is > 0). probs: ``[C, h, w]``. down_hw: ``[h, w]``.
    n_channels: C + 1 with the extra class, else C. split_last: whether the last channel is split.
    """

    labels: Tensor
    probs: Tensor
    down_hw: list[int]
    n_channels: int
    split_last: bool


def prepare_coarse(labels: Tensor, probs: Tensor, num_classes: int, coarse_thresh: float) -> CoarseMaps:
    """Steps 1–2. Labels are downsampled by nearest through float16 (as the reference), probs by
    bilinear interpolation; below-threshold pixels become the extra class C."""
    size = [probs.shape[-2] // DOWN_RATIO, probs.shape[-1] // DOWN_RATIO]
    labels_down = F.interpolate(labels.unsqueeze(0).half(), size, mode="nearest").squeeze(0).long()
    probs_down = F.interpolate(probs.unsqueeze(0), size, mode="bilinear", align_corners=False).squeeze(0)
    if coarse_thresh > 0:
        labels_down[probs_down.max(0, keepdim=True)[0] < coarse_thresh] = num_classes
        return CoarseMaps(labels_down, probs_down, size, num_classes + 1, False)
    return CoarseMaps(labels_down, probs_down, size, num_classes, True)


def mask_prompts(probs_down: Tensor, image_hw: tuple[int, int], predictor: SamPredictor,
                 opts: RefineOptions) -> Tensor:
    """Step 4's mask prompt for each channel of `probs_down` ``[K, h, w]`` -> ``[K, 256, 256]``:
    resized to the 256-longer-side shape of the image, zero-padded, ``mask_coeff · p`` where
    ``p > coarse_thresh`` else 0."""
    new_h, new_w = predictor.transform.get_preprocess_shape(image_hw[0], image_hw[1], MASK_PROMPT_SIZE)
    resized = F.interpolate(probs_down.unsqueeze(0), [new_h, new_w], mode="bilinear", align_corners=False)
    padded = F.pad(resized.squeeze(0), (0, MASK_PROMPT_SIZE - new_w, 0, MASK_PROMPT_SIZE - new_h), value=0)
    zero = torch.tensor(0.0, device=padded.device)
    return torch.where(padded > opts.coarse_thresh, opts.mask_coeff * padded, zero).float()


def transform_prompts(boxes: Tensor, points: Tensor, down_hw: list[int],
                      predictor: SamPredictor) -> tuple[Tensor, Tensor]:
    """Boxes ``[R, 4]`` and points ``[R, 2]`` from the downsampled frame to SAM's input frame:
    float32 boxes ``[R, 4]`` and points ``[R, 1, 2]``."""
    device = predictor.device
    boxes_t = predictor.transform.apply_boxes_torch(boxes.long().to(device), down_hw).float()
    points_t = predictor.transform.apply_coords_torch(points.long().to(device), down_hw).unsqueeze(1)
    return boxes_t, points_t.float()


def image_sized_logits(low_res: Tensor, predictor: SamPredictor, image_hw: tuple[int, int]) -> Tensor:
    """Step 7: SAM's `postprocess_masks` of ``[n, 1, 256, 256]`` low-res logits to the predictor's
    original size, resized again (bilinear) if the image's size differs -> ``[n, 1, H, W]``."""
    logits = predictor.model.postprocess_masks(low_res, predictor.input_size, predictor.original_size)
    if tuple(logits.shape[-2:]) != tuple(image_hw):
        logits = F.interpolate(logits, list(image_hw), mode="bilinear", align_corners=False)
    return logits
