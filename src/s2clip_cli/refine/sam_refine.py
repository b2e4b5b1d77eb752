"""SAM refinement of a coarse segmentation (Trident's `sam_refinement`), two implementations.

``original`` reproduces the reference step for step (see the notes, "Trident's SAM refinement,
in order"), quirks included: each class's mask prompt is handed to SAM as a 3-D ``[1, 256, 256]``
tensor, so the prompt encoder's `LayerNorm2d` normalises over the wrong axis; and the label
update that follows the failed-region merge never fires.

``optimized`` (Algorithm 4 and better) gives the same labels and, to float tolerance, the same
probabilities:

- regions come from one vectorised pass (`components.split_label_map`);
- every prompt transform is computed once for all regions;
- the prompts of all classes run through SAM's mask decoder in bounded chunks, driven by
  `_BatchedDecoder`, which computes what depends only on the class (image embedding + the
  class's dense mask embedding, and the first transformer layer's projections of it) once per
  class instead of once per prompt;
- masks are upscaled (decoder output upscaling and `postprocess_masks`) only for prompts whose
  predicted IoU passes, once, and folded straight into the per-class maxima, so memory does not
  grow with the number of regions;
- the decoder runs in float32 (its outputs are thresholded), under any caller's autocast.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from torch import Tensor

from ..errors import S2ClipError
from ..models.precision import full_precision
from ..profiling import StageTimer
from .components import IMPLS, Regions, split_label_map, split_regions

DOWN_RATIO = 2
MASK_PROMPT_SIZE = 256
STAGES = ("downsample", "components", "prompts", "decode", "mapping")


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


def _stages(timings: dict[str, float] | None, device: torch.device) -> StageTimer:
    """A stage timer adding into `timings` (every stage listed, from 0), a no-op when it is None."""
    if timings is not None:
        for name in STAGES:
            timings.setdefault(name, 0.0)
    return StageTimer(device, enabled=timings is not None, times=timings)


@dataclass(frozen=True)
class _Options:
    coarse_thresh: float
    min_area: int
    mask_coeff: float
    iou_thresh: float
    use_cca: bool
    use_box: bool
    use_mask: bool
    use_point: bool


def sam_refine(image: np.ndarray, labels: Tensor, probs: Tensor, num_classes: int, predictor: SamPredictor,
               *, coarse_thresh: float = 0.2, min_area: int = 225, mask_coeff: float = 0.005,
               iou_thresh: float = 0.8, impl: str = "optimized", use_cca: bool = True, use_box: bool = True,
               use_mask: bool = True, use_point: bool = True,
               timings: dict[str, float] | None = None) -> RefineResult:
    """Refine `labels` ``[1, H, W]`` / `probs` ``[C, H, W]`` of `image` (H×W×3 uint8) with SAM.

    `predictor` must already hold the image's embedding (`set_image`). `use_cca`, `use_box`,
    `use_mask` and `use_point` switch off connected-component splitting (one region per class)
    and the box, mask and point prompts (at least one of box and point is needed). When
    `timings` is a dict, seconds per stage (downsample, components, prompts, decode, mapping) are
    added to it.
    """
    _validate(image, labels, probs, num_classes, predictor, impl, use_box, use_point)
    opts = _Options(coarse_thresh, min_area, mask_coeff, iou_thresh, use_cca, use_box, use_mask, use_point)
    stages = _stages(timings, probs.device)
    # Prompt decoding in float32 whatever the caller's autocast: SAM's mask logits are thresholded
    # at 0 and its IoU predictions at `iou_thresh`, both sensitive to rounding.
    with torch.no_grad(), full_precision(probs.device):
        if impl == "original":
            return _refine_original(image, labels, probs, num_classes, predictor, opts, stages)
        return _refine_optimized(image, labels, probs, num_classes, predictor, opts, stages)


def _validate(image: np.ndarray, labels: Tensor, probs: Tensor, num_classes: int, predictor: SamPredictor,
              impl: str, use_box: bool, use_point: bool) -> None:
    if impl not in IMPLS:
        raise S2ClipError(f"unknown SAM refinement implementation {impl!r}: use one of {', '.join(IMPLS)}")
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


# ------------------------------------------------------------------------------ shared steps


def _downsample(labels: Tensor, probs: Tensor) -> tuple[Tensor, Tensor]:
    """Step 1: labels by nearest (through float16, as the reference), probs by bilinear."""
    size = [probs.shape[-2] // DOWN_RATIO, probs.shape[-1] // DOWN_RATIO]
    labels_down = F.interpolate(labels.unsqueeze(0).half(), size, mode="nearest").squeeze(0).long()
    probs_down = F.interpolate(probs.unsqueeze(0), size, mode="bilinear", align_corners=False).squeeze(0)
    return labels_down, probs_down


def _coarse_labels(labels_down: Tensor, probs_down: Tensor, num_classes: int,
                   coarse_thresh: float) -> tuple[Tensor, int, bool]:
    """Step 2: low-confidence pixels become the extra class C. Returns (labels, channels, split_last)."""
    if coarse_thresh > 0:
        labels_down[probs_down.max(0, keepdim=True)[0] < coarse_thresh] = num_classes
        return labels_down, num_classes + 1, False
    return labels_down, num_classes, True


def _mask_prompts(probs_down: Tensor, image_hw: tuple[int, int], predictor: SamPredictor,
                  opts: _Options) -> Tensor:
    """Step 4's dense prompt for each channel of `probs_down` ``[K, h, w]`` -> ``[K, 256, 256]``."""
    new_h, new_w = predictor.transform.get_preprocess_shape(image_hw[0], image_hw[1], MASK_PROMPT_SIZE)
    resized = F.interpolate(probs_down.unsqueeze(0), [new_h, new_w], mode="bilinear", align_corners=False)
    padded = F.pad(resized.squeeze(0), (0, MASK_PROMPT_SIZE - new_w, 0, MASK_PROMPT_SIZE - new_h), value=0)
    zero = torch.tensor(0.0, device=padded.device)
    return torch.where(padded > opts.coarse_thresh, opts.mask_coeff * padded, zero).float()


def _transform_prompts(boxes: Tensor, points: Tensor, down_hw: list[int],
                       predictor: SamPredictor) -> tuple[Tensor, Tensor]:
    """Boxes ``[R, 4]`` and points ``[R, 2]`` from the downsampled frame to SAM's input frame."""
    device = predictor.device
    boxes_t = predictor.transform.apply_boxes_torch(boxes.long().to(device), down_hw).float()
    points_t = predictor.transform.apply_coords_torch(points.long().to(device), down_hw).unsqueeze(1)
    return boxes_t, points_t.float()


def _image_sized_logits(low_res: Tensor, predictor: SamPredictor, image_hw: tuple[int, int]) -> Tensor:
    """Step 7: SAM's postprocess to the predictor's original size, resized again if the image differs."""
    logits = predictor.model.postprocess_masks(low_res, predictor.input_size, predictor.original_size)
    if tuple(logits.shape[-2:]) != tuple(image_hw):
        logits = F.interpolate(logits, list(image_hw), mode="bilinear", align_corners=False)
    return logits


def _merge_failed(refined_probs: Tensor, failed_down: Tensor, probs: Tensor) -> Tensor:
    """Step 9 (probabilities): elementwise max with the coarse probs inside failed regions.

    `failed_down` is the ``[1, h, w]`` union of the failed regions at the downsampled size."""
    failed = F.interpolate(failed_down.unsqueeze(0).float(), list(probs.shape[-2:]), mode="nearest")[0] != 0
    failed_probs = failed * probs
    return torch.where(failed_probs > refined_probs, failed_probs, refined_probs)



def _prepare_coarse(labels: Tensor, probs: Tensor, num_classes: int, coarse_thresh: float
                    ) -> tuple[Tensor, Tensor, list[int], int, bool]:
    """Steps 1–2, shared by both implementations: downsampled labels (with the extra
    below-threshold class) and probs, the downsampled size, the channel count and `split_last`."""
    labels_down, probs_down = _downsample(labels, probs)
    down_hw = [probs_down.shape[-2], probs_down.shape[-1]]
    labels_down, n_channels, split_last = _coarse_labels(labels_down, probs_down, num_classes, coarse_thresh)
    return labels_down, probs_down, down_hw, n_channels, split_last

# ---------------------------------------------------------------------------------- original


def _refine_original(image: np.ndarray, labels: Tensor, probs: Tensor, num_classes: int,
                     predictor: SamPredictor, opts: _Options, stages: StageTimer) -> RefineResult:
    """The reference `sam_refinement`, step for step."""
    image_hw = (image.shape[0], image.shape[1])
    with stages("downsample"):
        labels_down, probs_down, down_hw, n_channels, split_last = _prepare_coarse(
            labels, probs, num_classes, opts.coarse_thresh)
    with stages("components"):
        onehot = F.one_hot(labels_down.squeeze(0), num_classes=n_channels).permute(2, 0, 1).float()
        regions = split_regions(onehot.cpu().numpy(), probs_down, split_last=split_last,
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
            mask_prompt = _mask_prompts(probs_down[i:i + 1], image_hw, predictor, opts)  # [1, 256, 256]
            boxes_t, points_t = _transform_prompts(regions.boxes[idx], regions.points[idx], down_hw, predictor)
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
        return RefineResult(labels, probs, torch.zeros(0, device=probs.device), torch.zeros(0, 4))
    with stages("mapping"):
        logits = _image_sized_logits(torch.cat(kept_logits), predictor, image_hw)
        masks = logits > predictor.model.mask_threshold
        refined_labels, refined_probs = _map_refinement(masks, logits.sigmoid(), kept_counts, probs)
        refined_labels = torch.where(refined_probs.sum(dim=0, keepdim=True) == 0, labels, refined_labels)
        if failed:
            refined_labels, refined_probs = _map_failed_original(refined_labels, refined_probs,
                                                                 torch.cat(failed), probs, labels)
    scores = torch.cat(kept_scores).flatten()
    boxes = torch.cat(kept_boxes) * DOWN_RATIO
    return RefineResult(refined_labels, refined_probs, scores, boxes)


def _map_failed_original(refined_labels: Tensor, refined_probs: Tensor, failed: Tensor, probs: Tensor,
                         labels: Tensor) -> tuple[Tensor, Tensor]:
    """Step 9 as the reference does it (`map_failed_regions`), on the ``[F, h, w]`` failed masks."""
    failed = F.interpolate(failed.to(probs.device).unsqueeze(0).float(), list(probs.shape[-2:]),
                           mode="nearest").squeeze(0).type_as(labels)
    failed_probs = (failed.sum(dim=0, keepdim=True) != 0) * probs
    merged = torch.where(failed_probs > refined_probs, failed_probs, refined_probs)
    # Compared after the merge, so never true: the labels are left as they are (reference quirk).
    never = failed_probs.max(dim=0, keepdim=True)[0] > merged.max(dim=0, keepdim=True)[0]
    return torch.where(never, labels, refined_labels), merged


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


# --------------------------------------------------------------------------------- optimized


def _refine_optimized(image: np.ndarray, labels: Tensor, probs: Tensor, num_classes: int,
                      predictor: SamPredictor, opts: _Options, stages: StageTimer) -> RefineResult:
    image_hw = (image.shape[0], image.shape[1])
    device = probs.device
    with stages("downsample"):
        labels_down, probs_down, down_hw, n_channels, split_last = _prepare_coarse(
            labels, probs, num_classes, opts.coarse_thresh)
    with stages("components"):
        regions = split_label_map(labels_down[0].cpu().numpy(), n_channels, probs_down,
                                  split_last=split_last, min_area=opts.min_area,
                                  coarse_thresh=opts.coarse_thresh, use_cca=opts.use_cca)
    if len(regions) == 0:
        return RefineResult(labels, probs, torch.zeros(0, device=device), torch.zeros(0, 4))
    with stages("prompts"):
        prompts = _build_prompts(regions, probs_down, image_hw, down_hw, predictor, opts)
    decoder = _BatchedDecoder(predictor.model, predictor.features.float())
    state = _MapState(probs)
    for chunk in _chunks(prompts.class_ids, _chunk_size(device, image_hw)):
        _refine_chunk(chunk, prompts, decoder, predictor, image_hw, opts, state, stages)
    if not state.passed_classes:
        return RefineResult(labels, probs, torch.zeros(0, device=device), torch.zeros(0, 4))
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
    """All regions' prompts in SAM's frame, regions in class order."""

    class_ids: Tensor  # [N] class of each region
    sparse: Tensor  # [N, T, 256] point/box embeddings
    mask_prompts: dict[int, Tensor]  # class -> [1, 256, 256] (empty when use_mask is off)


def _build_prompts(regions: Regions, probs_down: Tensor, image_hw: tuple[int, int], down_hw: list[int],
                   predictor: SamPredictor, opts: _Options) -> _Prompts:
    """Every transform once for all regions; sparse embeddings for all prompts in one call."""
    boxes_t, points_t = _transform_prompts(regions.boxes, regions.points, down_hw, predictor)
    points = (points_t, torch.ones(points_t.shape[:2], device=points_t.device)) if opts.use_point else None
    sparse, _ = predictor.model.prompt_encoder(points=points, boxes=boxes_t if opts.use_box else None,
                                               masks=None)
    classes = regions.classes()
    mask_prompts: dict[int, Tensor] = {}
    if opts.use_mask:
        stacked = _mask_prompts(probs_down[classes], image_hw, predictor, opts)
        mask_prompts = {c: stacked[k:k + 1] for k, c in enumerate(classes)}
    return _Prompts(regions.class_ids.to(sparse.device), sparse, mask_prompts)


# Memory for one chunk of prompts at the image's size: each passing prompt's logits, their sigmoid
# and the product with the class probabilities (about four float32 maps of H×W per prompt).
CHUNK_BUDGET_CPU = 256 * 2**20
MAX_CHUNK = 64


def _chunk_size(device: torch.device, image_hw: tuple[int, int]) -> int:
    """Prompts per decoder chunk, sized from the image: a budget (on CUDA, a quarter of the free
    memory; on the CPU, `CHUNK_BUDGET_CPU`) over four float32 H×W maps per prompt, at most 64."""
    per_prompt = 4 * 4 * image_hw[0] * image_hw[1] + 4 * 4 * 256 * 256
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = free // 4
    else:
        budget = CHUNK_BUDGET_CPU
    return int(min(MAX_CHUNK, max(1, budget // per_prompt)))


def _chunks(class_ids: Tensor, size: int) -> Iterator[slice]:
    for start in range(0, class_ids.numel(), size):
        yield slice(start, min(start + size, class_ids.numel()))


class _MapState:
    """Per-class running max of sigmoid(logit) · probs and union of masks (step 8, streamed)."""

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
        refined = torch.zeros_like(self.probs)
        for cls in self.passed_classes:
            refined[cls] = self.value[cls] * self.union[cls]
        refined_labels = refined.argmax(0, keepdim=True)
        return torch.where(refined.sum(dim=0, keepdim=True) == 0, labels, refined_labels), refined


def _refine_chunk(chunk: slice, prompts: _Prompts, decoder: _BatchedDecoder, predictor: SamPredictor,
                  image_hw: tuple[int, int], opts: _Options, state: _MapState, stages: StageTimer) -> None:
    """Decode one chunk of prompts; fold the passing masks into `state`, note the failing ones."""
    class_ids = prompts.class_ids[chunk]
    groups, group_of = torch.unique_consecutive(class_ids, return_inverse=True)
    with stages("decode"):
        if opts.use_mask:
            dense = torch.stack([decoder.dense_from_3d_mask(prompts.mask_prompts[int(c)]) for c in groups])
        else:
            dense = decoder.no_mask_dense()
            group_of = torch.zeros_like(group_of)
        iou, tokens, keys = decoder.run(dense, group_of, prompts.sparse[chunk])
        passing = iou > opts.iou_thresh
        index = torch.arange(chunk.start, chunk.stop, device=iou.device)
        state.failed.append(index[~passing].cpu())
        if not bool(passing.any()):
            return
        if bool(passing.all()):  # no copy of the image tokens when every prompt passed
            low_res = decoder.masks(tokens, keys)
        else:
            low_res = decoder.masks(tokens[passing], keys[passing])
    with stages("mapping"):
        logits = _image_sized_logits(low_res.float(), predictor, image_hw)
        passed_classes = class_ids[passing]
        for cls in torch.unique_consecutive(passed_classes).tolist():
            state.add(cls, logits[passed_classes == cls], predictor.model.mask_threshold)
        state.passed.append(index[passing])
        state.scores.append(iou[passing])


class _BatchedDecoder:
    """SAM's mask decoder (single-mask output) for many prompts of several classes at once.

    The same modules and weights as `MaskDecoder.predict_masks` + `TwoWayTransformer`, the
    same mathematics, rearranged so that the 4096 image tokens are touched as few times as
    possible (the original spends most of its time in copies and elementwise passes over them):

    - what depends only on the class (image embedding + dense embedding, + positional
      encoding) is formed once per class; the first layer attends to it without a per-prompt copy;
    - attention projections are folded into the few prompt tokens: token→image scores are
      ``(q W_k) · x`` and values ``(softmax · x) W_v``; image→token scores are
      ``x · (W_q^T k)`` and outputs ``softmax · (v W_o^T)``, so no ``[4096, 128]`` projection of
      the image tokens is ever built (softmax rows sum to one, so the value bias carries over);
    - the final attention is computed for the two tokens that are read (IoU and first mask);
    - the output upscaling (two stride-2 transposed convolutions) runs as matrix products in a
      channels-last layout, and only for the prompts that passed, with only the first mask token.

    Results equal SAM's own `predict_torch` to float tolerance (see tests/test_sam_refine.py).
    """

    def __init__(self, sam: Sam, features: Tensor) -> None:
        self.sam = sam
        self.decoder = sam.mask_decoder
        self.transformer = self.decoder.transformer
        self.features = features  # [1, 256, h, w]
        pe = sam.prompt_encoder.get_dense_pe()
        self.image_pe = pe.flatten(2).permute(0, 2, 1)[0]  # [hw, 256]
        self.grid = features.shape[-2:]

    def dense_from_3d_mask(self, mask_prompt: Tensor) -> Tensor:
        """The reference's dense embedding: the ``[1, 256, 256]`` prompt taken as unbatched."""
        return self.sam.prompt_encoder._embed_masks(mask_prompt)  # [256, h, w]

    def no_mask_dense(self) -> Tensor:
        embed = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return embed.expand(1, -1, *self.grid)

    def run(self, dense: Tensor, group_of: Tensor, sparse: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """IoU predictions ``[n]``, the two read output tokens ``[n, 2, 256]`` and the image keys
        ``[n, hw, 256]`` for `sparse` ``[n, T, 256]`` prompts whose dense embedding is
        ``dense[group_of]`` (``dense``: ``[k, 256, h, w]``)."""
        d, t = self.decoder, self.transformer
        output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(sparse.size(0), -1, -1), sparse), dim=1)
        src = (self.features + dense).flatten(2).permute(0, 2, 1)  # [k, hw, 256]
        queries, keys = self._first_layer(tokens, src, group_of)
        for layer in t.layers[1:]:
            queries, keys = self._layer(layer, queries, keys, tokens)
        read = slice(0, 2)  # IoU token, first mask token
        q = queries[:, read] + tokens[:, read]
        attn_out = _token_to_image(t.final_attn_token_to_image, q, keys, key_pe=self.image_pe)
        final = t.norm_final_attn(queries[:, read] + attn_out)
        with torch.autocast(final.device.type, enabled=False):  # pass/fail decided in float32
            iou = d.iou_prediction_head(final[:, 0, :].float())[:, 0]
        return iou, final, keys

    def _first_layer(self, tokens: Tensor, src: Tensor, group_of: Tensor) -> tuple[Tensor, Tensor]:
        """Layer 0 (skip_first_layer_pe), attending to each prompt's class-level image tokens."""
        layer = self.transformer.layers[0]
        queries = layer.norm1(layer.self_attn(q=tokens, k=tokens, v=tokens))
        key_in = src + self.image_pe  # [k, hw, 256]
        spans = _group_spans(group_of)
        attn_out = torch.cat([
            _token_to_image(layer.cross_attn_token_to_image, queries[span] + tokens[span], src[g], key_in[g])
            for g, span in enumerate(spans)])
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + tokens
        keys = src.new_empty(tokens.shape[0], src.shape[1], src.shape[2])
        for g, span in enumerate(spans):
            _image_to_token(layer.cross_attn_image_to_token, key_in[g], q[span], queries[span], src[g],
                            out=keys[span])
        return queries, layer.norm4(keys)

    def _layer(self, layer: torch.nn.Module, queries: Tensor, keys: Tensor,
               query_pe: Tensor) -> tuple[Tensor, Tensor]:
        """`TwoWayAttentionBlock.forward` (with positional encodings) on per-prompt image tokens."""
        q = queries + query_pe
        queries = layer.norm1(queries + layer.self_attn(q=q, k=q, v=queries))
        key_in = keys + self.image_pe
        attn_out = _token_to_image(layer.cross_attn_token_to_image, queries + query_pe, keys, key_in=key_in)
        queries = layer.norm2(queries + attn_out)
        queries = layer.norm3(queries + layer.mlp(queries))
        q = queries + query_pe
        keys = _image_to_token(layer.cross_attn_image_to_token, key_in, q, queries, keys, out=torch.empty_like(keys))
        return queries, layer.norm4(keys)

    def masks(self, final: Tensor, keys: Tensor) -> Tensor:
        """Low-res logits ``[n, 1, 256, 256]`` of the first mask token (`output_upscaling`, then
        the hypernetwork product), channels-last: ConvTranspose2d(k=2, s=2) is a per-pixel matmul."""
        d = self.decoder
        conv1, norm, act1, conv2, act2 = d.output_upscaling
        n, hw, _ = keys.shape
        gh, gw = self.grid
        w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.weight.shape[0], -1)  # [256, (a, b, o)]
        y = torch.addmm(conv1.bias.repeat(4), keys.reshape(n * hw, -1), w1).view(n, hw, 4, -1)
        y = act1(F.layer_norm(y, (y.shape[-1],), norm.weight, norm.bias, norm.eps))
        w2 = conv2.weight.permute(0, 2, 3, 1).reshape(conv2.weight.shape[0], -1)  # [64, (c, d, p)]
        z = act2(torch.addmm(conv2.bias.repeat(4), y.reshape(n * hw * 4, -1), w2))
        hyper = d.output_hypernetworks_mlps[0](final[:, 1, :])  # [n, 32]
        logits = torch.bmm(z.view(n, hw * 16, -1), hyper.unsqueeze(-1))  # [n, hw*(a,b,c,d), 1]
        logits = logits.view(n, gh, gw, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6)
        return logits.reshape(n, 1, gh * 4, gw * 4)


def _group_spans(group_of: Tensor) -> list[slice]:
    """Slices of the consecutive runs of group 0, 1, ... in `group_of` (prompts sorted by class)."""
    counts = torch.bincount(group_of).tolist()
    starts = np.cumsum([0, *counts])
    return [slice(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:], strict=True)]


def _softmax_short_rows(x: Tensor) -> Tensor:
    """Softmax over a short last dimension (the few prompt tokens), in place on `x`.

    PyTorch's CPU softmax is slow on rows of ~8 elements (about 6x slower than this)."""
    x = x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
    return x.div_(x.sum(dim=-1, keepdim=True))


def _split_heads(x: Tensor, heads: int) -> Tensor:
    """``[..., heads * d]`` -> ``[..., heads, d]``."""
    return x.view(*x.shape[:-1], heads, x.shape[-1] // heads)


def _token_to_image(attn: torch.nn.Module, q: Tensor, values: Tensor, key_in: Tensor | None = None,
                    key_pe: Tensor | None = None) -> Tensor:
    """`Attention(q=q, k=key_in, v=values)` for few query tokens and many image tokens.

    `q`: ``[n, T, 256]``; `values` and `key_in`: ``[hw, 256]`` (shared) or ``[n, hw, 256]``; when
    `key_in` is None it is ``values + key_pe`` (not formed: the scores are split in two).
    Scores ``(q W_k) · key_in + q · b_k`` and output ``(softmax · values) W_v^T + b_v`` never
    build per-head projections of the image tokens; the 1/sqrt(d) scale is folded into q."""
    heads = attn.num_heads
    qh = _split_heads(attn.q_proj(q), heads)  # [n, T, h, d]
    qh = qh / math.sqrt(qh.shape[-1])
    wk = _split_heads(attn.k_proj.weight.t(), heads)  # [256, h, d]
    q_fold = torch.einsum("nthd,chd->nhtc", qh, wk)  # [n, h, T, 256]
    n, h, t, c = q_fold.shape
    bias = torch.einsum("nthd,hd->nht", qh, _split_heads(attn.k_proj.bias, heads)).reshape(n, h * t, 1)
    flat = q_fold.reshape(n, h * t, c)
    if key_in is not None:
        scores = torch.matmul(flat, key_in.transpose(-1, -2)) + bias
    else:
        scores = torch.baddbmm(bias + flat @ key_pe.t(), flat, values.transpose(-1, -2))
    weights = torch.softmax(scores, dim=-1)
    pooled = torch.matmul(weights, values)  # [n, h*T, 256]
    wv = _split_heads(attn.v_proj.weight.t(), heads)  # [256, h, d]
    out = torch.einsum("nhtc,chd->nthd", pooled.view(n, h, t, c), wv) + _split_heads(attn.v_proj.bias, heads)
    return attn.out_proj(out.reshape(n, t, -1))


def _image_to_token(attn: torch.nn.Module, q_image: Tensor, k: Tensor, v: Tensor, residual: Tensor,
                    out: Tensor) -> Tensor:
    """``residual + Attention(q=q_image, k=k, v=v)`` for many image queries and few tokens,
    written into `out` ``[n, hw, 256]``.

    `q_image`, `residual`: ``[hw, 256]`` (shared) or ``[n, hw, 256]``; `k`, `v`: ``[n, T, 256]``.
    Scores ``q_image · (W_q^T k_h) + b_q · k_h``; output ``softmax · (v_h W_o,h^T + b_o / h)``
    (each head's weights sum to one, so the output bias is spread over the heads)."""
    heads = attn.num_heads
    kh = _split_heads(attn.k_proj(k), heads)  # [n, T, h, d]
    kh = kh / math.sqrt(kh.shape[-1])
    vh = _split_heads(attn.v_proj(v), heads)
    wq = _split_heads(attn.q_proj.weight.t(), heads)  # [256, h, d]
    a = torch.einsum("chd,nthd->ncht", wq, kh)  # [n, 256, h, T]
    n, c, h, t = a.shape
    bias = torch.einsum("hd,nthd->nht", _split_heads(attn.q_proj.bias, heads), kh).reshape(n, 1, h * t)
    scores = torch.matmul(q_image, a.reshape(n, c, h * t)).add_(bias)  # [n, hw, h*T]
    weights = _softmax_short_rows(scores.view(n, -1, h, t)).view(n, -1, h * t)
    wo = attn.out_proj.weight.view(attn.out_proj.weight.shape[0], heads, -1)  # [256, h, d]
    v_fold = torch.einsum("nthd,chd->nhtc", vh, wo).reshape(n, h * t, -1) + attn.out_proj.bias / heads
    torch.matmul(weights, v_fold, out=out)
    return out.add_(residual)
