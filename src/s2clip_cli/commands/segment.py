"""Driver of `s2clip segment`: segment files and write mask, overlay and JSON per image."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from rich.console import Console

from ..config import DEFAULT_BACKGROUND
from ..errors import S2ClipError
from ..io.files import write_json
from ..io.images import read_image
from ..io.outputs import class_shares, make_palette, save_mask_png, save_overlay
from ..models.precision import dtype_name
from ..pipeline.segmenter import Segmenter, SegmenterConfig
from .inputs import progress_bar
from .methods import method_config


def background_names(spec: str | None, classes: list[list[str]]) -> list[str]:
    """Background names from `--background` ('; '-separated; default: the built-in stuff list),
    minus any name the user asked for as a class (a named class wins over background)."""
    text = DEFAULT_BACKGROUND if spec is None else spec
    names = [name.strip() for name in text.split(";") if name.strip()]
    if not names:
        raise S2ClipError("--background is empty: give names separated by '; ' or use --no-background")
    wanted = {n.lower() for names_ in classes for n in names_}
    return [name for name in names if name.lower() not in wanted]


def output_paths(out_dir: Path, image: Path) -> dict[str, Path]:
    stem = image.stem
    return {
        "mask": out_dir / f"{stem}_mask.png",
        "overlay": out_dir / f"{stem}_overlay.png",
        "json": out_dir / f"{stem}.json",
    }


def _check_unique_stems(paths: list[Path]) -> None:
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise S2ClipError(f"{seen[path.stem]} and {path} would write the same outputs; rename one of them")
        seen[path.stem] = path


def segment_file(seg: Segmenter, path: Path, out_dir: Path, record_config: dict[str, Any] | None = None) -> dict:
    """Segment one image file and write its three outputs atomically; returns the JSON record."""
    image = read_image(path)
    result = seg(image)
    labels = seg.queries.labels
    palette = make_palette(len(labels), seg.queries.has_background)
    targets = output_paths(out_dir, path)
    save_mask_png(targets["mask"], result.labels, palette)
    save_overlay(targets["overlay"], image, result.labels, labels, palette)
    shares = class_shares(result.labels, len(labels))
    record = {
        "image": str(path),
        "size": [int(image.shape[0]), int(image.shape[1])],
        "classes": labels,
        "class_names": seg.queries.class_names,
        "has_background": seg.queries.has_background,
        "pixel_share": {name: round(float(s), 6) for name, s in zip(labels, shares, strict=True)},
        "timings_s": {k: round(v, 4) for k, v in result.timings.items()},
        "config": record_config or {},
        "run": {
            "method": seg.config.method, "clip": seg.config.clip,
            "vfm": seg.config.vfm if seg.method.vfm is not None else None,
            "sam": seg.config.sam if seg.models.sam is not None else None, "sam_prompts": seg.uses_sam_prompts,
            "short_side": seg.config.short_side,
            "windows": "whole image" if seg.config.whole_image else [seg.config.crop, seg.config.stride],
            "logit_scale": seg.config.logit_scale, "pamr": seg.config.pamr,
            "layers": seg.layers, "combine": seg.config.combine, "models": seg.models.mode,
            "device": str(seg.device), "precision": dtype_name(seg.dtype),
            "sam_encoder_precision": dtype_name(seg.sam_dtype),
        },
        "outputs": {k: str(v) for k, v in targets.items()},
    }
    if seg.models.is_random:
        record["warning"] = "randomly initialised models: outputs are meaningless"
    write_json(targets["json"], record)
    return record


def _summary(record: dict, top: int = 4) -> str:
    shares = sorted(record["pixel_share"].items(), key=lambda kv: -kv[1])
    parts = [f"{name} {100 * s:.1f}%" for name, s in shares[:top] if s > 0]
    return ", ".join(parts)


def run_segment(paths: list[Path], classes: list[list[str]], background: list[str] | None,
                config: SegmenterConfig, out_dir: Path, *, console: Console, out: Console,
                record_config: dict[str, Any] | None = None, explicit: dict[str, Any] | None = None) -> int:
    """Segment every path with `config.method` (its own defaults, `explicit` options on top);
    returns the number of images that failed (each reported on one line)."""
    _check_unique_stems(paths)
    config = method_config(config, config.method, None, explicit)
    with console.status("loading models and embedding class names…"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        seg = Segmenter.build(config, classes, background)
    failures = 0
    show_progress = len(paths) > 1
    with progress_bar(console, disable=not show_progress) as progress:
        task = progress.add_task("segmenting", total=len(paths))
        for path in paths:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    record = segment_file(seg, path, out_dir, record_config)
                out.print(f"{path.name} → {record['outputs']['mask']}  ({_summary(record)})", highlight=False)
            except S2ClipError as exc:
                if not show_progress:
                    raise
                failures += 1
                console.print(f"[bold red]error:[/] {exc}", highlight=False)
            progress.advance(task)
    return failures
