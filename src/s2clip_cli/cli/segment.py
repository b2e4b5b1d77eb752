"""`s2clip segment`: parsing only; the work is in `commands/segment.py`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..config import RefineConfig
from .common import (
    ClipOpt,
    CombineOpt,
    ConfigOpt,
    DeviceOpt,
    LayersOpt,
    ModelsOpt,
    NoBoxOpt,
    NoCcaOpt,
    NoMaskOpt,
    NoPointOpt,
    NoSamOpt,
    OfflineOpt,
    PrecisionOpt,
    SamImplOpt,
    SdOpt,
    SdThresholdOpt,
    SeedOpt,
    WeightsOpt,
    WindowBatchOpt,
    config_record,
    console,
    fail,
    out,
    parse_layers,
    user_errors,
    value,
    warn_random,
)
from .methods import MethodOpt, MethodSamOpt, MethodVfmOpt, PamrOpt, given


def refine_config(sam_impl: str, no_cca: bool, no_box: bool, no_mask: bool, no_point: bool,
                  **thresholds: float) -> RefineConfig:
    """The SAM refinement settings of `segment` and `eval` (thresholds at their defaults unless given)."""
    return RefineConfig(impl=value(sam_impl), use_cca=not no_cca, use_box=not no_box, use_mask=not no_mask,
                        use_point=not no_point, **thresholds)


@user_errors
def segment(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    classes: Annotated[str, typer.Option("--classes", "-c", help="Comma list (cat,dog; puppy) or @file.txt "
                                         "(one class per line, synonyms separated by '; ').")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("s2clip-out"),
    background: Annotated[str | None, typer.Option(help="Background names separated by '; ' "
                                                   "(default: a built-in list of stuff names).")] = None,
    no_background: Annotated[bool, typer.Option("--no-background", help="No background class.")] = False,
    method: MethodOpt = "s2clip",
    threshold: Annotated[float | None, typer.Option(help="Pixels whose top probability is under this fall to "
                                                    "background (default 0.2; CLIPer 0).")] = None,
    clip: ClipOpt = "ViT-B/16",
    vfm: MethodVfmOpt = None,
    layers: LayersOpt = None,
    combine: CombineOpt = "mean",
    no_sam: NoSamOpt = False,
    sam: MethodSamOpt = None,
    sam_impl: SamImplOpt = "optimized",
    no_cca: NoCcaOpt = False,
    no_box: NoBoxOpt = False,
    no_mask: NoMaskOpt = False,
    no_point: NoPointOpt = False,
    coarse_thresh: Annotated[float | None, typer.Option(help="SAM refinement: coarse probability threshold "
                                                        "(default 0.2).")] = None,
    iou_thresh: Annotated[float, typer.Option(help="SAM refinement: predicted-IoU threshold.")] = 0.8,
    min_area: Annotated[int, typer.Option(help="SAM refinement: minimal region area (pixels, at half "
                                          "resolution).")] = 225,
    mask_coeff: Annotated[float, typer.Option(help="SAM refinement: mask prompt coefficient.")] = 0.005,
    short_side: Annotated[int | None, typer.Option(help="Resize so the short side is this (long side ≤ 2048); "
                                                   "classification and SAM run at that size (default: the "
                                                   "method's, 448 for s2clip).")] = None,
    stride: Annotated[int | None, typer.Option(help="Sliding-window stride (default: the method's, 112 with "
                                               "crop 336 for s2clip).")] = None,
    pamr: PamrOpt = None,
    window_batch: WindowBatchOpt = 4,
    sd: SdOpt = False,
    sd_threshold: SdThresholdOpt = None,
    seed: SeedOpt = 0,
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
    """Label every pixel of IMAGES with one of --classes; writes mask, overlay and JSON per image."""
    from ..commands.segment import background_names, run_segment
    from ..data.class_names import parse_class_list
    from ..io.files import prepare_output_dir
    from ..io.images import collect_images
    from ..models.factory import ModelPaths
    from ..pipeline.segmenter import SegmenterConfig

    class_list = parse_class_list(classes)
    bg = None if no_background else background_names(background, class_list)
    refine = refine_config(sam_impl, no_cca, no_box, no_mask, no_point, min_area=min_area, mask_coeff=mask_coeff,
                           iou_thresh=iou_thresh)
    paths = collect_images(images)
    out_dir = prepare_output_dir(output)
    cfg = SegmenterConfig(
        method=value(method), clip=value(clip), combine=value(combine), prob_thd=0.2 if bg else 0.0,
        window_batch=window_batch, refine=refine, work_resolution="resized", timing=True,
        sd=sd, sd_threshold=0.2, seed=seed,
        precision=value(precision), models=value(models), device=value(device), offline=offline,
        weights=ModelPaths(clip=clip_weights, vfm=vfm_weights, sam=sam_weights, sd=sd_weights),
    )
    explicit = given(short_side=short_side, stride=stride, vfm=value(vfm), sam=value(sam), layers=parse_layers(layers),
                     combine=value(combine) if value(combine) != "mean" else None, pamr=pamr,
                     coarse_thresh=coarse_thresh, sd_threshold=sd_threshold,
                     prob_thd=threshold if bg else None, no_sam=no_sam or None)
    warn_random(value(models))
    failures = run_segment(paths, class_list, bg, cfg, out_dir, console=console, out=out,
                           record_config=config_record(ctx), explicit=explicit)
    if failures:
        fail(f"{failures} of {len(paths)} images could not be segmented (see above)", code=1)
