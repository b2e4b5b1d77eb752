"""The optimized SAM refinement (Algorithms 3–4 and better): the orchestration.

Same labels as `sam_original` and, to float tolerance, the same probabilities; how it gets there:

- regions come from one vectorised pass (`components.split_label_map`);
- every prompt transform and all sparse embeddings are computed once for all regions, each
  class's dense (mask) embedding once per class;
- the prompts of all classes run through SAM's mask decoder in bounded chunks that span classes
  (`sam_decoder`: SAM's own `MaskDecoder` by default, the hand-folded `FastDecoder` on request);
  the chunk size comes from the image size and the decoder's working set (`_chunk_size`);
- masks are upscaled (`postprocess_masks`) only for prompts whose predicted IoU passes, once,
  and folded straight into the per-class maxima (`_MapState`), so memory does not grow with the
  number of regions.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from torch import Tensor

from ..profiling import StageTimer
from .components import Regions, split_label_map
from .sam_decoder import ClassBatchDecoder, class_dense_embeddings, make_decoder
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


def refine_optimized(image: np.ndarray, labels: Tensor, probs: Tensor, num_classes: int,
                     predictor: SamPredictor, opts: RefineOptions, stages: StageTimer,
                     decoder: str = "fast") -> RefineResult:
    """The optimized refinement on validated inputs (see `sam_refine.sam_refine`), prompts decoded
    by the `decoder` named (`sam_decoder.DECODERS`)."""
    image_hw = (image.shape[0], image.shape[1])
    device = probs.device
    with stages("downsample"):
        coarse = prepare_coarse(labels, probs, num_classes, opts.coarse_thresh)
    with stages("components"):
        regions = split_label_map(coarse.labels[0].cpu().numpy(), coarse.n_channels, coarse.probs,
                                  split_last=coarse.split_last, min_area=opts.min_area,
                                  coarse_thresh=opts.coarse_thresh, use_cca=opts.use_cca)
    if len(regions) == 0:
        return unchanged(labels, probs)
    with stages("prompts"):
        prompts = _build_prompts(regions, coarse.probs, image_hw, coarse.down_hw, predictor, opts)
    batch_decoder = make_decoder(decoder, predictor.model, predictor.features.float())
    state = _MapState(probs)
    for chunk in _chunks(prompts.class_ids.numel(), _chunk_size(device, image_hw)):
        _refine_chunk(chunk, prompts, batch_decoder, predictor, image_hw, opts, state, stages)
    if not state.passed_classes:
        return unchanged(labels, probs)
    with stages("mapping"):
        refined_labels, refined_probs = state.finish(labels)
        failed_idx = torch.cat(state.failed) if state.failed else torch.zeros(0, dtype=torch.long)
        if failed_idx.numel():
            failed_down = torch.from_numpy(np.isin(regions.region_map, failed_idx.numpy()))[None]
            # The reference follows this merge with a label update where max(failed * probs)
            # exceeds max(merged probs); the merge is an elementwise max with failed * probs, so
            # that comparison is always false and the labels never change: skipped here.
            refined_probs = _merge_failed(refined_probs, failed_down.to(device), probs)
    passed = torch.cat(state.passed)
    scores = torch.cat(state.scores).float()
    return RefineResult(refined_labels, refined_probs, scores, regions.boxes[passed.cpu()] * DOWN_RATIO)


@dataclass
class _Prompts:
    """All regions' prompts in SAM's frame, regions in class order.

    class_ids: ``[N]`` class of each region. sparse: ``[N, T, 256]`` point/box embeddings.
    dense_row: ``{class: row}`` into dense. dense: ``[K, 256, h, w]`` one dense embedding per class
    with regions, or SAM's no-mask embedding ``[1, 256, h, w]`` (row 0 for every class) when the
    mask prompt is off.
    """

    class_ids: Tensor
    sparse: Tensor
    dense_row: dict[int, int]
    dense: Tensor


def _build_prompts(regions: Regions, probs_down: Tensor, image_hw: tuple[int, int], down_hw: list[int],
                   predictor: SamPredictor, opts: RefineOptions) -> _Prompts:
    """Every transform once for all regions; sparse embeddings for all prompts in one call; the
    dense embedding once per class."""
    sam = predictor.model
    boxes_t, points_t = transform_prompts(regions.boxes, regions.points, down_hw, predictor)
    points = (points_t, torch.ones(points_t.shape[:2], device=points_t.device)) if opts.use_point else None
    sparse, _ = sam.prompt_encoder(points=points, boxes=boxes_t if opts.use_box else None, masks=None)
    classes = regions.classes()
    if opts.use_mask:
        dense = class_dense_embeddings(sam, mask_prompts(probs_down[classes], image_hw, predictor, opts))
        dense_row = {c: k for k, c in enumerate(classes)}
    else:
        dense = class_dense_embeddings(sam, None)
        dense_row = dict.fromkeys(classes, 0)
    return _Prompts(regions.class_ids.to(sparse.device), sparse, dense_row, dense)


# Memory for one chunk of prompts: each passing prompt's image-sized logits, their sigmoid and the
# product with the class probabilities (about four float32 maps of H×W), its 256×256 low-res masks,
# and the decoder's working set: about eight float32 copies of SAM's 256×64×64 image embedding
# per prompt (measured on the CPU: ~31 MiB per extra prompt for SAM's MaskDecoder, ~25 for FastDecoder).
CHUNK_BUDGET_CPU = 256 * 2**20
MAX_CHUNK = 64
DECODER_BYTES_PER_PROMPT = 8 * 4 * 256 * 64 * 64


def _chunk_size(device: torch.device, image_hw: tuple[int, int]) -> int:
    """Prompts per decoder chunk, sized from the image: a budget (on CUDA, a quarter of the free
    memory; on the CPU, `CHUNK_BUDGET_CPU`) over one prompt's image-sized maps plus the decoder's
    working set, at most `MAX_CHUNK`. (On the CPU small chunks are also the fast ones: SAM's decoder
    takes ~65 ms per prompt in chunks of 1-4 and ~110 ms in chunks of 16-48, cache-bound.)"""
    per_prompt = 4 * 4 * image_hw[0] * image_hw[1] + 4 * 4 * 256 * 256 + DECODER_BYTES_PER_PROMPT
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        budget = CHUNK_BUDGET_CPU
    return int(min(MAX_CHUNK, max(1, budget // per_prompt)))


def _chunks(n_prompts: int, size: int) -> Iterator[slice]:
    for start in range(0, n_prompts, size):
        yield slice(start, min(start + size, n_prompts))


class _MapState:
    """Per-class running max of sigmoid(logit) · probs and union of masks (step 8, streamed), and
    the flat indices and IoUs of the prompts that passed, and the indices of those that failed."""

    def __init__(self, probs: Tensor) -> None:
        self.probs = probs
        self.value: dict[int, Tensor] = {}
        self.union: dict[int, Tensor] = {}
        self.passed: list[Tensor] = []
        self.scores: list[Tensor] = []
        self.failed: list[Tensor] = []

    @property
    def passed_classes(self) -> list[int]:
        return sorted(self.value)

    def add(self, cls: int, logits: Tensor, mask_threshold: float) -> None:
        """Fold ``[n, 1, H, W]`` image-sized logits of class `cls` into the running maps."""
        value = (logits[:, 0].sigmoid() * self.probs[cls]).max(dim=0).values
        union = (logits[:, 0] > mask_threshold).any(dim=0)
        if cls in self.value:
            value = torch.maximum(self.value[cls], value)
            union = union | self.union[cls]
        self.value[cls], self.union[cls] = value, union

    def finish(self, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Step 8's labels and refined probs; the coarse label where every refined prob is 0."""
        refined = torch.zeros_like(self.probs)
        for cls in self.passed_classes:
            refined[cls] = self.value[cls] * self.union[cls]
        refined_labels = refined.argmax(0, keepdim=True)
        return torch.where(refined.sum(dim=0, keepdim=True) == 0, labels, refined_labels), refined


def _refine_chunk(chunk: slice, prompts: _Prompts, decoder: ClassBatchDecoder, predictor: SamPredictor,
                  image_hw: tuple[int, int], opts: RefineOptions, state: _MapState, stages: StageTimer) -> None:
    """Decode one chunk of prompts; fold the passing masks into `state`, note the failing ones."""
    class_ids = prompts.class_ids[chunk]
    with stages("decode"):
        rows = torch.tensor([prompts.dense_row[c] for c in class_ids.tolist()], device=class_ids.device)
        used, group_of = torch.unique_consecutive(rows, return_inverse=True)
        iou = decoder.decode(prompts.dense[used], group_of, prompts.sparse[chunk])
        passing = iou > opts.iou_thresh
        index = torch.arange(chunk.start, chunk.stop, device=iou.device)
        state.failed.append(index[~passing].cpu())
        if not bool(passing.any()):
            return
        low_res = decoder.low_res_masks(passing)
    with stages("mapping"):
        logits = image_sized_logits(low_res.float(), predictor, image_hw)
        passed_classes = class_ids[passing]
        for cls in torch.unique_consecutive(passed_classes).tolist():
            state.add(cls, logits[passed_classes == cls], predictor.model.mask_threshold)
        state.passed.append(index[passing])
        state.scores.append(iou[passing])


def _merge_failed(refined_probs: Tensor, failed_down: Tensor, probs: Tensor) -> Tensor:
    """Step 9 (probabilities): elementwise max with the coarse probs inside failed regions.

    `failed_down` is the ``[1, h, w]`` union of the failed regions at the downsampled size."""
    failed = F.interpolate(failed_down.unsqueeze(0).float(), list(probs.shape[-2:]), mode="nearest")[0] != 0
    failed_probs = failed * probs
    return torch.where(failed_probs > refined_probs, failed_probs, refined_probs)
