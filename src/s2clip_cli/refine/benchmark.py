"""Timing the two SAM refinement implementations, stage by stage, on synthetic coarse maps."""

from __future__ import annotations

import statistics
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.table import Table
from segment_anything import SamPredictor
from segment_anything.modeling import Sam
from torch import Tensor

from ..models.precision import autocast, dtype_name
from ..profiling import PeakMemory, StageTimer
from .sam_refine import STAGES, sam_refine

Sample = tuple[np.ndarray, Tensor, Tensor]


def synthetic_refine_inputs(n: int, seed: int, height: int = 448, width: int = 608, num_classes: int = 21,
                            *, cell: int = 40, logit_scale: float = 40.0) -> list[Sample]:
    """`n` (image, labels ``[1, H, W]``, probs ``[C, H, W]``) triples with blobby coarse maps.

    Per class, random noise on a grid of `cell`-pixel cells is upsampled bicubically (smooth
    blobs), scaled by `logit_scale` and softmaxed over classes; labels are the argmax. With the
    defaults each 448x608 map has well over 100 regions above 225 pixels at half resolution.
    """
    gen = torch.Generator().manual_seed(seed)
    samples = []
    grid = (max(2, height // cell), max(2, width // cell))
    for _ in range(n):
        noise = torch.randn(1, num_classes, *grid, generator=gen) * 0.1
        logits = F.interpolate(noise, (height, width), mode="bicubic", align_corners=False)[0]
        probs = torch.softmax(logits * logit_scale, dim=0)
        labels = probs.argmax(0, keepdim=True)
        base = torch.randint(0, 256, (3, 1, 1), generator=gen).float()
        colour = (base * 0.5 + probs[:3] * 127).clamp(0, 255)
        image = colour.permute(1, 2, 0).to(torch.uint8).contiguous().numpy()
        samples.append((image, labels, probs))
    return samples


def _timed_set_image(predictor: SamPredictor, image: np.ndarray, encoder_dtype: torch.dtype) -> float:
    """Seconds of SAM's image encoder on `image`, under the run's precision (as the pipeline runs it)."""
    timer = StageTimer(predictor.device)
    with timer("set_image"), torch.no_grad(), autocast(predictor.device, encoder_dtype):
        predictor.set_image(image)
    return timer.times["set_image"]


def _run_one(sample: Sample, predictor: SamPredictor, impl: str, config: dict[str, Any]) -> tuple[dict, Any]:
    image, labels, probs = sample
    timings: dict[str, float] = {}
    device = predictor.device
    labels, probs = labels.to(device), probs.to(device)
    timer = StageTimer(device)
    with PeakMemory(device) as memory, timer("refine_total"):
        result = sam_refine(image, labels, probs, probs.shape[0], predictor, impl=impl, timings=timings, **config)
    timings["refine_total"] = timer.times["refine_total"]
    timings["peak_bytes"] = float(memory.peak_bytes)
    timings["passed"] = float(result.scores.numel())
    return timings, result


def benchmark_refinement(samples: list[Sample], sam_model: Sam, *, impls: tuple[str, ...] = ("original", "optimized"),
                         repeats: int = 1, encoder_dtype: torch.dtype = torch.float32,
                         **config: Any) -> dict[str, Any]:
    """Median seconds per stage for each implementation, speed-ups, peak memory and agreement.

    Stages: ``set_image`` (SAM image encoder), ``downsample`` (steps 1-2), ``components``
    (connected regions, with the one-hot the original builds), ``prompts``, ``decode``,
    ``mapping`` and ``refine_total`` (everything after the image encoder, which runs under
    `encoder_dtype`; the decoding is float32 in both). Peak memory per run: see
    `profiling.PeakMemory`. One untimed warm-up run per implementation comes first.
    Agreement: the share of label pixels equal between the first two implementations.
    """
    predictor = SamPredictor(sam_model)
    per_impl: dict[str, dict[str, list[float]]] = {impl: {} for impl in impls}
    labels_by_impl: dict[str, list[Tensor]] = {impl: [] for impl in impls}
    max_prob_diff = 0.0
    _timed_set_image(predictor, samples[0][0], encoder_dtype)
    for impl in impls:  # warm-up: first calls pay for lazy initialisation
        _run_one(samples[0], predictor, impl, config)
    for sample in samples:
        encoder_time = _timed_set_image(predictor, sample[0], encoder_dtype)
        first_result = None
        for impl in impls:
            for _ in range(repeats):
                timings, result = _run_one(sample, predictor, impl, config)
                timings["set_image"] = encoder_time
                for key, value in timings.items():
                    per_impl[impl].setdefault(key, []).append(value)
            labels_by_impl[impl].append(result.labels.cpu())
            if first_result is None:
                first_result = result
            else:
                diff = (first_result.probs - result.probs).abs().max().item()
                max_prob_diff = max(max_prob_diff, diff)
    report: dict[str, Any] = {"config": config, "samples": len(samples), "repeats": repeats,
                              "device": str(predictor.device),
                              "encoder_precision": dtype_name(encoder_dtype),
                              "peak_memory_method": PeakMemory(predictor.device).method}
    stages = ("set_image", *STAGES, "refine_total", "peak_bytes", "passed")
    report["median"] = {impl: {s: statistics.median(per_impl[impl].get(s, [0.0])) for s in stages}
                        for impl in impls}
    if len(impls) >= 2:
        a, b = impls[0], impls[1]
        med = report["median"]
        report["speedup"] = {
            "components": med[a]["components"] / max(med[b]["components"], 1e-9),
            "refine_excluding_encoder": med[a]["refine_total"] / max(med[b]["refine_total"], 1e-9),
        }
        equal = sum(int((x == y).sum()) for x, y in zip(labels_by_impl[a], labels_by_impl[b], strict=True))
        total = sum(x.numel() for x in labels_by_impl[a])
        report["agreement"] = {"label_pixels_equal": equal / total, "max_prob_abs_diff": max_prob_diff}
    return report


STAGE_ROWS = ("set_image", "downsample", "components", "prompts", "decode", "mapping", "refine_total")


def report_table(name: str, report: dict) -> Table:
    """Rich table of `benchmark_refinement`'s medians, one column per implementation."""
    med = report["median"]
    t = Table(title=f"{name}: median seconds per image ({report['samples']} images, {report['device']})")
    t.add_column("stage")
    for impl in med:
        t.add_column(impl, justify="right")
    for stage in STAGE_ROWS:
        t.add_row(stage, *(f"{med[impl][stage]:.3f}" for impl in med))
    t.add_row("prompts passed", *(f"{med[impl]['passed']:.0f}" for impl in med))
    t.add_row("peak memory (MiB)", *(f"{med[impl]['peak_bytes'] / 2**20:.0f}" for impl in med))
    return t
