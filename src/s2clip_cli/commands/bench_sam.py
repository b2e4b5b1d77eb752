"""`s2clip bench-sam` (Table 4 as a command): time the pipeline without SAM, with the original
refinement and with the optimized one, per stage, on dataset images, a folder or synthetic input."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console

from ..errors import S2ClipError
from ..io.files import write_json
from ..io.images import collect_images, read_image
from ..pipeline.segmenter import Segmenter, SegmenterConfig
from .benchmark import benchmark_refinement, report_table, synthetic_refine_inputs


def _coarse(seg: Segmenter, image: np.ndarray) -> tuple[tuple[np.ndarray, torch.Tensor, torch.Tensor], float]:
    """(image, labels [1,H,W], probs [C,H,W]) from the pipeline without SAM, and its time."""
    start = time.perf_counter()
    with torch.no_grad():
        logits = seg.predict_logits(image)
        labels, probs = seg.classify(logits, image.shape[:2])
    if seg.device.type == "cuda":
        torch.cuda.synchronize(seg.device)
    return (image, labels[None].cpu(), probs.cpu()), time.perf_counter() - start


def run_bench_sam(config: SegmenterConfig, *, classes: list[list[str]], background: list[str] | None,
                  images: list[np.ndarray] | None, synthetic: int | None, seed: int = 0, repeats: int = 1,
                  iou_thresh: float = 0.8, json_path: Path | None = None,
                  console: Console | None = None) -> dict[str, Any]:
    """Build the models once, then time the three variants; writes JSON when `json_path` is given."""
    console = console or Console(stderr=True)
    if config.sam is None:
        raise S2ClipError("bench-sam needs a SAM model (drop --no-sam)")
    with console.status("loading models…"):
        seg = Segmenter.build(config, classes, background)
    if synthetic:
        samples = synthetic_refine_inputs(synthetic, seed=seed, num_classes=max(2, seg.queries.num_classes))
        pipeline_times = [_coarse(seg, image)[1] for image, _, _ in samples]
        source = f"synthetic ({synthetic} images, seed {seed}, their own coarse maps)"
    else:
        if not images:
            raise S2ClipError("no images to benchmark")
        samples, pipeline_times = [], []
        for image in images:
            sample, seconds = _coarse(seg, image)
            samples.append(sample)
            pipeline_times.append(seconds)
        source = f"{len(images)} images"
    rc = seg.config.refine
    with console.status("timing the original and optimized SAM refinement…"):
        report = benchmark_refinement(samples, seg.models.sam, repeats=repeats, coarse_thresh=rc.coarse_thresh,
                                      min_area=rc.min_area, mask_coeff=rc.mask_coeff, iou_thresh=iou_thresh,
                                      use_cca=rc.use_cca, use_box=rc.use_box, use_mask=rc.use_mask,
                                      use_point=rc.use_point)
    no_sam = statistics.median(pipeline_times)
    med = report["median"]
    totals = {"no_sam": no_sam, **{impl: no_sam + med[impl]["set_image"] + med[impl]["refine_total"]
                                   for impl in med}}
    console.print(report_table(f"SAM refinement, {source}", report))
    for name, seconds in totals.items():
        console.print(f"pipeline {name}: {seconds:.3f} s/image (median)")
    if "speedup" in report:
        sp, ag = report["speedup"], report["agreement"]
        console.print(f"optimized vs original: components {sp['components']:.1f}x, refinement excluding the image "
                      f"encoder {sp['refine_excluding_encoder']:.2f}x; equal label pixels "
                      f"{100 * ag['label_pixels_equal']:.4f}%")
    result = {"source": source, "models": seg.models.mode, "sam": config.sam, "device": str(seg.device),
              "iou_thresh": iou_thresh, "pipeline_seconds_per_image": totals, "refinement": report}
    if json_path is not None:
        write_json(json_path, result)
        console.print(f"wrote {json_path}")
    return result


def load_bench_images(images_dir: Path | None, dataset: str | None, data_root: Path | None,
                      limit: int) -> tuple[list[np.ndarray], list[list[str]] | None, list[str] | None]:
    """Images (at most `limit`) and, for a dataset, its classes and background names."""
    if dataset is not None:
        from ..data.datasets import open_dataset
        from ..evaluation.eval_run import split_background

        ds = open_dataset(dataset, data_root)
        classes, background = split_background(ds)
        return [ds.load_image(i) for i in range(min(limit, len(ds)))], classes, background
    if images_dir is not None:
        return [read_image(p) for p in collect_images([images_dir])[:limit]], None, None
    return [], None, None
