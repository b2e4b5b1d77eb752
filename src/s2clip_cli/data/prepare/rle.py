"""COCO run-length-encoded masks, decoded without pycocotools.

A compressed RLE (``{"size": [h, w], "counts": "<string>"}``) stores run lengths that alternate
0s and 1s, starting with 0s, over the mask in column-major order. Each count is written in 5-bit
groups as characters ``chr(48 + group)``: bit 0x20 says another group follows, bit 0x10 of the
last group is the sign, and from the fourth count on the value is a delta to the count two places
earlier (``rleFrString`` in pycocotools' ``maskApi.c``).
"""

from __future__ import annotations

import numpy as np

from ...errors import S2ClipError, one_line


def rle_counts(counts: str | list[int], pixels: int | None = None) -> list[int]:
    """The run lengths of a compressed RLE string (a list of ints is returned as ints). With
    ``pixels`` (the mask's h*w) a hostile string fails fast instead of costing time or memory:
    a run longer than the mask, or more runs than pixels + 1, is a ``ValueError``."""
    max_runs = None if pixels is None else pixels + 1
    if not isinstance(counts, str):
        if max_runs is not None and len(counts) > max_runs:
            raise ValueError(f"{len(counts)} runs for {pixels} pixels")
        return [int(c) for c in counts]
    max_shift = 5 * 14 if pixels is None else max(5, pixels.bit_length() + 6)  # groups a count can need
    out: list[int] = []
    pos, n = 0, len(counts)
    while pos < n:
        value, shift, more = 0, 0, True
        while more:
            if pos >= n:
                raise ValueError("RLE string ends inside a count")
            if shift > max_shift:
                raise ValueError(f"a count at character {pos} is longer than any mask")
            group = ord(counts[pos]) - 48
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            pos += 1
            shift += 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(out) > 2:
            value += out[-2]
        if pixels is not None and not 0 <= value <= pixels:
            raise ValueError(f"run {len(out) + 1} is {value} pixels long, the mask has {pixels}")
        out.append(value)
        if max_runs is not None and len(out) > max_runs:
            raise ValueError(f"more than {max_runs} runs for {pixels} pixels")
    return out


def decode_rle(counts: str | list[int], height: int, width: int, where: str = "RLE") -> np.ndarray:
    """The H x W boolean mask of an RLE; bad counts are an ``S2ClipError`` naming ``where``."""
    pixels = height * width
    try:
        runs = rle_counts(counts, pixels)
        if any(not 0 <= r <= pixels for r in runs):
            raise ValueError("a run is negative or longer than the mask")
        runs_arr = np.asarray(runs, dtype=np.int64)
    except (ValueError, TypeError, OverflowError) as exc:
        raise S2ClipError(f"{where}: malformed RLE counts ({one_line(exc)[:200]})") from None
    total = int(runs_arr.sum())
    if total != pixels:
        raise S2ClipError(f"{where}: RLE counts cover {total} pixels but the mask is {height}x{width} = {pixels}")
    flat = np.repeat(np.arange(len(runs_arr)) % 2 == 1, runs_arr)
    return flat.reshape(width, height).T
