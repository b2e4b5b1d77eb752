"""Block indices that SC-CLIP and ResCLIP hard-wire for ViT-B/16, on a CLIP of any depth.

Both references name middle blocks by their index in a 12-block ViT (SC-CLIP: blocks 8 and 3 and
3..9; ResCLIP: blocks 5..8) and use the same indices on every backbone they run (ViT-L/14's 24
blocks included). We do the same on any CLIP with at least 12 blocks; a shallower one (the tiny
test models) gets the indices scaled to its depth, so that every index names an early block."""

from __future__ import annotations

REFERENCE_BLOCKS = 12  # ViT-B/16, the depth the references' indices were chosen for


def reference_block(index: int, num_blocks: int) -> int:
    """Block `index` of a 12-block ViT on a CLIP with `num_blocks` blocks: the index itself when the
    CLIP has at least 12 blocks, else ``index · num_blocks // 12``."""
    if num_blocks >= REFERENCE_BLOCKS:
        return index
    return index * num_blocks // REFERENCE_BLOCKS


def reference_range(start: int, end: int, num_blocks: int) -> list[int]:
    """Blocks ``start..end−1`` of a 12-block ViT on a CLIP with `num_blocks` blocks (at least one:
    a range that scales to nothing keeps its scaled start)."""
    first, stop = reference_block(start, num_blocks), reference_block(end, num_blocks)
    return list(range(first, max(stop, first + 1)))


__all__ = ["REFERENCE_BLOCKS", "reference_block", "reference_range"]
