"""The reference SAM refinement (Trident's `seg_utils/utils.py::sam_refinement`), step for step.

This is the transcription the optimized implementation is checked against (and that the
benchmark times as ``original``, Algorithm 2): per class, skimage connected components with a
Python loop per region (`components.split_regions(impl="original")`), one `predict_torch` call
with all that class's regions, the masks of all classes upscaled together, then the reference's
`map_refinement_coarse` and `map_failed_regions`. Its quirks are kept on purpose:

- each class's mask prompt goes to SAM as a 3-D ``[1, 256, 256]`` tensor, so the prompt
  encoder's `LayerNorm2d` normalises over the wrong axis;
- the predictor's image embedding is converted to float32 in place (`predictor.features`);
- the label update that follows the failed-region merge compares after the merge and never fires.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from torch import Tensor

from ..profiling import StageTimer
from .components import split_regions
from .sam_prompts import (
    DOWN_RATIO,
    RefineOptions,
    RefineResult,
    image_sized_logits,
    mask_prompts,
    prepare_coarse,
    transform_prompts,
    unchanged,
)


def refine_original(image: np.ndarray, labels: Tensor, probs: Tensor, num_classes: int,
                    predictor: SamPredictor, opts: RefineOptions, stages: StageTimer) -> RefineResult:
    """The reference `sam_refinement` on validated inputs (see `sam_refine.sam_refine`)."""
    image_hw = (image.shape[0], image.shape[1])
    with stages("downsample"):
        coarse = prepare_coarse(labels, probs, num_classes, opts.coarse_thresh)
    with stages("components"):
        onehot = F.one_hot(coarse.labels.squeeze(0), num_classes=coarse.n_channels).permute(2, 0, 1).float()
        regions = split_regions(onehot.cpu().numpy(), coarse.probs, split_last=coarse.split_last,
                                min_area=opts.min_area, coarse_thresh=opts.coarse_thresh, impl="original",
                                use_cca=opts.use_cca)
    predictor.features = predictor.features.float()
    kept_logits, kept_scores, kept_boxes, kept_counts, failed = [], [], [], [], []
    for i in range(num_classes):
        idx = regions.indices(i)
        if idx.numel() == 0:
            continue
        with stages("prompts"):
            region_masks = regions.masks(i)
            mask_prompt = mask_prompts(coarse.probs[i:i + 1], image_hw, predictor, opts)  # [1, 256, 256]
            boxes_t, points_t = transform_prompts(regions.boxes[idx], regions.points[idx], coarse.down_hw,
                                                  predictor)
        with stages("decode"):
            _, iou, low_res = predictor.predict_torch(
                point_coords=points_t if opts.use_point else None,
                point_labels=torch.ones(points_t.shape[:2], device=points_t.device) if opts.use_point else None,
                boxes=boxes_t if opts.use_box else None,
                mask_input=mask_prompt if opts.use_mask else None,
                multimask_output=False,
            )
        valid = (iou > opts.iou_thresh).squeeze(-1).cpu()
        if valid.sum() != idx.numel():
            failed.append(region_masks[~valid])
        if valid.sum() == 0:
            continue
        kept_logits.append(low_res[valid])
        kept_scores.append(iou[valid])
        kept_boxes.append(regions.boxes[idx][valid])
        kept_counts.append((i, int(valid.sum())))
    if not kept_counts:
        return unchanged(labels, probs)
    with stages("mapping"):
        logits = image_sized_logits(torch.cat(kept_logits), predictor, image_hw)
        masks = logits > predictor.model.mask_threshold
        refined_labels, refined_probs = _map_refinement(masks, logits.sigmoid(), kept_counts, probs)
        refined_labels = torch.where(refined_probs.sum(dim=0, keepdim=True) == 0, labels, refined_labels)
        if failed:
            refined_labels, refined_probs = _map_failed(refined_labels, refined_probs, torch.cat(failed), probs,
                                                        labels)
    scores = torch.cat(kept_scores).flatten()
    boxes = torch.cat(kept_boxes) * DOWN_RATIO
    return RefineResult(refined_labels, refined_probs, scores, boxes)


def _map_refinement(masks: Tensor, mask_probs: Tensor, counts: list[tuple[int, int]],
                    probs: Tensor) -> tuple[Tensor, Tensor]:
    """Step 8 (reference `map_refinement_coarse`): per class, union of its masks times the max
    over its regions of sigmoid(logit) · probs[class]; labels = argmax."""
    refined = torch.zeros_like(probs)
    start = 0
    for cls, n in counts:
        union = masks[start:start + n, 0].sum(dim=0).bool()
        value = (mask_probs[start:start + n, 0] * probs[cls]).max(dim=0).values
        refined[cls] = value * union
        start += n
    return refined.argmax(0, keepdim=True), refined


def _map_failed(refined_labels: Tensor, refined_probs: Tensor, failed: Tensor, probs: Tensor,
                labels: Tensor) -> tuple[Tensor, Tensor]:
    """Step 9 as the reference does it (`map_failed_regions`), on the ``[F, h, w]`` failed masks."""
    failed = F.interpolate(failed.to(probs.device).unsqueeze(0).float(), list(probs.shape[-2:]),
                           mode="nearest").squeeze(0).type_as(labels)
    failed_probs = (failed.sum(dim=0, keepdim=True) != 0) * probs
    merged = torch.where(failed_probs > refined_probs, failed_probs, refined_probs)
    # Compared after the merge, so never true: the labels are left as they are (reference quirk).
    never = failed_probs.max(dim=0, keepdim=True)[0] > merged.max(dim=0, keepdim=True)[0]
    return torch.where(never, labels, refined_labels), merged
