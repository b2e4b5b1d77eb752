"""Driver of `s2clip bench-sam` (Table 4 as a command): time the pipeline without SAM, with the
original refinement and with the optimized one, per stage, on dataset images, a folder or synthetic
input — under the dataset's preset when one is given, and the run's precision."""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from ..data.class_names import preset_class_names
from ..data.datasets import open_dataset
from ..data.presets import DatasetPreset
from ..errors import S2ClipError
from ..io.files import prepare_output_dir, write_json
from ..io.images import collect_images, read_image
from ..models.precision import dtype_name
from ..pipeline.segmenter import Segmenter, SegmenterConfig
from ..profiling import StageTimer
from ..refine.benchmark import benchmark_refinement, report_table, synthetic_refine_inputs
from .evaluate import resolve_data_root, split_background
from .methods import method_config

Sample = tuple[np.ndarray, torch.Tensor, torch.Tensor]


def coarse_sample(seg: Segmenter, image: np.ndarray) -> tuple[Sample, float]:
    """(image, labels [1,H,W], probs [C,H,W]) from the pipeline without SAM (the method's coarse
    maps, PAMR included when it has it), and its seconds."""
    timer = StageTimer(seg.device)
    with timer("no_sam"), torch.no_grad():
        labels, probs = seg.coarse(image, image.shape[:2])
    return (image, labels[None].cpu(), probs.cpu()), timer.times["no_sam"]


def load_bench_inputs(images_dir: Path | None, dataset: str | None, data_root: Path | None, limit: int,
                      classes: list[list[str]] | None
                      ) -> tuple[list[np.ndarray], list[list[str]], list[str] | None, DatasetPreset | None]:
    """Images (at most `limit`), their classes and background names, and the dataset's preset."""
    if dataset is not None:
        ds = open_dataset(dataset, resolve_data_root(dataset, data_root, several=False))
        fg, background = split_background(ds)
        return [ds.load_image(i) for i in range(min(limit, len(ds)))], fg, background, ds.preset
    voc = preset_class_names("voc21")
    fg = classes if classes else voc[1:]
    images = [read_image(p) for p in collect_images([images_dir])[:limit]] if images_dir is not None else []
    return images, fg, voc[0], None


SD_STAGES = ("vae_encode", "unet", "propagate", "sam_encoder", "sam_refine")


def time_sam_sd(seg: Segmenter, samples: list[Sample]) -> dict[str, float]:
    """Median seconds per stage of the seed's "SAM+SD": CLIPer's SD refinement of the coarse maps
    (VAE encode, UNet pass, propagation), then the optimized SAM refinement of its output."""
    per_stage: dict[str, list[float]] = {stage: [] for stage in SD_STAGES}
    for image, _coarse_labels, probs in samples:
        timer = StageTimer(seg.device)
        refined_labels, refined = seg.refine_sd(image, probs.to(seg.device), timer)
        seg.refine(image, refined_labels, refined, timer, impl="optimized")
        for stage in SD_STAGES:
            per_stage[stage].append(timer.times.get(stage, 0.0))
    return {stage: statistics.median(values) for stage, values in per_stage.items()}


def sam_sd_table(medians: dict[str, float]) -> Table:
    table = Table(title="SAM+SD: median seconds per image")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in medians.items():
        table.add_row(stage, f"{seconds:.3f}")
    table.add_row("total (after the pipeline without SAM)", f"{sum(medians.values()):.3f}")
    return table


def run_bench_sam(config: SegmenterConfig, *, classes: list[list[str]], background: list[str] | None,
                  images: list[np.ndarray] | None, synthetic: int | None, preset: DatasetPreset | None = None,
                  seed: int = 0, repeats: int = 1, iou_thresh: float = 0.8, json_path: Path | None = None,
                  console: Console | None = None, record_config: dict[str, Any] | None = None,
                  explicit: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build the models once, then time the three variants; writes JSON when `json_path` is given.

    The coarse maps are `config.method`'s, under its protocol on `preset` (its own defaults without
    one), with `explicit` options on top; SAM is always loaded (it is what is timed)."""
    console = console or Console(stderr=True)
    if config.sam is None:
        raise S2ClipError("bench-sam needs a SAM model (drop --no-sam)")
    sam = config.sam
    config = method_config(config, config.method, preset, {**(explicit or {}), "sam": sam})
    if json_path is not None:
        prepare_output_dir(json_path.parent)  # fail now, not after the benchmark
    with console.status("loading models…"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        seg = Segmenter.build(config, classes, background)
    if synthetic:
        samples = synthetic_refine_inputs(synthetic, seed=seed, num_classes=max(2, seg.queries.num_classes))
        pipeline_times = [coarse_sample(seg, image)[1] for image, _, _ in samples]
        source = f"synthetic ({synthetic} images, seed {seed}, their own coarse maps)"
    else:
        if not images:
            raise S2ClipError("no images to benchmark")
        samples, pipeline_times = [], []
        for image in images:
            sample, seconds = coarse_sample(seg, image)
            samples.append(sample)
            pipeline_times.append(seconds)
        source = f"{len(images)} images" + (f" of {preset.name} (its preset)" if preset else "")
    rc = seg.config.refine
    with console.status("timing the original and optimized SAM refinement…"):
        report = benchmark_refinement(samples, seg.models.sam, repeats=repeats, encoder_dtype=seg.sam_dtype,
                                      coarse_thresh=rc.coarse_thresh, min_area=rc.min_area,
                                      mask_coeff=rc.mask_coeff, iou_thresh=iou_thresh, use_cca=rc.use_cca,
                                      use_box=rc.use_box, use_mask=rc.use_mask, use_point=rc.use_point)
    no_sam = statistics.median(pipeline_times)
    med = report["median"]
    totals = {"no_sam": no_sam, **{impl: no_sam + med[impl]["set_image"] + med[impl]["refine_total"]
                                   for impl in med}}
    console.print(report_table(f"SAM refinement, {source}", report))
    if seg.config.sd:
        with console.status("timing SD refinement + optimized SAM…"):
            report["sam_sd"] = time_sam_sd(seg, samples)
        totals["sam_sd"] = no_sam + sum(report["sam_sd"].values())
        console.print(sam_sd_table(report["sam_sd"]))
    for name, seconds in totals.items():
        console.print(f"pipeline {name}: {seconds:.3f} s/image (median)")
    if "speedup" in report:
        sp, ag = report["speedup"], report["agreement"]
        console.print(f"optimized vs original: components {sp['components']:.1f}x, refinement excluding the image "
                      f"encoder {sp['refine_excluding_encoder']:.2f}x; equal label pixels "
                      f"{100 * ag['label_pixels_equal']:.4f}%")
    result = {"config": record_config or {}, "method": seg.config.method, "source": source,
              "models": seg.models.mode, "sam": config.sam,
              "device": str(seg.device), "precision": dtype_name(seg.dtype),
              "preset": preset.name if preset else None, "short_side": seg.config.short_side,
              "stride": seg.config.stride, "prob_thd": seg.config.prob_thd, "coarse_thresh": rc.coarse_thresh,
              "iou_thresh": iou_thresh, "pipeline_seconds_per_image": totals, "refinement": report}
    if json_path is not None:
        write_json(json_path, result)
        console.print(f"wrote {json_path}")
    return result
