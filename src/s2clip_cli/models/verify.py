"""`s2clip models verify`: a checkpoint is present, intact and loads into its architecture."""

from __future__ import annotations

from pathlib import Path

from ..errors import S2ClipError
from .registry import ALL_SPECS, ModelSpec
from .weights import check_name_digest, locate, missing_message


def verify_spec(spec: ModelSpec) -> Path:
    """Check `spec`'s checkpoint, whatever its family; returns its path (a folder for SD).

    SAM release files are first checked against the MD5 prefix in their names (a truncated or
    damaged download fails here, with a clear message); then every checkpoint is loaded into its
    model strictly (SD: the diffusers folder is loaded as a run would load it)."""
    found = locate(spec)
    if found.path is None:
        if spec.family == "sd":
            from .sd import missing_default_sd_message

            raise S2ClipError(missing_default_sd_message())
        raise S2ClipError(missing_message(spec))
    if spec.family == "clip":
        from .clip import build_clip

        build_clip(spec, weights=found.path)
    elif spec.family == "vfm":
        check_name_digest(found.path, spec.filename)
        from .vfm import build_vfm

        build_vfm(spec, weights=found.path)
    elif spec.family == "sd":
        from .sd import build_sd

        build_sd(path=found.path, offline=True)
    elif spec.family == "sam2":
        from .sam2 import build_sam2_model

        build_sam2_model(spec, checkpoint=found.path)
    else:
        check_name_digest(found.path, spec.filename)
        from .sam import build_sam

        build_sam(spec.arch, checkpoint=found.path)
    return found.path


def found_specs() -> list[ModelSpec]:
    """Every known model whose checkpoint is present (what `models verify` checks by default)."""
    return [spec for spec in ALL_SPECS.values() if locate(spec).path is not None]
