"""Per-image time of `--method corrclip` beside s2clip's and ProxyCLIP's on the same image and the
same full-size random-weight ViT-B/16 + DINO ViT-B/8 (each under its VOC21 protocol, SAM prompt
refinement off), and SAM 2 Hiera-L's automatic mask generation (full size, random weights: the same
compute as real weights) at 8 and 32 points per side. All measured in one run, side by side.

    python benchmarks/bench_corrclip.py [--repeats 3] [--device cpu] [--sam2-points 8,32] [--json bench-results/corrclip.json]

CorrCLIP runs with a fixed instance mask (12 regions, as a pre-generated mask file gives it), so its row
is the method alone; the SAM 2 rows are what generating that mask costs (cached per image afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from s2clip_cli.commands.methods import method_config
from s2clip_cli.data.presets import PRESETS
from s2clip_cli.models.factory import load_models
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig
from s2clip_cli.pipeline.text import build_queries
from s2clip_cli.pipeline.transforms import rescale_size
from s2clip_cli.pipeline.windows import sliding_windows

METHODS = ("s2clip", "proxyclip", "corrclip")
QUERIES = build_queries([["cat"], ["dog"], ["person"]], ["sky", "wall"])


class FixedMasks:
    """An in-memory mask source: the same instance mask for every image (a pre-generated file's)."""

    needs_name = False
    identity: dict[str, Any] = {"generator": "fixed"}

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def masks(self, image: np.ndarray, name: str | None = None) -> np.ndarray:
        return self.mask


def instance_mask(h: int, w: int, regions: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = np.zeros((h, w), np.int64)
    for i in range(1, regions + 1):
        y, x = rng.integers(0, h * 3 // 4), rng.integers(0, w * 3 // 4)
        mask[y:y + rng.integers(h // 8, h // 2), x:x + rng.integers(w // 8, w // 2)] = i
    return mask


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", default="375x500", help="image HxW (a VOC-sized photo)")
    parser.add_argument("--sam2-points", default="8,32", help="points per side to time SAM 2 at ('' to skip)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/corrclip.json"))
    args = parser.parse_args()
    console = Console()
    warnings.simplefilter("ignore")
    h, w = (int(v) for v in args.size.split("x"))
    image = np.random.default_rng(0).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    with console.status("building full-size random ViT-B/16 + DINO ViT-B/8…"):
        models = load_models("ViT-B/16", "dino_vitb8", None, mode="random", device=args.device)
    base = SegmenterConfig(models="random", device=args.device, window_batch=4)
    rows = []
    for method in METHODS:
        cfg = method_config(base, method, PRESETS["voc21"], {"no_sam": True})
        masks = FixedMasks(instance_mask(h, w)) if method == "corrclip" else None
        with torch.no_grad():
            seg = Segmenter(cfg, QUERIES, models, torch.device(args.device), mask_source=masks)
        rh, rw = rescale_size(h, w, cfg.short_side)
        windows = 1 if cfg.whole_image else len(sliding_windows(rh, rw, cfg.crop, cfg.stride))
        with console.status(f"timing {method}…"):
            seconds = median_time(lambda seg=seg: seg(image, refine=False), args.repeats)
        rows.append({"method": method, "short_side": cfg.short_side, "windows": windows,
                     "crop/stride": f"{cfg.crop}/{cfg.stride}", "seconds": seconds})
    sam2_rows = []
    for points in [int(p) for p in args.sam2_points.split(",") if p.strip()]:
        from s2clip_cli.refine.instance_masks import MaskCache, Sam2GeneratorParams, load_sam2_generator

        with console.status(f"building SAM 2 Hiera-L (random) and generating at {points} points per side…"):
            gen = load_sam2_generator("sam2_hiera_large", Sam2GeneratorParams(points_per_side=points), mode="random",
                                      device=torch.device(args.device), cache=MaskCache(Path("/nonexistent")))
            start = time.perf_counter()
            gen.generate(image)
            sam2_rows.append({"points_per_side": points, "seconds": time.perf_counter() - start})

    table = Table(title=f"per-image time, {h}x{w} image, {args.device}, full-size random weights, load {load}")
    for col in ("method", "short side", "crop/stride", "windows", "seconds", "× proxyclip"):
        table.add_column(col)
    proxy = next(r["seconds"] for r in rows if r["method"] == "proxyclip")
    for r in rows:
        table.add_row(r["method"], str(r["short_side"]), r["crop/stride"], str(r["windows"]), f"{r['seconds']:.2f}",
                      f"{r['seconds'] / proxy:.2f}")
    for r in sam2_rows:
        table.add_row(f"SAM 2 masks ({r['points_per_side']}/side)", "image", "–", "–", f"{r['seconds']:.2f}",
                      f"{r['seconds'] / proxy:.2f}")
    console.print(table)
    result = {"image": [h, w], "device": args.device, "repeats": args.repeats, "load_average": load,
              "torch_threads": torch.get_num_threads(), "methods": rows, "sam2": sam2_rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))



if __name__ == "__main__":
    main()
