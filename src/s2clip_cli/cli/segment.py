"""`s2clip segment`: parsing only; the work is in `commands/segment.py`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..config import RefineConfig
from .common import (
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
from .methods import (
    InstanceMasksOpt,
    MaskPointsOpt,
    MethodClipOpt,
    MethodOpt,
    MethodSamOpt,
    MethodVfmOpt,
    PamrOpt,
    given,
)


def refine_config(sam_impl: str, no_cca: bool, no_box: bool, no_mask: bool, no_point: bool,
                  **thresholds: float) -> RefineConfig:
    """The SAM refinement settings of `segment` and `eval` (thresholds at their defaults unless given)."""
    return RefineConfig(impl=value(sam_impl), use_cca=not no_cca, use_box=not no_box, use_mask=not no_mask,
                        use_point=not no_point, **thresholds)


@user_errors
def segment(
    ctx: typer.Context,
    images: Annotated[list[str], typer.Argument(
        help="Images and videos (.mp4/.mov/.avi/.mkv): files, folders, quoted glob patterns ('photos/**/*.jpg') "
             "or @list.txt (one path a line, relative to the list's folder).", show_default=False)],
    classes: Annotated[str, typer.Option("--classes", "-c", help="Comma list (cat,dog; puppy) or @file.txt "
                                         "(one class per line, synonyms separated by '; ').")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("s2clip-out"),
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Folders: their sub-folders too (mirrored "
                                            "under the output folder).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo inputs whose outputs exist (by default "
                                            "complete ones are skipped, incomplete ones refused).")] = False,
    output_format: Annotated[str, typer.Option("--format", help="Comma list of outputs: png (mask, overlay, JSON), "
                                               "coco, polygons, masks, yolo, labelstudio, cvat.")] = "png",
    polygon_tolerance: Annotated[float, typer.Option(help="polygons/yolo: largest distance (pixels) between a "
                                                     "simplified polygon and the mask's boundary (0: exact).",
                                                     min=0.0)] = 1.0,
    batch: Annotated[int, typer.Option("--batch", help="Images (or video frames) whose windows share the "
                                       "forward passes.", min=1)] = 1,
    every: Annotated[int, typer.Option("--every", help="Videos: segment every N-th frame.", min=1)] = 1,
    background: Annotated[str | None, typer.Option(help="Background names separated by '; ' "
                                                   "(default: a built-in list of stuff names).")] = None,
    no_background: Annotated[bool, typer.Option("--no-background", help="No background class.")] = False,
    method: MethodOpt = "s2clip",
    threshold: Annotated[float | None, typer.Option(help="Pixels whose top probability is under this fall to "
                                                    "background (default 0.2; CLIPer 0).")] = None,
    clip: MethodClipOpt = None,
    vfm: MethodVfmOpt = None,
    instance_masks: InstanceMasksOpt = None,
    mask_points: MaskPointsOpt = None,
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
    sam2_weights: WeightsOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Label every pixel of IMAGES with one of --classes; writes mask, overlay and JSON per image
    (skipping images whose outputs exist), frame masks and an overlay video per video. Under
    torchrun, each rank segments its share of the inputs on its own device."""
    from ..commands.segment import SegmentOptions, background_names, check_export_classes, run_segment
    from ..data.class_names import parse_class_list
    from ..io.files import prepare_output_dir
    from ..io.sources import collect_sources
    from ..models.factory import ModelPaths
    from ..pipeline.segmenter import SegmenterConfig

    formats = parse_format_list(output_format)
    class_list = parse_class_list(classes)
    bg = None if no_background else background_names(background, class_list)
    refine = refine_config(sam_impl, no_cca, no_box, no_mask, no_point, min_area=min_area, mask_coeff=mask_coeff,
                           iou_thresh=iou_thresh)
    sources = collect_sources(images, recursive=recursive, skip_dirs=[output])
    check_export_classes(formats, class_list, bg)  # before the output folder is made
    out_dir = prepare_output_dir(output)
    options = SegmentOptions(overwrite=overwrite, batch=batch, every=every, formats=tuple(formats),
                             polygon_tolerance=polygon_tolerance)
    cfg = SegmenterConfig(
        method=value(method), clip=value(clip) or "ViT-B/16", combine=value(combine), prob_thd=0.2 if bg else 0.0,
        window_batch=window_batch, refine=refine, work_resolution="resized", timing=True,
        sd=sd, sd_threshold=0.2, seed=seed,
        precision=value(precision), models=value(models), device=value(device), offline=offline,
        weights=ModelPaths(clip=clip_weights, vfm=vfm_weights, sam=sam_weights, sd=sd_weights, sam2=sam2_weights),
    )
    explicit = given(short_side=short_side, stride=stride, vfm=value(vfm), sam=value(sam), layers=parse_layers(layers),
                     combine=value(combine) if value(combine) != "mean" else None, pamr=pamr,
                     coarse_thresh=coarse_thresh, sd_threshold=sd_threshold,
                     prob_thd=threshold if bg else None, no_sam=no_sam or None, clip=value(clip),
                     instance_masks=str(instance_masks) if instance_masks is not None else None,
                     mask_points=mask_points)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 speaks for the run
    if main:
        warn_random(value(models))
    counts = run_segment(sources, class_list, bg, cfg, out_dir, console=console, out=out, options=options,
                         record_config=config_record(ctx), explicit=explicit)
    if main and (len(sources) > 1 or counts.skipped):
        console.print(counts.summary(), highlight=False, soft_wrap=True)
    if counts.failed:
        if not main:
            raise typer.Exit(1)
        fail(f"{counts.failed} of {len(sources)} inputs could not be segmented (see above)", code=1)


def parse_format_list(text: str) -> list[str]:
    """`--format png,coco` → the format names (`io.export.parse_formats`: unknown, empty or repeated
    names are one-line errors)."""
    from ..io.export import parse_formats

    return parse_formats(text)
