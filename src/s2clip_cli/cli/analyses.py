"""`s2clip entropy` and `s2clip ap`: parsing only; the work is in `commands/entropy.py`, `commands/ap.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    DATASETS_HELP,
    ClipName,
    ConfigOpt,
    DeviceOpt,
    ModelsOpt,
    OfflineOpt,
    PrecisionOpt,
    WeightsOpt,
    WindowBatchOpt,
    config_record,
    dataset_list,
    out,
    user_errors,
    value,
    warn_random,
)

BackboneOpt = Annotated[ClipName, typer.Option("--backbone", help="CLIP backbone.")]
DataRootOpt = Annotated[Path | None, typer.Option(help="Dataset folder (several datasets: their parent; default: "
                                                  "$S2CLIP_DATA_DIR, see `s2clip data list`).")]


@user_errors
def entropy(
    ctx: typer.Context,
    backbone: BackboneOpt = "ViT-B/16",
    dataset: Annotated[str | None, typer.Option(help=DATASETS_HELP + " Default: those of Figure 4 that are "
                                                "prepared in the default data folder.")] = None,
    data_root: DataRootOpt = None,
    images: Annotated[Path | None, typer.Option(help="A folder of images instead of a dataset.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most N images per dataset.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", "--out", help="Where JSON, CSV and the heatmap "
                                         "go.")] = Path("runs/entropy"),
    window_batch: WindowBatchOpt = 4,
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = "auto",
    models: ModelsOpt = "real",
    offline: OfflineOpt = False,
    clip_weights: WeightsOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Spatial entropy, Gini and channel correlation of every CLIP layer's token map (Algorithm 1, Fig. 4)."""
    from ..commands.entropy import run_entropy

    warn_random(value(models))
    run_entropy(value(backbone), dataset_list(dataset), data_root, images_dir=images, limit=limit, out_dir=output,
                models=value(models), device=value(device), precision=value(precision), window_batch=window_batch,
                offline=offline, weights=clip_weights, console=out, record_config=config_record(ctx))


@user_errors
def ap(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option(help=DATASETS_HELP + " Default: those of Figure 3 that are "
                                                "prepared in the default data folder.")] = None,
    data_root: DataRootOpt = None,
    sources: Annotated[str | None, typer.Option(help="Feature sources, e.g. clip:0-10,dino_vitb8,dinov2_vitb14,"
                                                "sam_vitb16 (the default, with the backbone's layers).")] = None,
    backbone: BackboneOpt = "ViT-B/16",
    pairs: Annotated[int, typer.Option(help="Patch pairs sampled per image and source.")] = 2000,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    limit: Annotated[int | None, typer.Option(help="At most N images per dataset.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", "--out", help="Where JSON and the PR curves go.")] = Path(
        "runs/ap"),
    window_batch: WindowBatchOpt = 4,
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = "auto",
    models: ModelsOpt = "real",
    offline: OfflineOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Average precision of patch-feature similarity for "same class" per source (Fig. 3)."""
    from ..commands.ap import run_ap

    warn_random(value(models))
    run_ap(dataset_list(dataset), data_root, sources=sources, backbone=value(backbone), pairs=pairs, seed=seed,
           limit=limit, out_dir=output, models=value(models), device=value(device), precision=value(precision),
           window_batch=window_batch, offline=offline, console=out, record_config=config_record(ctx))
