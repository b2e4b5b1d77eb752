"""Per-stage time of the SAM refinement implementations with a full-size random-weight SAM ViT-B
on synthetic 448x608 coarse maps with 21 classes (100+ regions above min_area each):
``original`` (Trident's reference, one `predict_torch` call per class), ``optimized`` with SAM's
own `MaskDecoder` batched across classes (``decoder="sam"``, the default) and ``optimized`` with
the hand-folded decoder (``decoder="fast"``), all in the same run.

A random SAM predicts IoUs around a narrow band, so the pass share is set by the threshold; three
settings are timed: every prompt passes (iou_thresh -1: worst case for the optimized
implementation, which upscales only passing masks), about half pass (midway between the middle
predicted IoUs), and the preset 0.8 (with random weights nothing passes).

    python benchmarks/bench_sam.py [--samples 3] [--repeats 1] [--device cpu] [--threads N]
                                   [--json bench-results/sam.json]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from segment_anything import SamPredictor

from s2clip_cli.models.sam import build_sam
from s2clip_cli.refine.benchmark import benchmark_refinement, report_table, synthetic_refine_inputs
from s2clip_cli.refine.sam_refine import sam_refine

COLUMNS = ("original", "optimized/sam", "optimized/fast")


def midpoint_iou(samples, sam, device: torch.device) -> float:
    """A threshold about half the first sample's prompts pass: midway between the two middle
    predicted IoUs (all prompts pass at -1), so that no prediction sits on it."""
    image, labels, probs = samples[0]
    predictor = SamPredictor(sam)
    with torch.no_grad():
        predictor.set_image(image)
    result = sam_refine(image, labels.to(device), probs.to(device), probs.shape[0], predictor, iou_thresh=-1.0)
    ious = sorted(result.scores.float().tolist())
    mid = len(ious) // 2
    return (ious[mid - 1] + ious[mid]) / 2


def run_setting(samples, sam, repeats: int, iou_thresh: float) -> dict[str, Any]:
    """Medians per stage of the three columns, speed-ups over the original, label agreement."""
    config = {"coarse_thresh": 0.2, "min_area": 225, "mask_coeff": 0.005, "iou_thresh": iou_thresh}
    with_sam = benchmark_refinement(samples, sam, impls=("original", "optimized"), repeats=repeats,
                                    decoder="sam", **config)
    with_fast = benchmark_refinement(samples, sam, impls=("optimized",), repeats=repeats, decoder="fast", **config)
    median = {"original": with_sam["median"]["original"], "optimized/sam": with_sam["median"]["optimized"],
              "optimized/fast": with_fast["median"]["optimized"]}
    speedup = {column: {stage: median["original"][stage] / max(median[column][stage], 1e-9)
                        for stage in ("components", "decode", "refine_total")} for column in COLUMNS[1:]}
    speedup["fast_over_sam"] = {stage: median["optimized/sam"][stage] / max(median["optimized/fast"][stage], 1e-9)
                                for stage in ("decode", "refine_total")}
    return {"config": config, "median": median, "speedup": speedup, "agreement_original_vs_sam": with_sam["agreement"],
            "samples": with_sam["samples"], "device": with_sam["device"]}


def table(name: str, result: dict[str, Any]) -> Table:
    """`report_table`'s stages per column, plus the speed-ups over the original."""
    t = report_table(name, result)
    for stage in ("components", "decode", "refine_total"):
        t.add_row(f"speed-up {stage}", "1.00", *(f"{result['speedup'][c][stage]:.2f}" for c in COLUMNS[1:]))
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/sam.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.warn("SAM ViT-B with random weights: timings only, the masks mean nothing", stacklevel=1)
    torch.manual_seed(args.seed)
    sam = build_sam("vit_b").to(device)
    samples = synthetic_refine_inputs(args.samples, seed=args.seed)
    settings = {"all_pass": -1.0, "half_pass": midpoint_iou(samples, sam, device), "preset_0.8": 0.8}
    console = Console()
    results = {"torch_threads": torch.get_num_threads(), "height": 448, "width": 608, "num_classes": 21,
               "sam": "vit_b (random weights)", "settings": {}}
    for name, thresh in settings.items():
        result = run_setting(samples, sam, args.repeats, thresh)
        results["settings"][name] = result
        console.print(table(name, result))
        agreement = result["agreement_original_vs_sam"]
        fast = result["speedup"]["fast_over_sam"]
        console.print(f"fast decoder over SAM's: decode {fast['decode']:.2f}x, refinement {fast['refine_total']:.2f}x; "
                      f"original vs optimized/sam: label pixels equal {agreement['label_pixels_equal']:.6f}, "
                      f"max |probs diff| {agreement['max_prob_abs_diff']:.2e}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
