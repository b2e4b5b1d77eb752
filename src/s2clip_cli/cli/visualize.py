"""`s2clip visualize`: parsing only; the work is in `commands/visualize.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    ClipOpt,
    ConfigOpt,
    DeviceOpt,
    ModelsOpt,
    OfflineOpt,
    PrecisionOpt,
    WeightsOpt,
    config_record,
    out,
    user_errors,
    value,
    warn_random,
)


@user_errors
def visualize(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder (one PNG per image).")] = Path(
        "s2clip-visualize"),
    strategies: Annotated[str | None, typer.Option(help="CLIP last-block attention strategies, comma-separated "
                                                   "(default vanilla,qq,kk,vv; '' for none).")] = None,
    vfm: Annotated[str | None, typer.Option("--vfm", help="VFMs, comma-separated (default dino_vitb8,dinov2_vitb14; "
                                            "'' for none).")] = None,
    point: Annotated[str | None, typer.Option(help="x,y in pixels: add a row of cosine-similarity maps to that "
                                              "point.")] = None,
    short_side: Annotated[int, typer.Option(help="Resize so the short side is this (long side ≤ 2048).")] = 448,
    clip: ClipOpt = "ViT-B/16",
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = "auto",
    models: ModelsOpt = "real",
    offline: OfflineOpt = False,
    clip_weights: WeightsOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Figure 6: CLIP's dense features under attention strategies and VFM features as PCA colours."""
    from ..commands.visualize import (
        DEFAULT_STRATEGIES,
        DEFAULT_VFMS,
        DRAWABLE_STRATEGIES,
        parse_names,
        parse_point,
        run_visualize,
    )
    from ..io.images import collect_images
    from ..models.registry import VFM_SPECS

    paths = collect_images(images)
    chosen = parse_names(strategies, DEFAULT_STRATEGIES, DRAWABLE_STRATEGIES, "strategy")
    vfms = parse_names(vfm, DEFAULT_VFMS, tuple(VFM_SPECS), "VFM")
    warn_random(value(models))
    run_visualize(paths, output, clip_name=value(clip), strategies=chosen, vfms=vfms, point=parse_point(point),
                  short_side=short_side, models=value(models), device=value(device), precision=value(precision),
                  offline=offline, clip_weights=clip_weights, console=out, record_config=config_record(ctx))
