"""Image transforms of the evaluation protocol: mmseg's keep-ratio resize and the lineage's
normalisation.

Normalisation, exactly as the mmseg family (SCLIP, ClearCLIP, NACLIP, ProxyCLIP, Trident) does it:

- CLIP input: the resized uint8 RGB image as float 0–255 values, ``(x − mean) / std`` with mmseg's
  ``SegDataPreProcessor(mean=[122.771, 116.746, 104.094], std=[68.501, 66.632, 70.323])``
  (`normalize_pixels`). These are CLIP's constants × 255 rounded to three decimals, so the input
  differs from CLIP's own ``(x/255 − m) / s`` by ~1e-5 relative — enough to flip ProxyCLIP's hard
  mask of negative similarities and PAMR's affinities on flat regions, hence the exact constants.
- VFM input (ProxyCLIP, Trident): that tensor *un-normalised with CLIP's constants* (their
  ``UnNormalize``: ``x·s + m`` per channel) and normalised for ImageNet (torchvision's
  ``Normalize``: ``(x − m) / s``) — `clip_to_imagenet`. Because mmseg's constants are not exactly
  CLIP's × 255, this is not the [0, 1] image; it is what the references' VFM sees.
- Padding: windows are padded with zeros *after* normalisation (ProxyCLIP/ClearCLIP/Trident pad the
  normalised crop with ``F.pad``), i.e. mmseg's mean colour; the VFM sees ``clip_to_imagenet(0)``.

Every step is float32 element-wise arithmetic in the references' order (subtract then divide;
multiply then add), so our tensors equal theirs bit for bit.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
from torch import Tensor

from ..models.clip import CLIP_MEAN, CLIP_STD
from ..models.vfm import IMAGENET_MEAN, IMAGENET_STD

# mmseg SegDataPreProcessor constants of every mmseg-family config (RGB, 0–255 values).
MMSEG_MEAN: tuple[float, float, float] = (122.771, 116.746, 104.094)
MMSEG_STD: tuple[float, float, float] = (68.501, 66.632, 70.323)


def _channels(values: tuple[float, ...], like: Tensor) -> Tensor:
    return torch.tensor(values, dtype=torch.float32, device=like.device).view(3, 1, 1)


def normalize_pixels(pixels: Tensor, mean: tuple[float, ...] = MMSEG_MEAN,
                     std: tuple[float, ...] = MMSEG_STD) -> Tensor:
    """``(x − mean) / std`` per channel of ``[..., 3, H, W]`` float32 pixel values (0–255 with the
    default mmseg constants), as mmseg's ``SegDataPreProcessor``."""
    x = pixels.float()
    return (x - _channels(mean, x)) / _channels(std, x)


def clip_to_imagenet(clip_input: Tensor) -> Tensor:
    """The VFM input of ProxyCLIP/Trident from a normalised CLIP input ``[..., 3, H, W]``:
    un-normalised with CLIP's constants (``x·s + m``), then normalised with ImageNet's
    (``(x − m) / s``), float32, in that order."""
    x = clip_input.float()
    unnormed = x * _channels(CLIP_STD, x) + _channels(CLIP_MEAN, x)
    return (unnormed - _channels(IMAGENET_MEAN, x)) / _channels(IMAGENET_STD, x)


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
