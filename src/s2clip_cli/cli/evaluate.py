"""`s2clip eval`: parsing only; the work is in `commands/evaluate.py`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ..errors import S2ClipError
from .common import (
    DATASETS_HELP,
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
    dataset_list,
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
    MethodOrAllOpt,
    MethodSamOpt,
    MethodVfmOpt,
    PamrOpt,
    given,
)
from .segment import refine_config


@user_errors
def eval_command(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option(help=DATASETS_HELP)] = None,
    data_root: Annotated[Path | None, typer.Option(help="Dataset folder in its MMSegmentation layout (several "
                                                   "datasets: the folder holding each in its usual sub-folder; "
                                                   "default: $S2CLIP_DATA_DIR, see `s2clip data list`).")] = None,
    images: Annotated[Path | None, typer.Option(help="Generic dataset: folder of images.")] = None,
    masks: Annotated[Path | None, typer.Option(help="Generic dataset: folder of label PNGs (same stems).")] = None,
    class_names: Annotated[Path | None, typer.Option(help="Generic dataset: class-name file.")] = None,
    reduce_zero_label: Annotated[bool, typer.Option(help="Generic dataset: label 0 is ignored, k -> k-1.")] = False,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N images only.")] = None,
    work_dir: Annotated[Path, typer.Option("--work-dir", "--output", "-o", help="Results and resumable per-image "
                                           "records.")] = Path("runs/eval"),
    save_preds: Annotated[bool, typer.Option("--save-preds", help="Write palette PNGs of predictions.")] = False,
    list_datasets: Annotated[bool, typer.Option("--list-datasets", help="Print the preset table and exit.")] = False,
    method: MethodOrAllOpt = "s2clip",
    short_side: Annotated[int | None, typer.Option(help="Override the protocol's resize (short side).")] = None,
    crop: Annotated[int | None, typer.Option(help="Override the protocol's window size.")] = None,
    stride: Annotated[int | None, typer.Option(help="Override the protocol's window stride.")] = None,
    prob_thd: Annotated[float | None, typer.Option(help="Override the protocol's background probability "
                                                   "threshold.")] = None,
    logit_scale: Annotated[float | None, typer.Option(help="Override the protocol's logit scale.")] = None,
    pamr: PamrOpt = None,
    no_sam: NoSamOpt = False,
    sam: MethodSamOpt = None,
    sam_impl: SamImplOpt = "optimized",
    no_cca: NoCcaOpt = False,
    no_box: NoBoxOpt = False,
    no_mask: NoMaskOpt = False,
    no_point: NoPointOpt = False,
    clip: MethodClipOpt = None,
    vfm: MethodVfmOpt = None,
    instance_masks: InstanceMasksOpt = None,
    mask_points: MaskPointsOpt = None,
    layers: LayersOpt = None,
    combine: CombineOpt = "mean",
    window_batch: WindowBatchOpt = 4,
    sd: SdOpt = False,
    sd_threshold: SdThresholdOpt = None,
    seed: SeedOpt = 0,
    num_workers: Annotated[int, typer.Option(help="Image-decoding worker processes.")] = 2,
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
    """Evaluate on a benchmark (mIoU, mAcc, aAcc); resumable; shards across ranks under torchrun."""
    from ..commands.evaluate import presets_table, run_eval, run_eval_methods
    from ..commands.methods import parse_methods
    from ..models.factory import ModelPaths
    from ..pipeline.segmenter import SegmenterConfig

    if list_datasets:
        out.print(presets_table())
        return
    if dataset is None and images is None:
        raise S2ClipError("give --dataset NAME (see --list-datasets) or --images/--masks/--class-names")
    names = dataset_list(dataset) if dataset is not None else ["custom"]
    methods = parse_methods(value(method))
    base = SegmenterConfig(
        method=methods[0], clip=value(clip) or "ViT-B/16", window_batch=window_batch, sd=sd, seed=seed,
        refine=refine_config(sam_impl, no_cca, no_box, no_mask, no_point),
        precision=value(precision), models=value(models), device=value(device), offline=offline,
        weights=ModelPaths(clip=clip_weights, vfm=vfm_weights, sam=sam_weights, sd=sd_weights, sam2=sam2_weights),
    )
    explicit = given(short_side=short_side, crop=crop, stride=stride, prob_thd=prob_thd, logit_scale=logit_scale,
                     vfm=value(vfm), sam=value(sam), layers=parse_layers(layers),
                     combine=value(combine) if value(combine) != "mean" else None, pamr=pamr, no_sam=no_sam or None,
                     sd_threshold=sd_threshold, clip=value(clip),
                     instance_masks=str(instance_masks) if instance_masks is not None else None,
                     mask_points=mask_points)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        warn_random(value(models))
    common = dict(limit=limit, save_preds=save_preds, num_workers=num_workers, images=images, masks=masks,
                  class_names=class_names, reduce_zero_label=reduce_zero_label, explicit=explicit)
    if len(methods) > 1:
        by_method = run_eval_methods(methods, names, data_root, base, work_dir=work_dir, console=console,
                                     record_config=config_record(ctx), **common)
    else:
        by_method = {methods[0]: run_eval(names, data_root, base, work_dir=work_dir, console=console,
                                          record_config=config_record(ctx), **common)}
    if rank == 0:
        for method_name, results in by_method.items():
            where = work_dir / method_name if len(methods) > 1 else work_dir
            for name, res in zip(names, results, strict=True):
                s = res["summary"]
                label = f"{method_name} {name}" if len(methods) > 1 else name
                out.print(f"{label}: mIoU {s['mIoU']:.2f}  mAcc {s['mAcc']:.2f}  aAcc {s['aAcc']:.2f}  "
                          f"({res.get('num_images', '?')} images) -> {where}", highlight=False, soft_wrap=True)
        if len(methods) > 1:
            out.print(f"comparison -> {work_dir / 'comparison.md'}, {work_dir / 'comparison.json'}", highlight=False,
                      soft_wrap=True)
