"""``s2clip data prepare``: the official downloads → the layout ``s2clip eval`` reads (val split).

Only numpy, Pillow and the standard library: archives are read in place (zipfile/tarfile),
Pascal Context's RLE masks are decoded in pure Python, Cityscapes polygons are filled with
Pillow's ImageDraw. See :func:`prepare`.
"""

from __future__ import annotations

from .runner import PLANNERS, PrepareSummary, ProgressCallback, prepare

__all__ = ["PLANNERS", "PrepareSummary", "ProgressCallback", "prepare"]
