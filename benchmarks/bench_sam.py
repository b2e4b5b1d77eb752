"""Per-stage time of the two SAM refinement implementations (original = Trident's reference,
optimized = batched/folded) with a full-size random-weight SAM ViT-B on synthetic 448x608 coarse
maps with 21 classes (100+ regions above min_area each).

A random SAM predicts IoUs around a narrow band, so the pass share is set by the threshold; three
settings are timed: every prompt passes (iou_thresh -1: worst case for the optimized
implementation, which upscales only passing masks), about half pass (midway between the middle predicted IoUs),
and the preset 0.8 (with random weights nothing passes).

    python benchmarks/bench_sam.py [--samples 3] [--repeats 1] [--device cpu] [--json bench-results/sam.json]
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch
from rich.console import Console
from segment_anything import SamPredictor

from s2clip_cli.models.sam import build_sam
from s2clip_cli.refine.benchmark import benchmark_refinement, report_table, synthetic_refine_inputs
from s2clip_cli.refine.sam_refine import sam_refine


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench-results/sam.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    warnings.warn("SAM ViT-B with random weights: timings only, the masks mean nothing", stacklevel=1)
    torch.manual_seed(args.seed)
    sam = build_sam("vit_b").to(device)
    samples = synthetic_refine_inputs(args.samples, seed=args.seed)
    settings = {"all_pass": -1.0, "half_pass": midpoint_iou(samples, sam, device), "preset_0.8": 0.8}
    console = Console()
    results = {"torch_threads": torch.get_num_threads(), "height": 448, "width": 608, "num_classes": 21,
               "sam": "vit_b (random weights)", "settings": {}}
    for name, thresh in settings.items():
        report = benchmark_refinement(samples, sam, repeats=args.repeats, coarse_thresh=0.2, min_area=225,
                                      mask_coeff=0.005, iou_thresh=thresh)
        results["settings"][name] = report
        console.print(report_table(name, report))
        console.print(f"speed-up components {report['speedup']['components']:.1f}x, refinement excluding the "
                      f"image encoder {report['speedup']['refine_excluding_encoder']:.2f}x; label pixels equal "
                      f"{report['agreement']['label_pixels_equal']:.6f}, max |probs diff| "
                      f"{report['agreement']['max_prob_abs_diff']:.2e}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
