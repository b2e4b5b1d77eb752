"""COCO run-length-encoded masks, decoded without pycocotools.

A compressed RLE (``{"size": [h, w], "counts": "<string>"}``) stores run lengths that alternate
0s and 1s, starting with 0s, over the mask in column-major order. Each count is written in 5-bit
groups as characters ``chr(48 + group)``: bit 0x20 says another group follows, bit 0x10 of the
last group is the sign, and from the fourth count on the value is a delta to the count two places
earlier (``rleFrString`` in pycocotools' ``maskApi.c``).
"""

from __future__ import annotations

import numpy as np

from ...errors import S2ClipError


def rle_counts(counts: str | list[int]) -> list[int]:
    """The run lengths of a compressed RLE string (a list of ints is returned as is)."""
    if not isinstance(counts, str):
        return [int(c) for c in counts]
    out: list[int] = []
    pos, n = 0, len(counts)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                raise ValueError("RLE string ends inside a count")
            group = ord(counts[pos]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(out) > 2:
            value += out[-2]
        out.append(value)
    return out


def decode_rle(counts: str | list[int], height: int, width: int, where: str = "RLE") -> np.ndarray:
    """The H x W boolean mask of an RLE; bad counts are an ``S2ClipError`` naming ``where``."""
    try:
        runs = np.asarray(rle_counts(counts), dtype=np.int64)
    except (ValueError, TypeError) as exc:
        raise S2ClipError(f"{where}: malformed RLE counts ({exc})") from None
    if (runs < 0).any() or int(runs.sum()) != height * width:
        raise S2ClipError(f"{where}: RLE counts cover {int(runs.sum())} pixels"
                          f"{' with a negative run' if (runs < 0).any() else ''} but the mask is "
                          f"{height}x{width} = {height * width}")
    flat = np.repeat(np.arange(len(runs)) % 2 == 1, runs)
    return flat.reshape(width, height).T
