"""`s2clip models verify`: a checkpoint is present and loads into its architecture."""

from __future__ import annotations

from pathlib import Path

from ..errors import S2ClipError
from .registry import ModelSpec
from .weights import locate, missing_message


def verify_spec(spec: ModelSpec) -> Path:
    """Load `spec`'s checkpoint into its model (strictly); returns the file's path."""
    found = locate(spec)
    if found.path is None:
        raise S2ClipError(missing_message(spec))
    if spec.family == "clip":
        from .clip import build_clip

        build_clip(spec, weights=found.path)
    elif spec.family == "vfm":
        from .vfm import build_vfm

        build_vfm(spec, weights=found.path)
    else:
        from .sam import build_sam

        build_sam(spec.arch, checkpoint=found.path)
    return found.path
