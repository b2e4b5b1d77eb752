"""The `s2clip` command line: one thin function per command over the library."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .config import RefineConfig
from .errors import S2ClipError

app = typer.Typer(
    name="s2clip",
    help="Training-free open-vocabulary semantic segmentation with frozen CLIP + DINO + SAM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="List, download and verify model weights.", no_args_is_help=True)
app.add_typer(models_app, name="models")

console = Console(stderr=True)
out = Console()


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one line on stderr and a non-zero exit (no traceback).

    Set S2CLIP_DEBUG=1 to see the traceback of unexpected errors."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except S2ClipError as exc:
            _fail(str(exc).replace("\n", " "))
        except KeyboardInterrupt:
            _fail("interrupted", code=130)
        except typer.Exit:
            raise
        except Exception as exc:  # noqa: BLE001 - last resort, keep it to one line
            if os.environ.get("S2CLIP_DEBUG"):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            _fail(f"unexpected {type(exc).__name__}: {first} (set S2CLIP_DEBUG=1 for the traceback)", code=1)

    return wrapper


def _warn_random(mode: str) -> None:
    if mode != "real":
        from .models.factory import random_warning

        console.print(f"[bold yellow]warning:[/] {random_warning(mode)}", highlight=False)


# Options shared by the commands that build models.
ClipOpt = Annotated[str, typer.Option("--clip", help="CLIP backbone: ViT-B/16, ViT-L/14 or ViT-H/14.")]
VfmOpt = Annotated[str, typer.Option("--vfm", help="VFM for proxy attention: dino_vitb8 (default), dino_vitb16, "
                                     "dino_vits8, dino_vits16, dinov2_vits14, dinov2_vitb14, sam_vitb16.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
ModelsOpt = Annotated[str, typer.Option("--models", help="real (checkpoints), tiny (small random, for tests) "
                                        "or random (full-size random, for timing).")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never download weights (also S2CLIP_OFFLINE=1).")]
LayersOpt = Annotated[str | None, typer.Option("--layers", help="CLIP layers to fuse, e.g. 6,8,10 or 6-10 "
                                               "(default: the deeper half, 6-10 for ViT-B/16).")]
CombineOpt = Annotated[str, typer.Option("--combine", help="How per-layer predictions combine: mean or entropy.")]
WeightsOpt = Annotated[Path | None, typer.Option(help="Explicit checkpoint file (overrides the search).")]
NoSamOpt = Annotated[bool, typer.Option("--no-sam", help="Skip the SAM post-processing.")]
SamOpt = Annotated[str, typer.Option(help="SAM model for post-processing: vit_b, vit_l or vit_h.")]
SamImplOpt = Annotated[str, typer.Option(help="SAM refinement implementation: optimized or original.")]
NoCcaOpt = Annotated[bool, typer.Option("--no-cca", help="Ablation: one prompt per class.")]
NoBoxOpt = Annotated[bool, typer.Option("--no-box", help="Ablation: no box prompts.")]
NoMaskOpt = Annotated[bool, typer.Option("--no-mask", help="Ablation: no mask prompts.")]
NoPointOpt = Annotated[bool, typer.Option("--no-point", help="Ablation: no point prompts.")]


def refine_config(sam_impl: str, no_cca: bool, no_box: bool, no_mask: bool, no_point: bool,
                  **thresholds: Any) -> RefineConfig:
    """The SAM refinement settings of `segment` and `eval` (thresholds left at their defaults unless given)."""
    if sam_impl not in ("optimized", "original"):
        raise S2ClipError(f"unknown --sam-impl {sam_impl!r}: use optimized or original")
    return RefineConfig(impl=sam_impl, use_cca=not no_cca, use_box=not no_box, use_mask=not no_mask,
                        use_point=not no_point, **thresholds)


def parse_layers(spec: str | None) -> list[int] | None:
    """`6,8,10` or `6-10` (or a mix) → sorted unique layer indices."""
    if spec is None or not spec.strip():
        return None
    layers: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                layers.update(range(lo, hi + 1))
            else:
                layers.add(int(part))
    except ValueError:
        raise S2ClipError(f"bad --layers {spec!r}: use a comma list like 6,8,10 or a range like 6-10") from None
    if any(layer < 0 for layer in layers):
        raise S2ClipError(f"bad --layers {spec!r}: layers are non-negative block indices")
    return sorted(layers)


# ---------------------------------------------------------------------------------------------- segment
@app.command()
@user_errors
def segment(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.")],
    classes: Annotated[str, typer.Option("--classes", "-c", help="Comma list (cat,dog; puppy) or @file.txt "
                                         "(one class per line, synonyms separated by '; ').")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("s2clip-out"),
    background: Annotated[str | None, typer.Option(help="Background names separated by '; ' "
                                                   "(default: a built-in list of stuff names).")] = None,
    no_background: Annotated[bool, typer.Option("--no-background", help="No background class.")] = False,
    threshold: Annotated[float, typer.Option(help="Pixels whose top probability is under this fall to "
                                             "background.")] = 0.2,
    clip: ClipOpt = "ViT-B/16",
    vfm: VfmOpt = "dino_vitb8",
    layers: LayersOpt = None,
    combine: CombineOpt = "mean",
    no_sam: NoSamOpt = False,
    sam: SamOpt = "vit_b",
    sam_impl: SamImplOpt = "optimized",
    no_cca: NoCcaOpt = False,
    no_box: NoBoxOpt = False,
    no_mask: NoMaskOpt = False,
    no_point: NoPointOpt = False,
    coarse_thresh: Annotated[float, typer.Option(help="SAM refinement: coarse probability threshold.")] = 0.2,
    iou_thresh: Annotated[float, typer.Option(help="SAM refinement: predicted-IoU threshold.")] = 0.8,
    min_area: Annotated[int, typer.Option(help="SAM refinement: minimal region area (pixels, at half "
                                          "resolution).")] = 225,
    mask_coeff: Annotated[float, typer.Option(help="SAM refinement: mask prompt coefficient.")] = 0.005,
    short_side: Annotated[int, typer.Option(help="Resize so the short side is this (long side ≤ 2048).")] = 448,
    stride: Annotated[int, typer.Option(help="Sliding-window stride (crop 336).")] = 112,
    window_batch: Annotated[int, typer.Option(help="Windows per forward pass (memory bound).")] = 4,
    device: DeviceOpt = "auto",
    models: ModelsOpt = "real",
    offline: OfflineOpt = False,
    clip_weights: WeightsOpt = None,
    vfm_weights: WeightsOpt = None,
    sam_weights: WeightsOpt = None,
) -> None:
    """Label every pixel of IMAGES with one of --classes; writes mask, overlay and JSON per image."""
    from .config import DEFAULT_BACKGROUND
    from .data.class_names import parse_class_list
    from .io.files import prepare_output_dir
    from .io.images import collect_images
    from .models.factory import ModelPaths
    from .pipeline.segmenter import SegmenterConfig
    from .segment_run import run_segment

    class_list = parse_class_list(classes)
    bg: list[str] | None = None
    if not no_background:
        bg_spec = DEFAULT_BACKGROUND if background is None else background
        bg = [name.strip() for name in bg_spec.split(";") if name.strip()]
        if not bg:
            raise S2ClipError("--background is empty: give names separated by '; ' or use --no-background")
        fg_names = {n.lower() for names in class_list for n in names}
        bg = [name for name in bg if name.lower() not in fg_names]  # a named class wins over background
    refine = refine_config(sam_impl, no_cca, no_box, no_mask, no_point, coarse_thresh=coarse_thresh,
                           min_area=min_area, mask_coeff=mask_coeff, iou_thresh=iou_thresh)
    paths = collect_images(images)
    out_dir = prepare_output_dir(output)
    cfg = SegmenterConfig(
        clip=clip, vfm=vfm, sam=None if no_sam else sam, layers=parse_layers(layers), combine=combine,
        short_side=short_side, stride=stride, prob_thd=threshold if bg else 0.0, window_batch=window_batch,
        work_resolution="resized", timing=True,
        refine=refine,
        models=models, device=device, offline=offline,
        weights=ModelPaths(clip=clip_weights, vfm=vfm_weights, sam=sam_weights),
    )
    _warn_random(models)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        failures = run_segment(paths, class_list, bg, cfg, out_dir, console=console, out=out)
    if failures:
        _fail(f"{failures} of {len(paths)} images could not be segmented (see above)", code=1)


# ---------------------------------------------------------------------------------------------- eval
@app.command("eval")
@user_errors
def eval_command(
    dataset: Annotated[str | None, typer.Option(help="Preset (voc21, voc20, context60, context59, coco_object, "
                                                "coco_stuff164k, cityscapes, ade20k), a comma list, or all.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Dataset folder in its MMSegmentation layout (with "
                                                   "--dataset all: the folder holding every dataset).")] = None,
    images: Annotated[Path | None, typer.Option(help="Generic dataset: folder of images.")] = None,
    masks: Annotated[Path | None, typer.Option(help="Generic dataset: folder of label PNGs (same stems).")] = None,
    class_names: Annotated[Path | None, typer.Option(help="Generic dataset: class-name file.")] = None,
    reduce_zero_label: Annotated[bool, typer.Option(help="Generic dataset: label 0 is ignored, k -> k-1.")] = False,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N images only.")] = None,
    work_dir: Annotated[Path, typer.Option(help="Results and resumable per-image records.")] = Path("runs/eval"),
    save_preds: Annotated[bool, typer.Option("--save-preds", help="Write palette PNGs of predictions.")] = False,
    list_datasets: Annotated[bool, typer.Option("--list-datasets", help="Print the preset table and exit.")] = False,
    no_sam: NoSamOpt = False,
    sam: SamOpt = "vit_b",
    sam_impl: SamImplOpt = "optimized",
    no_cca: NoCcaOpt = False,
    no_box: NoBoxOpt = False,
    no_mask: NoMaskOpt = False,
    no_point: NoPointOpt = False,
    clip: ClipOpt = "ViT-B/16",
    vfm: VfmOpt = "dino_vitb8",
    layers: LayersOpt = None,
    combine: CombineOpt = "mean",
    window_batch: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    num_workers: Annotated[int, typer.Option(help="Image-decoding worker processes.")] = 2,
    device: DeviceOpt = "auto",
    models: ModelsOpt = "real",
    offline: OfflineOpt = False,
    clip_weights: WeightsOpt = None,
    vfm_weights: WeightsOpt = None,
    sam_weights: WeightsOpt = None,
) -> None:
    """Evaluate on a benchmark (mIoU, mAcc, aAcc); resumable; shards across ranks under torchrun."""
    from .evaluation.eval_run import check_dataset_names, presets_table, run_eval
    from .models.factory import ModelPaths
    from .pipeline.segmenter import SegmenterConfig

    if list_datasets:
        out.print(presets_table())
        return
    names = check_dataset_names(dataset, images)
    if names != ["custom"] and data_root is None:
        raise S2ClipError("--data-root is required with --dataset")
    refine = refine_config(sam_impl, no_cca, no_box, no_mask, no_point)
    base = SegmenterConfig(
        clip=clip, vfm=vfm, sam=None if no_sam else sam, layers=parse_layers(layers), combine=combine,
        window_batch=window_batch,
        refine=refine,
        models=models, device=device, offline=offline,
        weights=ModelPaths(clip=clip_weights, vfm=vfm_weights, sam=sam_weights),
    )
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        _warn_random(models)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        results = run_eval(names, data_root, base, work_dir=work_dir, limit=limit, save_preds=save_preds,
                           num_workers=num_workers, images=images, masks=masks, class_names=class_names,
                           reduce_zero_label=reduce_zero_label, console=console)
    if rank == 0:
        for name, res in zip(names, results, strict=True):
            s = res["summary"]
            out.print(f"{name}: mIoU {s['mIoU']:.2f}  mAcc {s['mAcc']:.2f}  aAcc {s['aAcc']:.2f}  "
                      f"({res.get('num_images', '?')} images) -> {work_dir}", highlight=False)


# ---------------------------------------------------------------------------------------------- bench-sam
@app.command("bench-sam")
@user_errors
def bench_sam(
    dataset: Annotated[str | None, typer.Option(help="Benchmark preset to take images (and classes) from.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="The dataset's folder.")] = None,
    images: Annotated[Path | None, typer.Option(help="A folder of images instead of a dataset.")] = None,
    synthetic: Annotated[int | None, typer.Option(help="N generated images with coarse maps (fixed seed).")] = None,
    classes: Annotated[str | None, typer.Option(help="Classes for --images/--synthetic (default: VOC's 20).")] = None,
    limit: Annotated[int, typer.Option(help="At most this many images.")] = 5,
    repeats: Annotated[int, typer.Option(help="Timed repeats per image.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed for --synthetic.")] = 0,
    iou_thresh: Annotated[float, typer.Option(help="Predicted-IoU threshold.")] = 0.8,
    sam: SamOpt = "vit_b",
    json_out: Annotated[Path, typer.Option("--json", help="Where to write the JSON report.")] = Path(
        "bench-results/bench-sam.json"),
    clip: ClipOpt = "ViT-B/16",
    vfm: VfmOpt = "dino_vitb8",
    device: DeviceOpt = "auto",
    models: ModelsOpt = "real",
    offline: OfflineOpt = False,
    clip_weights: WeightsOpt = None,
    vfm_weights: WeightsOpt = None,
    sam_weights: WeightsOpt = None,
) -> None:
    """Time the pipeline without SAM, with the original and with the optimized SAM refinement (Table 4)."""
    from .data.class_names import parse_class_list, preset_class_names
    from .models.factory import ModelPaths
    from .pipeline.segmenter import SegmenterConfig
    from .refine.bench_command import load_bench_images, run_bench_sam

    given = [x is not None for x in (dataset, images, synthetic)]
    if sum(given) != 1:
        raise S2ClipError("give exactly one of --dataset (with --data-root), --images DIR or --synthetic N")
    if dataset is not None and data_root is None:
        raise S2ClipError("--data-root is required with --dataset")
    loaded, ds_classes, ds_background = load_bench_images(images, dataset, data_root, limit)
    if ds_classes is None:
        voc = preset_class_names("voc21")
        ds_classes = parse_class_list(classes) if classes else voc[1:]
        ds_background = voc[0]
    cfg = SegmenterConfig(clip=clip, vfm=vfm, sam=sam, models=models, device=device, offline=offline,
                          weights=ModelPaths(clip=clip_weights, vfm=vfm_weights, sam=sam_weights))
    _warn_random(models)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        run_bench_sam(cfg, classes=ds_classes, background=ds_background, images=loaded, synthetic=synthetic,
                      seed=seed, repeats=repeats, iou_thresh=iou_thresh, json_path=json_out, console=out)


# ---------------------------------------------------------------------------------------------- analyses
def _dataset_list(dataset: str | None) -> list[str]:
    from .evaluation.eval_run import check_dataset_names

    names = check_dataset_names(dataset, Path(".")) if dataset else []
    if "custom" in names:
        raise S2ClipError("analyses take benchmark presets (or --images for entropy)")
    return names


@app.command()
@user_errors
def entropy(
    backbone: Annotated[str, typer.Option(help="CLIP backbone: ViT-B/16, ViT-L/14 or ViT-H/14.")] = "ViT-B/16",
    dataset: Annotated[str | None, typer.Option(help="Preset(s), comma-separated, or all.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Dataset folder (with several: their parent).")] = None,
    images: Annotated[Path | None, typer.Option(help="A folder of images instead of a dataset.")] = None,
    limit: Annotated[int | None, typer.Option(help="At most N images per dataset.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where JSON, CSV and the heatmap go.")] = Path("runs/entropy"),
    device: DeviceOpt = "auto",
    models: ModelsOpt = "real",
    offline: OfflineOpt = False,
    clip_weights: WeightsOpt = None,
) -> None:
    """Spatial entropy, Gini and channel correlation of every CLIP layer's token map (Algorithm 1, Fig. 4)."""
    from .analysis.drivers import run_entropy

    names = _dataset_list(dataset)
    if not names and images is None:
        raise S2ClipError("give --dataset NAME --data-root DIR, or --images DIR")
    if names and data_root is None:
        raise S2ClipError("--data-root is required with --dataset")
    _warn_random(models)
    run_entropy(backbone, names, data_root, images_dir=images, limit=limit, out_dir=out_dir, models=models,
                device=device, offline=offline, weights=clip_weights, console=out)


@app.command()
@user_errors
def ap(
    dataset: Annotated[str, typer.Option(help="Preset(s), comma-separated, or all.")],
    data_root: Annotated[Path, typer.Option(help="Dataset folder (with several: their parent).")],
    sources: Annotated[str | None, typer.Option(help="Feature sources, e.g. clip:0-10,dino_vitb8,dinov2_vitb14,"
                                                "sam_vitb16 (the default, with the backbone's layers).")] = None,
    backbone: Annotated[str, typer.Option(help="CLIP backbone for clip:N sources.")] = "ViT-B/16",
    pairs: Annotated[int, typer.Option(help="Patch pairs sampled per image and source.")] = 2000,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    limit: Annotated[int | None, typer.Option(help="At most N images per dataset.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where JSON and the PR curves go.")] = Path("runs/ap"),
    device: DeviceOpt = "auto",
    models: ModelsOpt = "real",
    offline: OfflineOpt = False,
) -> None:
    """Average precision of patch-feature similarity for "same class" per source (Fig. 3)."""
    from .analysis.drivers import run_ap

    _warn_random(models)
    run_ap(_dataset_list(dataset), data_root, sources=sources, backbone=backbone, pairs=pairs, seed=seed,
           limit=limit, out_dir=out_dir, models=models, device=device, offline=offline, console=out)


# ---------------------------------------------------------------------------------------------- models
@models_app.command("list")
@user_errors
def models_list() -> None:
    """Every known model: family, source, expected file, and whether it is found."""
    from rich.table import Table

    from .models.registry import ALL_SPECS
    from .models.weights import locate, weights_dir

    table = Table(title=f"s2clip models (weights dir: {weights_dir()})")
    for col in ("name", "family", "source", "expected file", "found"):
        table.add_column(col)
    for spec in ALL_SPECS.values():
        found = locate(spec)
        status = f"[green]yes[/] ({found.where}: {found.path})" if found.path else "[red]no[/]"
        table.add_row(spec.name, spec.family, spec.source, spec.filename, status)
    out.print(table)


@models_app.command("download")
@user_errors
def models_download(names: Annotated[list[str], typer.Argument(help="Model names (see `s2clip models list`).")]) -> None:
    """Download weights (to the Hugging Face cache or the s2clip weights dir)."""
    from .models.registry import any_spec
    from .models.weights import download, is_offline, locate

    specs = [any_spec(name) for name in names]
    if is_offline():
        raise S2ClipError("offline mode is on (S2CLIP_OFFLINE / HF_HUB_OFFLINE): nothing can be downloaded")
    for spec in specs:
        found = locate(spec)
        if found.path is not None:
            out.print(f"{spec.name}: already present at {found.path}")
            continue
        with console.status(f"downloading {spec.name}…"):
            path = download(spec)
        out.print(f"{spec.name}: {path}")


@models_app.command("verify")
@user_errors
def models_verify(names: Annotated[list[str] | None, typer.Argument(help="Models to check (default: all found).")] = None) -> None:
    """Check that weight files are present and load into their architectures."""
    from .models.registry import ALL_SPECS, any_spec
    from .models.verify import verify_spec
    from .models.weights import locate

    specs = [any_spec(n) for n in names] if names else [s for s in ALL_SPECS.values() if locate(s).path]
    if not specs:
        raise S2ClipError("no weights found to verify; see `s2clip models list`")
    bad = 0
    for spec in specs:
        try:
            path = verify_spec(spec)
            out.print(f"[green]ok[/]   {spec.name}: {path}")
        except S2ClipError as exc:
            bad += 1
            console.print(f"[red]fail[/] {spec.name}: {exc}", highlight=False)
    if bad:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrokenPipeError:  # pragma: no cover - e.g. `s2clip models list | head`
        sys.stderr.close()


if __name__ == "__main__":  # pragma: no cover
    main()
