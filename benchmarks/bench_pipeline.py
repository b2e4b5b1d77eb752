"""Per-stage time of `segment` (no SAM) on one 448x608 image with full-size random-weight
ViT-B/16 + DINO ViT-B/8 on this machine, and the achieved FLOP rate of each backbone stage as a
fraction of a plain large matmul's rate measured in the same run.

    python benchmarks/bench_pipeline.py [--repeats 3] [--device cpu] [--json bench-results/pipeline.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.utils.flop_counter import FlopCounterMode

from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig
from s2clip_cli.profiling import StageTimer


def matmul_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a plain n x n float32 matmul (best of `repeats`)."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=Path("bench-results/pipeline.json"))
    args = parser.parse_args()
    console = Console()
    warnings.simplefilter("ignore", UserWarning)

    cfg = SegmenterConfig(models="random", sam=None, device=args.device, window_batch=8)
    with console.status("building full-size random ViT-B/16 + DINO ViT-B/8…"):
        seg = Segmenter.build(cfg, [["cat"], ["dog"], ["person"]], ["sky", "wall"])
    device = seg.device
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(448, 608, 3), dtype=np.uint8)

    seg(image, refine=False)  # warm-up
    runs: list[dict[str, float]] = []
    totals = []
    for _ in range(args.repeats):
        timer = StageTimer(device)
        start = time.perf_counter()
        with torch.no_grad():
            logits = seg.predict_logits(image, timer)
            with timer("classify"):
                seg.classify(logits, image.shape[:2])
        totals.append(time.perf_counter() - start)
        runs.append(timer.times)
    stages = {k: statistics.median(r[k] for r in runs) for k in runs[0]}

    # FLOPs of the backbone stages over all windows of the image (the same batches as above).
    crops = torch.cat([batch.crops for batch in seg.windows(seg.prepare(image))])  # the pipeline's windows
    boxes = list(range(crops.shape[0]))
    clip, vfm, head = seg.models.clip, seg.models.vfm, seg.head
    with torch.no_grad():
        vfm_in, clip_in = head._vfm_input(crops), head._clip_input(crops)
        flops = {
            "vfm": count_flops(lambda: vfm(vfm_in)),
            "clip": count_flops(lambda: clip.residual_streams(clip_in, seg.layers)),
        }
        feats = vfm(vfm_in)
        streams = clip.residual_streams(clip_in, seg.layers)
        flops["fusion"] = count_flops(lambda: head._fuse(feats.float(), streams.streams, streams.grid))
    peak = matmul_rate(device)

    table = Table(title=f"s2clip segment, 448x608, {len(boxes)} windows, ViT-B/16 + DINO ViT-B/8 (random), "
                  f"{device}, {torch.get_num_threads()} threads")
    for col in ("stage", "median s", "GFLOP", "GFLOP/s", "fraction of matmul rate"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    report: dict[str, dict] = {}
    for name, seconds in stages.items():
        f = flops.get(name)
        rate = f / seconds if f else None
        report[name] = {"seconds": seconds, "gflop": f / 1e9 if f else None,
                        "gflops_per_s": rate / 1e9 if rate else None,
                        "fraction_of_matmul": rate / peak if rate else None}
        table.add_row(name, f"{seconds:.3f}", f"{f / 1e9:.1f}" if f else "-",
                      f"{rate / 1e9:.1f}" if rate else "-", f"{rate / peak:.2f}" if rate else "-")
    total = statistics.median(totals)
    table.add_row("total", f"{total:.3f}", f"{sum(flops.values()) / 1e9:.1f}",
                  f"{sum(flops.values()) / total / 1e9:.1f}", f"{sum(flops.values()) / total / peak:.2f}")
    console.print(table)
    console.print(f"plain 2048x2048 float32 matmul: {peak / 1e9:.1f} GFLOP/s")
    result = {"image": [448, 608], "windows": len(boxes), "device": str(device),
              "threads": torch.get_num_threads(), "matmul_gflops_per_s": peak / 1e9,
              "total_seconds": total, "stages": report}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
