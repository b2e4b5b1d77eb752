"""Load the models a run needs — CLIP, a VFM, optionally SAM and Stable Diffusion — with real, tiny or
full-size random weights.

`--models real` (default) resolves every checkpoint first (see `weights.py`; all missing ones are
reported in one line with one download command) and never falls back to random weights.
`--models tiny` builds small random models of the same architecture families through the same
builders; `--models random` builds the full-size architectures with random weights (timing). Both
of the latter print a warning on every run: their outputs are meaningless.

``LoadedModels.identity`` names each model's weights for resume signatures and the text cache:
``sha256:<16 hex>`` of the checkpoint's content for real weights; for random ones
``random-<mode>:<family>:<name>:seed0`` — each random model is built under its own seed
(`model_seed`: the base seed, its family and its name), so its weights do not depend on which other
models the run builds, and one identity means one set of weights. (Before, one seed was set and the
models built in turn, so e.g. the VFM's weights changed with whether SAM was built, under one
identity ``random-<mode>-seed0``: work dirs recorded with that identity are not resumed.)
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

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


def model_seed(family: str, name: str, base: int = SEED) -> int:
    """The seed one random model is built under: from ``base``, its family and its name only."""
    return int.from_bytes(hashlib.sha256(f"{base}:{family}:{name}".encode()).digest()[:8], "big") % (2**63)


def _random_source(spec: registry.ModelSpec) -> tuple[str, str]:
    """(family, name) whose random weights `spec` gets: `sam_vitb16` is SAM ViT-B's image encoder, so
    it is built as (and equals) the random SAM ViT-B's, with SAM or without."""
    return ("sam", "vit_b") if spec.family == "vfm" and spec.name == "sam_vitb16" else (spec.family, spec.name)


def random_identity(mode: str, spec: registry.ModelSpec) -> str:
    """The identity of `spec`'s random weights under `mode` (``random-tiny:vfm:dino_vitb8:seed0``)."""
    family, name = _random_source(spec)
    return f"random-{mode}:{family}:{name}:seed{SEED}"


@contextmanager
def _seeded(mode: str, spec: registry.ModelSpec) -> Iterator[None]:
    """Build `spec`'s random weights under its own seed (`model_seed`), leaving torch's global random
    state as it was; real weights: nothing to seed."""
    if mode == "real":
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed(*_random_source(spec)))
        yield


@dataclass
class ModelPaths:
    """Explicit checkpoint paths (highest priority in the resolution order)."""

    clip: str | Path | None = None
    vfm: str | Path | None = None
    sam: str | Path | None = None
    sd: str | Path | None = None  # the SD diffusers folder
    sam2: str | Path | None = None  # SAM 2 (instance masks of methods that use them)


@dataclass
class LoadedModels:
    """The built models (eval mode, no gradients, on the run's device) and what their weights are.

    sd: `models.sd.SDModels` when an SD model was asked for, else None. identity: model name →
    ``sha256:<16 hex>`` (real weights) or ``random-<mode>:<family>:<name>:seed0`` (`random_identity`)."""

    clip: ClipBackbone
    vfm: nn.Module | None
    sam: nn.Module | None
    mode: str
    identity: dict[str, str] = field(default_factory=dict)
    sd: Any = None

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
    if family == "clip":
        with _seeded(mode, spec):
            clip_model = build_clip(spec, weights=ckpt, tiny=mode == "tiny")
        model: nn.Module = ClipBackbone(clip_model, spec.name, tokenizer_name=spec.arch.replace("-quickgelu", ""))
    else:
        from .vfm import build_vfm

        with _seeded(mode, spec):
            model = build_vfm(spec, weights=ckpt, tiny=mode == "tiny")
    return model.to(torch.device(device)).eval().requires_grad_(False)


def random_warning(mode: str) -> str:
    return RANDOM_WARNING.format(mode="--models " + mode)


def _sd_spec(name: str) -> registry.ModelSpec:
    spec = registry.SD_SPECS.get(name)
    if spec is None:
        raise S2ClipError(f"unknown SD model {name!r}; choose one of: {', '.join(registry.SD_SPECS)}")
    return spec


def weight_requests(clip_name: str, vfm_name: str | None, sam_name: str | None, *, sd_name: str | None = None,
                    paths: ModelPaths | None = None) -> list[weights.Request]:
    """``(spec, explicit path)`` for every checkpoint a run of these models reads (unknown names are
    `S2ClipError`s; `vfm_name` None: a method without a VFM). The SAM ViT-B file serves
    `sam_vitb16` too, so it is asked for once."""
    paths = paths or ModelPaths()
    vfm_spec = registry.vfm_spec(vfm_name) if vfm_name else None
    requests: list[weights.Request] = [(registry.clip_spec(clip_name), paths.clip)]
    sam_spec = registry.sam_spec(sam_name) if sam_name else None
    if vfm_spec is not None and not _vfm_served_by_sam(vfm_spec, sam_spec, paths):
        requests.append((vfm_spec, paths.vfm))
    if sam_spec is not None:
        requests.append((sam_spec, paths.sam))
    if sd_name:
        requests.append((_sd_spec(sd_name), paths.sd))
    return requests


def _vfm_served_by_sam(vfm_spec: registry.ModelSpec, sam_spec: registry.ModelSpec | None,
                       paths: ModelPaths) -> bool:
    """Whether the VFM is SAM ViT-B's image encoder, taken from the SAM model (no VFM file of its own)."""
    return (vfm_spec.name == "sam_vitb16" and sam_spec is not None and sam_spec.name == "vit_b"
            and paths.vfm is None)


def prefetch_weights(clip_name: str, vfm_name: str | None, sam_name: str | None, *, sd_name: str | None = None,
                     mode: str = "real", paths: ModelPaths | None = None, offline: bool = False,
                     group: weights.RankGroup | None = None) -> None:
    """Under several ranks, fetch a run's checkpoints once before any rank builds a model: rank 0
    downloads (each node's local rank 0 on nodes that do not share its weights dir) and hashes
    while the others wait, then every rank finds the files (`weights.resolve_collectively`).
    Call it on every rank, after the process group exists and before `load_models`. No-op for
    random modes."""
    if mode not in MODES:
        raise S2ClipError(f"unknown --models {mode!r}: choose one of {', '.join(MODES)}")
    requests = weight_requests(clip_name, vfm_name, sam_name, sd_name=sd_name, paths=paths)
    if mode == "real":
        weights.resolve_collectively(requests, offline=offline, group=group)


def load_models(
    clip_name: str = "ViT-B/16",
    vfm_name: str | None = "dino_vitb8",
    sam_name: str | None = "vit_b",
    *,
    sd_name: str | None = None,
    mode: str = "real",
    paths: ModelPaths | None = None,
    offline: bool = False,
    device: str | torch.device = "cpu",
    sd_dtype: torch.dtype = torch.float32,
) -> LoadedModels:
    """Build the models of a run on `device` in eval mode (`vfm_name` None: no VFM, for methods that
    use none; `sd_name`, e.g. ``"sd21_base"``, adds Stable Diffusion, in `sd_dtype`). Every checkpoint is resolved before anything is built; all
    the missing ones are one `S2ClipError` line."""
    if mode not in MODES:
        raise S2ClipError(f"unknown --models {mode!r}: choose one of {', '.join(MODES)}")
    paths = paths or ModelPaths()
    clip_spec = registry.clip_spec(clip_name)
    vfm_spec = registry.vfm_spec(vfm_name) if vfm_name else None
    sam_spec = registry.sam_spec(sam_name) if sam_name else None
    sd_spec = _sd_spec(sd_name) if sd_name else None
    tiny = mode == "tiny"
    vfm_from_sam = vfm_spec is not None and _vfm_served_by_sam(vfm_spec, sam_spec, paths)
    requests = weight_requests(clip_name, vfm_name, sam_name, sd_name=sd_name, paths=paths)
    checkpoints: dict[str, Path | None] = {}
    identity: dict[str, str] = {}
    if mode == "real":
        resolved = weights.resolve_all(requests, offline=offline)
        for (spec, _), path in zip(requests, resolved, strict=True):
            checkpoints[spec.name] = path
            identity[spec.name] = weights.content_identity(path)
    else:
        for spec, _ in requests:
            identity[spec.name] = random_identity(mode, spec)
        warnings.warn(random_warning(mode), stacklevel=2)
    if vfm_from_sam and vfm_spec is not None and sam_spec is not None:
        identity[vfm_spec.name] = identity[sam_spec.name]  # sam_vitb16 served by the SAM ViT-B file

    from .vfm import SamEncoderVFM, build_vfm

    with _seeded(mode, clip_spec):  # (random weights: each model under its own seed)
        clip_model = build_clip(clip_spec, weights=checkpoints.get(clip_spec.name), tiny=tiny)
    tokenizer_name = clip_spec.arch.replace("-quickgelu", "")
    clip = ClipBackbone(clip_model, clip_spec.name, tokenizer_name=tokenizer_name)
    sam = None
    if sam_spec is not None:
        from .sam import build_sam

        with _seeded(mode, sam_spec):
            sam = build_sam(sam_spec.arch, tiny=tiny, checkpoint=checkpoints.get(sam_spec.name))
    vfm: nn.Module | None = None
    if vfm_from_sam and sam is not None:
        vfm = SamEncoderVFM(sam.image_encoder)  # one SAM ViT-B serves both roles
    elif vfm_spec is not None:
        with _seeded(mode, vfm_spec):
            vfm = build_vfm(vfm_spec, weights=checkpoints.get(vfm_spec.name), tiny=tiny)
    device = torch.device(device)
    for module in (clip, vfm, sam):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    sd = None
    if sd_spec is not None:
        from .sd import build_sd

        sd = build_sd(tiny=tiny, random=mode == "random", path=checkpoints.get(sd_spec.name), offline=True,
                      device=device, dtype=sd_dtype)
    return LoadedModels(clip=clip, vfm=vfm, sam=sam, mode=mode, identity=identity, sd=sd)
