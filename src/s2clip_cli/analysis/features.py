"""Per-window feature maps for the analyses, cut and padded exactly as the pipeline cuts its windows
(`pipeline.windows`), in bounded batches and under the run's precision."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor, nn

from ..config import CROP, IGNORE_INDEX
from ..models.clip import ClipBackbone
from ..models.precision import autocast
from ..pipeline.transforms import clip_to_imagenet, normalize_pixels, resize_short_side
from ..pipeline.windows import sliding_windows, window_batches


@dataclass
class AnalysisWindows:
    """A batch of one image's windows: crops ``[B, 3, h, w]`` normalised as the pipeline's CLIP input
    (0–255 pixels with mmseg's constants, padded with zeros to the patch multiple, as the pipeline
    pads) and, when a label was given, each window's label cut the same way (padding marked ignore)."""

    crops: Tensor
    labels: list[np.ndarray] | None


def image_windows(image: np.ndarray, *, short_side: int, stride: int, multiple: int, batch_size: int,
                  crop: int = CROP, label: np.ndarray | None = None) -> Iterator[AnalysisWindows]:
    """The resized image's sliding windows, `batch_size` at a time."""
    resized = resize_short_side(image, short_side)
    h, w = resized.shape[:2]
    boxes = sliding_windows(h, w, crop, stride)
    x = normalize_pixels(torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1))
    lab = None
    if label is not None:
        lab = cv2.resize(label.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    for batch in window_batches(x, boxes, batch_size, multiple, (0.0, 0.0, 0.0)):
        labels = None
        if lab is not None:
            ph, pw = batch.crops.shape[-2:]
            top, left = batch.offset
            labels = []
            for y1, x1, y2, x2 in batch.boxes:
                canvas = np.full((ph, pw), IGNORE_INDEX, dtype=np.uint8)
                canvas[top:top + y2 - y1, left:left + x2 - x1] = lab[y1:y2, x1:x2]
                labels.append(canvas)
        yield AnalysisWindows(batch.crops, labels)


def window_multiple(*patch_sizes: int) -> int:
    """Windows are padded to a multiple of every model's patch size."""
    return math.lcm(*patch_sizes)


def normalized(crops: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(crops − mean) / std`` per channel of images ``[B, 3, h, w]``."""
    return (crops - torch.tensor(mean, device=crops.device).view(1, 3, 1, 1)) / torch.tensor(
        std, device=crops.device).view(1, 3, 1, 1)


def clip_layer_maps(clip: ClipBackbone, crops: Tensor, layers: list[int], dtype: torch.dtype) -> dict[int, Tensor]:
    """Each layer's patch-token map ``[B, D, h, w]`` (the residual stream after the block), float32
    on the CPU."""
    device = next(clip.parameters()).device
    with torch.no_grad(), autocast(device, dtype):
        streams = clip.residual_streams(crops.to(device), layers)
    gh, gw = streams.grid
    return {layer: s[:, 1:].transpose(1, 2).reshape(s.shape[0], -1, gh, gw).float().cpu()
            for layer, s in zip(streams.layers, streams.streams, strict=True)}


def vfm_maps(vfm: nn.Module, crops: Tensor, dtype: torch.dtype) -> Tensor:
    """The VFM's last-layer patch features ``[B, C, h, w]``, float32 on the CPU, from the CLIP input
    re-normalised for ImageNet as the pipeline feeds its VFM (`transforms.clip_to_imagenet`)."""
    device = next(vfm.parameters()).device
    with torch.no_grad(), autocast(device, dtype):
        return vfm(clip_to_imagenet(crops.to(device))).float().cpu()
