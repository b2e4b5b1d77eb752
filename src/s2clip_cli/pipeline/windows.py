"""Sliding windows with MMSegmentation's slide-inference semantics, their padded batches, and
stitching."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

Box = tuple[int, int, int, int]  # (y1, x1, y2, x2), end-exclusive


def sliding_windows(height: int, width: int, crop: int, stride: int) -> list[Box]:
    """Windows covering a ``height x width`` image, row-major.

    ``h_grids = max(H - crop + stride - 1, 0) // stride + 1``; window ``(i·stride, j·stride)``
    clipped to the image and, if clipped, shifted back inside it (``y1 = max(y2 - crop, 0)``).
    An image smaller than the crop is one window of the image's own size.
    """
    if height <= 0 or width <= 0 or crop <= 0 or stride <= 0:
        raise ValueError(f"invalid window geometry: {height}x{width}, crop {crop}, stride {stride}")
    h_grids = max(height - crop + stride - 1, 0) // stride + 1
    w_grids = max(width - crop + stride - 1, 0) // stride + 1
    boxes: list[Box] = []
    for i in range(h_grids):
        for j in range(w_grids):
            y2 = min(i * stride + crop, height)
            x2 = min(j * stride + crop, width)
            boxes.append((max(y2 - crop, 0), max(x2 - crop, 0), y2, x2))
    return boxes


class Stitcher:
    """Accumulates per-window maps ``[C, h, w]`` on the full ``[C, H, W]`` canvas; overlaps are
    averaged with a count map."""

    def __init__(self, channels: int, height: int, width: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(channels, height, width, dtype=torch.float32, device=device)
        self.count = torch.zeros(1, height, width, dtype=torch.float32, device=device)

    def add(self, box: Box, values: Tensor) -> None:
        y1, x1, y2, x2 = box
        if values.shape[-2:] != (y2 - y1, x2 - x1):
            raise ValueError(f"window values {tuple(values.shape[-2:])} do not match box {box}")
        self.sum[:, y1:y2, x1:x2] += values.float()
        self.count[:, y1:y2, x1:x2] += 1

    def result(self) -> Tensor:
        if bool((self.count == 0).any()):
            raise ValueError("windows do not cover the whole image")
        return self.sum / self.count


def centred_padding(height: int, width: int, multiple: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding that brings a window to a multiple of `multiple`, split as
    ProxyCLIP's `compute_padsize` splits it (the smaller half first)."""
    ph, pw = -height % multiple, -width % multiple
    return ph // 2, ph - ph // 2, pw // 2, pw - pw // 2


@dataclass
class WindowBatch:
    """A batch of equally sized windows cut from one image."""

    boxes: list[Box]  # each window's place in the image
    crops: Tensor  # [B, 3, h + pad, w + pad]
    offset: tuple[int, int]  # (top, left) of the window's pixels inside each padded crop

    def unpad(self, maps: Tensor) -> Tensor:
        """``[B, C, h + pad, w + pad]`` maps on the padded crops → ``[B, C, h, w]`` on the windows."""
        y1, x1, y2, x2 = self.boxes[0]
        top, left = self.offset
        return maps[..., top:top + y2 - y1, left:left + x2 - x1]


def window_batches(image: Tensor, boxes: Sequence[Box], batch_size: int, multiple: int,
                   fill: Sequence[float]) -> Iterator[WindowBatch]:
    """Crops of `image` ``[3, H, W]`` at `boxes`, `batch_size` at a time, padded (centred) to a
    multiple of `multiple` (1: never padded) with the colour `fill`.

    The pipeline passes the normalised image and zeros as `fill`, as ProxyCLIP and ClearCLIP pad
    their normalised windows (``F.pad``): mmseg's mean colour, which the VFM then sees through the
    same un-normalise/normalise as the image (`transforms.clip_to_imagenet`). Callers holding
    [0, 1] images pass their normalisation's mean colour instead."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    fill_t = torch.tensor(list(fill), dtype=image.dtype, device=image.device).view(1, 3, 1, 1)
    for start in range(0, len(boxes), batch_size):
        chunk = list(boxes[start:start + batch_size])
        crops = torch.stack([image[:, y1:y2, x1:x2] for y1, x1, y2, x2 in chunk])
        h, w = crops.shape[-2:]
        top, bottom, left, right = centred_padding(h, w, multiple)
        if top or bottom or left or right:
            padded = fill_t.expand(len(chunk), 3, h + top + bottom, w + left + right).clone()
            padded[:, :, top:top + h, left:left + w] = crops
            crops = padded
        yield WindowBatch(chunk, crops, (top, left))
