"""`s2clip serve`: parsing only; the work is in `commands/serve.py` (needs the ``serve`` extra)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from ..errors import S2ClipError
from .common import (
    ClipOpt,
    CombineOpt,
    ConfigOpt,
    DeviceOpt,
    LayersOpt,
    ModelsOpt,
    NoSamOpt,
    OfflineOpt,
    PrecisionOpt,
    SamImplOpt,
    SdOpt,
    SdThresholdOpt,
    SeedOpt,
    WeightsOpt,
    WindowBatchOpt,
    console,
    parse_layers,
    user_errors,
    value,
    warn_random,
)
from .methods import MethodOpt, MethodSamOpt, MethodVfmOpt, PamrOpt, given


def _method_list(spec: str | None, default: str) -> list[str]:
    from ..commands.methods import METHOD_NAMES, parse_methods

    if spec is None or not spec.strip():
        return [default]
    names = list(METHOD_NAMES) if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    for name in names:
        parse_methods(name)  # an unknown name: one line with the valid ones
    return [default, *(n for n in dict.fromkeys(names) if n != default)]


@user_errors
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", min=1, max=65535)] = 7860,
    method: MethodOpt = "s2clip",
    methods: Annotated[str | None, typer.Option(
        "--methods", help="Methods a request may choose, comma-separated, or all (default: --method only); "
        "their models load at start.")] = None,
    background: Annotated[str | None, typer.Option(help="Default background names separated by '; ' "
                                                   "(default: a built-in list of stuff names).")] = None,
    threshold: Annotated[float | None, typer.Option(help="Pixels whose top probability is under this fall to "
                                                    "background (default 0.2; CLIPer 0).")] = None,
    clip: ClipOpt = "ViT-B/16",
    vfm: MethodVfmOpt = None,
    layers: LayersOpt = None,
    combine: CombineOpt = "mean",
    no_sam: NoSamOpt = False,
    sam: MethodSamOpt = None,
    sam_impl: SamImplOpt = "optimized",
    short_side: Annotated[int | None, typer.Option(help="Resize so the short side is this (default: the "
                                                   "method's, 448 for s2clip).")] = None,
    stride: Annotated[int | None, typer.Option(help="Sliding-window stride (default: the method's).")] = None,
    pamr: PamrOpt = None,
    window_batch: WindowBatchOpt = 4,
    sd: SdOpt = False,
    sd_threshold: SdThresholdOpt = None,
    seed: SeedOpt = 0,
    precision: PrecisionOpt = "auto",
    device: DeviceOpt = "auto",
    devices: Annotated[str | None, typer.Option(
        "--devices", help="One model worker per device, comma-separated (cuda:0,cuda:1; a device may repeat: "
        "cpu,cpu), or all (every visible GPU). Each worker loads its own models; a request runs on whichever "
        "is free. Default: one worker on --device.")] = None,
    models: ModelsOpt = "real",
    offline: OfflineOpt = False,
    clip_weights: WeightsOpt = None,
    vfm_weights: WeightsOpt = None,
    sam_weights: WeightsOpt = None,
    sd_weights: WeightsOpt = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest image upload accepted (MB); refused from its "
                                                 "Content-Length before the body is read.", min=0.01)] = 20.0,
    max_classes: Annotated[int, typer.Option(help="Most classes one request may name.", min=1)] = 50,
    max_megapixels: Annotated[float, typer.Option(help="Largest decoded image (width × height, millions of "
                                                  "pixels).", min=0.01)] = 40.0,
    max_queue: Annotated[int, typer.Option(help="Requests queued for the model at once; more get 503.",
                                           min=1)] = 16,
    cache_size: Annotated[int, typer.Option(help="Class sets (with their text embeddings) kept ready.",
                                            min=1)] = 16,
    read_timeout_s: Annotated[float, typer.Option(help="Seconds a client has to send its request headers; its "
                                                  "body may pause no longer (then 408, connection closed).",
                                                  min=0.1)] = 20.0,
    grace_s: Annotated[float, typer.Option(help="On Ctrl+C/SIGTERM: seconds the running request may take to "
                                           "finish before it is cancelled (503); the server then exits 0.",
                                           min=0.0)] = 1.0,
    keep_downloads_s: Annotated[float, typer.Option(help="Seconds the page's result files (mask PNG, COCO "
                                                    "JSON) and uploads are kept for download.", min=1.0)] = 600.0,
    no_page: Annotated[bool, typer.Option("--no-page", help="Serve the HTTP API only (no web page).")] = False,
    config: ConfigOpt = None,
) -> None:
    """Serve a web page and an HTTP API (POST /segment, GET /health, GET /methods) on loaded models.
    Needs the web extra: pip install 's2clip\\[serve]'. Ctrl+C or SIGTERM stops it (exit 0)."""
    from ..commands.serve import missing_extra

    hint = missing_extra()
    if hint:  # as `fail` prints, but as plain Text: markup would eat the "[serve]"
        console.print(Text.assemble(("error:", "bold red"), " ", hint), highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    from ..commands.serve import run_serve
    from ..commands.serve_service import ServeLimits, ServeSettings
    from ..commands.serve_workers import parse_devices
    from ..models.factory import ModelPaths
    from ..pipeline.segmenter import SegmenterConfig
    from .segment import refine_config

    if devices is not None and value(device) != "auto":
        raise S2ClipError("give --device or --devices, not both (--devices cpu or --devices cuda:0 for one worker)")
    worker_devices = parse_devices(devices) if devices is not None else None  # checked before any model loads
    refine = refine_config(sam_impl, False, False, False, False)
    base = SegmenterConfig(
        method=value(method), clip=value(clip), combine=value(combine), prob_thd=0.2,
        window_batch=window_batch, refine=refine, work_resolution="resized", timing=True,
        sd=sd, sd_threshold=0.2, seed=seed,
        precision=value(precision), models=value(models), device=value(device), offline=offline,
        weights=ModelPaths(clip=clip_weights, vfm=vfm_weights, sam=sam_weights, sd=sd_weights),
    )
    explicit = given(short_side=short_side, stride=stride, vfm=value(vfm), sam=value(sam), layers=parse_layers(layers),
                     combine=value(combine) if value(combine) != "mean" else None, pamr=pamr,
                     sd_threshold=sd_threshold, prob_thd=threshold, no_sam=no_sam or None)
    limits = ServeLimits(max_upload_bytes=int(max_upload_mb * 2**20), max_classes=max_classes,
                         max_pixels=int(max_megapixels * 1e6), max_queue=max_queue, cache_size=cache_size,
                         read_timeout_s=read_timeout_s, grace_s=grace_s, keep_downloads_s=keep_downloads_s)
    settings = ServeSettings(base=base, explicit=explicit, methods=_method_list(methods, value(method)),
                             background=background, sam_name=None if no_sam else value(sam) or "vit_b",
                             limits=limits, devices=worker_devices)
    warn_random(value(models))
    run_serve(settings, host=host, port=port, page=not no_page, console=console)


__all__ = ["serve"]
