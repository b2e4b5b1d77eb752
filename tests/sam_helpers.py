"""Shared by the SAM encoder tests."""

from __future__ import annotations

import torch
from segment_anything.modeling.image_encoder import Attention


def randomise_rel_pos(module: torch.nn.Module, seed: int) -> None:
    """segment-anything zero-initialises the relative positions (released SAMs' are not zero): draw
    every ``Attention``'s in ``module`` (in module order) from N(0, 0.5²) with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for attn in (m for m in module.modules() if isinstance(m, Attention)):
            for p in (attn.rel_pos_h, attn.rel_pos_w):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
