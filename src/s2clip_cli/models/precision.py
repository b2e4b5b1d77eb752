"""Mixed precision: which dtype a run's backbones compute in, and the autocast contexts.

`--precision auto` is float16 on CUDA (ProxyCLIP and Trident run CLIP, DINO and SAM in half
precision) and float32 on the CPU; `fp16` and `bf16` can be forced on either device (CPU autocast
supports both), which is how the test suite runs every mixed-precision path without a GPU.
What is rounding-sensitive — attention softmax, classification, SAM's prompt decoding, pass/fail
thresholds — runs in float32 inside `full_precision()` whatever the run's precision.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch

from ..config import PRECISIONS
from ..errors import S2ClipError

Precision = Literal["auto", "fp32", "fp16", "bf16"]
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of a run (float32: no autocast)."""
    if precision not in PRECISIONS:
        raise S2ClipError(f"unknown --precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    dtype = _DTYPES[precision]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise S2ClipError("--precision bf16 is not supported by this GPU: use fp16 or fp32")
    return dtype


def sam_encoder_dtype(precision: str, device: torch.device, sam_name: str | None) -> torch.dtype:
    """The SAM image encoder's dtype: the run's, except that `auto` keeps ViT-H out of float16,
    where its activations overflow (Trident's note), using bfloat16 where the GPU has it."""
    dtype = compute_dtype(precision, device)
    if precision == "auto" and dtype == torch.float16 and sam_name == "vit_h":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """`fp32`, `fp16` or `bf16`: how results files record a dtype."""
    return _NAMES[dtype]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device`; float32 disables autocast (also an enclosing one)."""
    if dtype == torch.float32:
        return full_precision(device)
    return torch.autocast(device.type, dtype=dtype)


def full_precision(device: torch.device | str) -> contextlib.AbstractContextManager:
    """A float32 region inside any autocast: for softmax, classification and thresholds."""
    kind = device.type if isinstance(device, torch.device) else torch.device(device).type
    return torch.autocast(kind, enabled=False)
