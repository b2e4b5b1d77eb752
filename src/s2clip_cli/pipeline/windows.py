"""Sliding windows with MMSegmentation's slide-inference semantics, and stitching."""

from __future__ import annotations

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
