"""Driver of `s2clip visualize` (Figure 6): per image, CLIP's dense features under each attention
strategy and each VFM's features as PCA colours, one PNG grid per image."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from rich.console import Console

from ..analysis.visualize import (
    DRAWABLE_STRATEGIES,
    STRATEGY_TITLES,
    FeaturePanel,
    feature_figure,
    strategy_feature_map,
    vfm_feature_map,
)
from ..errors import S2ClipError
from ..io.files import prepare_output_dir, write_json
from ..io.images import read_image
from ..models.factory import load_single, resolve_device
from ..models.precision import compute_dtype, dtype_name
from ..models.registry import vfm_spec
from ..pipeline.transforms import resize_short_side

DEFAULT_STRATEGIES = ("vanilla", "qq", "kk", "vv")
DEFAULT_VFMS = ("dino_vitb8", "dinov2_vitb14")


def parse_names(spec: str | None, default: tuple[str, ...], valid: tuple[str, ...], what: str) -> list[str]:
    """A comma list (empty string: none) checked against `valid`."""
    if spec is None:
        return list(default)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in valid]
    if bad:
        raise S2ClipError(f"unknown {what} {', '.join(map(repr, bad))}; choose from: {', '.join(valid)}")
    return names


def parse_point(spec: str | None) -> tuple[float, float] | None:
    """``x,y`` in pixels of the input image → (x, y)."""
    if spec is None:
        return None
    try:
        x, y = (float(v) for v in spec.split(","))
    except ValueError:
        raise S2ClipError(f"bad --point {spec!r}: use x,y in pixels, e.g. 120,80") from None
    return x, y


def run_visualize(paths: list[Path], out_dir: Path, *, clip_name: str = "ViT-B/16", strategies: list[str],
                  vfms: list[str], point: tuple[float, float] | None = None, short_side: int = 448,
                  models: str = "real", device: str = "auto", precision: str = "auto", offline: bool = False,
                  clip_weights: Path | None = None, console: Console | None = None,
                  record_config: dict[str, Any] | None = None) -> list[Path]:
    """Write ``<stem>_features.png`` per image (and ``visualize.json``); returns the PNG paths."""
    console = console or Console(stderr=True)
    if not strategies and not vfms:
        raise S2ClipError("nothing to draw: give at least one --strategies or --vfm entry")
    for vfm in vfms:
        vfm_spec(vfm)  # an unknown name fails before anything is loaded
    out_dir = prepare_output_dir(out_dir)
    dev = resolve_device(device)
    dtype = compute_dtype(precision, dev)
    with console.status("loading models…"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        clip = load_single("clip", clip_name, mode=models, path=clip_weights, offline=offline, device=dev) \
            if strategies else None
        vfm_models = {name: load_single("vfm", name, mode=models, offline=offline, device=dev) for name in vfms}
    written = []
    for path in paths:
        original = read_image(path)
        fraction = None
        if point is not None:
            (height, width), (x, y) = original.shape[:2], point
            if not (0 <= x < width and 0 <= y < height):
                raise S2ClipError(f"--point {x:g},{y:g} lies outside {path.name} ({width}x{height})")
            fraction = (x / width, y / height)
        image = resize_short_side(original, short_side)
        panels = [FeaturePanel(STRATEGY_TITLES.get(s, f"CLIP ({s})"), strategy_feature_map(clip, image, s, dtype, dev))
                  for s in strategies]
        panels += [FeaturePanel(name, vfm_feature_map(model, image, dtype, dev)) for name, model in vfm_models.items()]
        target = feature_figure(image, panels, out_dir / f"{path.stem}_features.png", point=fraction)
        console.print(f"{path.name} → {target}", highlight=False)
        written.append(target)
    write_json(out_dir / "visualize.json", {
        "config": record_config or {}, "clip": clip_name, "strategies": strategies, "vfms": vfms, "point": point,
        "short_side": short_side, "models": models, "device": dev.type, "precision": dtype_name(dtype),
        "figures": [str(p) for p in written],
        **({"warning": "randomly initialised models: the features are meaningless"} if models != "real" else {}),
    })
    return written


__all__ = ["DEFAULT_STRATEGIES", "DEFAULT_VFMS", "DRAWABLE_STRATEGIES", "parse_names", "parse_point", "run_visualize"]
