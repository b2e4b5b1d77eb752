"""`s2clip bench-sam`: parsing only; the work is in `commands/bench_sam.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..errors import S2ClipError
from .common import (
    ClipOpt,
    ConfigOpt,
    DeviceOpt,
    ModelsOpt,
    OfflineOpt,
    PrecisionOpt,
    PresetName,
    SamOpt,
    SdThresholdOpt,
    WeightsOpt,
    config_record,
    out,
    user_errors,
    value,
    warn_random,
)
from .methods import MethodOpt, MethodVfmOpt, PamrOpt, given


@user_errors
def bench_sam(
    ctx: typer.Context,
    dataset: Annotated[PresetName | None, typer.Option(help="Benchmark to take images, classes and the preset "
                                                       "(resize, windows, thresholds) from.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="The dataset's folder (default: $S2CLIP_DATA_DIR).")] = None,
    images: Annotated[Path | None, typer.Option(help="A folder of images instead of a dataset.")] = None,
    synthetic: Annotated[int | None, typer.Option(help="N generated images with coarse maps (fixed seed).")] = None,
    classes: Annotated[str | None, typer.Option(help="Classes for --images/--synthetic (default: VOC's 20).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many images.")] = 5,
    repeats: Annotated[int, typer.Option(help="Timed repeats per image.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed for --synthetic.")] = 0,
    iou_thresh: Annotated[float, typer.Option(help="Predicted-IoU threshold.")] = 0.8,
    method: MethodOpt = "s2clip",
    pamr: PamrOpt = None,
    sam: SamOpt = "vit_b",
    sd: Annotated[bool, typer.Option("--sd", help="Also time SAM+SD (CLIPer's SD refinement, then the optimized "
                                     "SAM refinement): the fourth row of Table 4.")] = False,
    sd_threshold: SdThresholdOpt = None,
    seed_sd: Annotated[int, typer.Option("--sd-seed", help="Seed of the SD noise.")] = 0,
    output: Annotated[Path, typer.Option("--output", "-o", "--json", help="Where to write the JSON report.")] = Path(
        "bench-results/bench-sam.json"),
    clip: ClipOpt = "ViT-B/16",
    vfm: MethodVfmOpt = None,
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = "auto",
    models: ModelsOpt = "real",
    offline: OfflineOpt = False,
    clip_weights: WeightsOpt = None,
    vfm_weights: WeightsOpt = None,
    sam_weights: WeightsOpt = None,
    sd_weights: WeightsOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Time the pipeline without SAM, with the original and with the optimized SAM refinement (Table 4)."""
    from ..commands.bench_sam import load_bench_inputs, run_bench_sam
    from ..data.class_names import parse_class_list
    from ..models.factory import ModelPaths
    from ..pipeline.segmenter import SegmenterConfig

    if sum(x is not None for x in (dataset, images, synthetic)) != 1:
        raise S2ClipError("give exactly one of --dataset, --images DIR or --synthetic N")
    loaded, fg, bg, preset = load_bench_inputs(images, value(dataset), data_root, limit,
                                               parse_class_list(classes) if classes else None)
    cfg = SegmenterConfig(method=value(method), clip=value(clip), sam=value(sam), precision=value(precision),
                          sd=sd, seed=seed_sd,
                          models=value(models), device=value(device), offline=offline,
                          weights=ModelPaths(clip=clip_weights, vfm=vfm_weights, sam=sam_weights, sd=sd_weights))
    warn_random(value(models))
    run_bench_sam(cfg, classes=fg, background=bg, images=loaded, synthetic=synthetic, preset=preset, seed=seed,
                  explicit=given(vfm=value(vfm), pamr=pamr, sd_threshold=sd_threshold),
                  repeats=repeats, iou_thresh=iou_thresh, json_path=output, console=out,
                  record_config=config_record(ctx))
