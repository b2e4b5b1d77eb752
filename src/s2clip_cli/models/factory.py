"""Load the CLIP / VFM / SAM triple a run needs, with real, tiny or full-size random weights.

`--models real` (default) resolves checkpoints (see `weights.py`) and never falls back to random
weights. `--models tiny` builds small random models of the same architecture families through the
same builders; `--models random` builds the full-size architectures with random weights (timing).
Both of the latter print a warning on every run: their outputs are meaningless.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from ..errors import S2ClipError
from . import registry, weights
from .clip import ClipBackbone, build_clip

ModelsMode = Literal["real", "tiny", "random"]
MODES: tuple[str, ...] = ("real", "tiny", "random")

RANDOM_WARNING = (
    "models are randomly initialised ({mode}): outputs are meaningless — "
    "use real weights (`s2clip models list`) for actual segmentation"
)
SEED = 0  # random models are seeded so that runs (and the text cache) are reproducible


@dataclass
class ModelPaths:
    """Explicit checkpoint paths (highest priority in the resolution order)."""

    clip: str | Path | None = None
    vfm: str | Path | None = None
    sam: str | Path | None = None


@dataclass
class LoadedModels:
    clip: ClipBackbone
    vfm: nn.Module
    sam: nn.Module | None
    mode: str
    identity: dict[str, str] = field(default_factory=dict)  # name -> checkpoint path or "random"

    @property
    def is_random(self) -> bool:
        return self.mode != "real"


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when available; an explicit `cuda` without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise S2ClipError("--device cuda requested but no CUDA device is available (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise S2ClipError(f"unknown device {device!r}: use auto, cpu or cuda")
    return torch.device(device)


def load_single(family: str, name: str, *, mode: str = "real", path: str | Path | None = None,
                offline: bool = False, device: str | torch.device = "cpu") -> nn.Module:
    """One CLIP (as `ClipBackbone`) or one VFM, for the analyses that need only that model."""
    if mode not in MODES:
        raise S2ClipError(f"unknown --models {mode!r}: choose one of {', '.join(MODES)}")
    spec = registry.clip_spec(name) if family == "clip" else registry.vfm_spec(name)
    ckpt = weights.resolve(spec, path, offline=offline) if mode == "real" else None
    if mode != "real":
        torch.manual_seed(SEED)
    if family == "clip":
        model: nn.Module = ClipBackbone(build_clip(spec, weights=ckpt, tiny=mode == "tiny"), spec.name,
                                        tokenizer_name=spec.arch.replace("-quickgelu", ""))
    else:
        from .vfm import build_vfm

        model = build_vfm(spec, weights=ckpt, tiny=mode == "tiny")
    return model.to(torch.device(device)).eval().requires_grad_(False)


def random_warning(mode: str) -> str:
    return RANDOM_WARNING.format(mode="--models " + mode)


def load_models(
    clip_name: str = "ViT-B/16",
    vfm_name: str = "dino_vitb8",
    sam_name: str | None = "vit_b",
    *,
    mode: str = "real",
    paths: ModelPaths | None = None,
    offline: bool = False,
    device: str | torch.device = "cpu",
) -> LoadedModels:
    """Build the models of a run on `device` in eval mode."""
    if mode not in MODES:
        raise S2ClipError(f"unknown --models {mode!r}: choose one of {', '.join(MODES)}")
    paths = paths or ModelPaths()
    clip_spec = registry.clip_spec(clip_name)
    vfm_spec = registry.vfm_spec(vfm_name)
    sam_spec = registry.sam_spec(sam_name) if sam_name else None
    tiny = mode == "tiny"
    identity: dict[str, str] = {}

    def checkpoint(spec: registry.ModelSpec, explicit: str | Path | None) -> Path | None:
        if mode != "real":
            identity[spec.name] = f"random-{mode}-seed{SEED}"
            return None
        path = weights.resolve(spec, explicit, offline=offline)
        stat = path.stat()
        identity[spec.name] = f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
        return path

    # Resolve every file first, so a missing one is reported before anything heavy is built.
    clip_ckpt = checkpoint(clip_spec, paths.clip)
    vfm_ckpt = checkpoint(vfm_spec, paths.vfm)
    sam_ckpt = checkpoint(sam_spec, paths.sam) if sam_spec else None
    if mode != "real":
        warnings.warn(random_warning(mode), stacklevel=2)
        torch.manual_seed(SEED)

    from .vfm import SamEncoderVFM, build_vfm

    clip_model = build_clip(clip_spec, weights=clip_ckpt, tiny=tiny)
    tokenizer_name = clip_spec.arch.replace("-quickgelu", "")
    clip = ClipBackbone(clip_model, clip_spec.name, tokenizer_name=tokenizer_name)
    sam = None
    if sam_spec is not None:
        from .sam import build_sam

        sam = build_sam(sam_spec.arch, tiny=tiny, checkpoint=sam_ckpt)
    if vfm_spec.name == "sam_vitb16" and sam is not None and sam_spec is not None and sam_spec.name == "vit_b":
        vfm: nn.Module = SamEncoderVFM(sam.image_encoder)  # one SAM ViT-B serves both roles
    else:
        vfm = build_vfm(vfm_spec, weights=vfm_ckpt, tiny=tiny)
    device = torch.device(device)
    for module in (clip, vfm, sam):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    return LoadedModels(clip=clip, vfm=vfm, sam=sam, mode=mode, identity=identity)
