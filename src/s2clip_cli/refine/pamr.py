"""PAMR — pixel-adaptive mask refinement (Araslanov & Roth, 1-stage-wseg), as NACLIP applies it.

For every pixel, the affinity to its 8 neighbours at each dilation ``d`` (3×3 neighbourhood with
holes, replicate padding) is ``−|I(p) − I(p')| / (1e-8 + 0.1·σ(p))`` per image channel, where
``σ(p)`` is the (unbiased) standard deviation of the channel over the 9 dilated positions of every
dilation (the centre counted once per dilation); averaged over channels and softmax-normalised over
all ``8·len(dilations)`` neighbours. The masks are then propagated ``iterations`` times:
``m(p) ← Σ_{p'} a(p, p')·m(p')`` (the pixel itself is not among its neighbours).

NACLIP calls it on the CLIP-normalised image resized to the label size and on the cosine logits
(before the logit scale); the per-channel normalisation makes the affinity insensitive to a
per-channel affine change of the image, up to the 1e-8.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import S2ClipError

_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shifted(x: Tensor, dilations: Sequence[int], *, centre: bool) -> Iterator[Tensor]:
    """``x`` ``[B, C, H, W]`` read at each dilated 3×3 offset (replicate padding), dilation-major."""
    h, w = x.shape[-2:]
    offsets = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1)) if centre else _OFFSETS
    for d in dilations:
        padded = F.pad(x, [d] * 4, mode="replicate")
        for dy, dx in offsets:
            y0, x0 = d + dy * d, d + dx * d
            yield padded[..., y0 : y0 + h, x0 : x0 + w]


def pixel_affinity(image: Tensor, dilations: Sequence[int] = (8, 16)) -> Tensor:
    """``[B, 8·len(dilations), H, W]`` softmax-normalised neighbour affinities of ``image`` ``[B, C, H, W]``."""
    image = image.float()
    local = torch.stack(list(_shifted(image, dilations, centre=True)), dim=2)  # [B, C, 9·nd, H, W]
    std = local.std(dim=2, keepdim=True)
    neighbours = torch.stack(list(_shifted(image, dilations, centre=False)), dim=2)  # [B, C, 8·nd, H, W]
    aff = -(image.unsqueeze(2) - neighbours).abs() / (1e-8 + 0.1 * std)
    return torch.softmax(aff.mean(dim=1), dim=1)


def pamr(image: Tensor, masks: Tensor, *, iterations: int = 10, dilations: Sequence[int] = (8, 16)) -> Tensor:
    """Refine ``masks`` ``[B, K, h, w]`` with the local affinities of ``image`` ``[B, C, H, W]``.

    Masks of another size are first resized to the image (bilinear, ``align_corners=True``, as the
    reference). Returns float32 ``[B, K, H, W]`` on the input's device; autocast is disabled inside."""
    if image.ndim != 4 or masks.ndim != 4 or image.shape[0] != masks.shape[0]:
        raise S2ClipError(f"pamr expects image [B, C, H, W] and masks [B, K, h, w], got {list(image.shape)} "
                         f"and {list(masks.shape)}")
    if iterations < 0 or not dilations or any(int(d) < 1 for d in dilations):
        raise S2ClipError(f"pamr needs iterations >= 0 and dilations >= 1, got {iterations}, {tuple(dilations)}")
    dilations = [int(d) for d in dilations]
    with torch.autocast(device_type=image.device.type, enabled=False):
        masks = masks.float()
        if masks.shape[-2:] != image.shape[-2:]:
            masks = F.interpolate(masks, size=image.shape[-2:], mode="bilinear", align_corners=True)
        aff = pixel_affinity(image, dilations)  # [B, P, H, W]
        for _ in range(iterations):
            out = torch.zeros_like(masks)
            for p, shifted in enumerate(_shifted(masks, dilations, centre=False)):
                out.addcmul_(aff[:, p : p + 1], shifted)
            masks = out
    return masks
