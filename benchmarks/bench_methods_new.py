"""Per-image time of the newer methods (SC-CLIP, ResCLIP) beside S2CLIP's and ProxyCLIP's, on one
448x608 image with the same full-size random-weight ViT-B/16 (+ DINO ViT-B/8 for the proxy methods),
without SAM: features, stitching and classification (`Segmenter.coarse`), per stage.

Each method runs its own protocol: `segment`'s settings by default, or its configuration on a
benchmark with --preset (e.g. voc21: ResCLIP then runs the whole image, SC-CLIP windows 224/112).
--short-side gives every method the same working size.

    python benchmarks/bench_methods_new.py [--repeats 3] [--device cpu] [--preset voc21] [--short-side 336]
        [--methods s2clip,proxyclip,scclip,resclip] [--json bench-results/methods_new.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from s2clip_cli.commands.methods import method_config
from s2clip_cli.data.presets import PRESETS
from s2clip_cli.models.factory import load_models
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig
from s2clip_cli.profiling import StageTimer

DEFAULT_METHODS = "s2clip,proxyclip,scclip,resclip"


def time_method(seg: Segmenter, image: np.ndarray, repeats: int) -> tuple[float, dict[str, float]]:
    """Median seconds per image of `Segmenter.coarse` (after one warm-up) and the median stage times."""
    seg.coarse(image, image.shape[:2])
    totals, runs = [], []
    for _ in range(repeats):
        timer = StageTimer(seg.device)
        start = time.perf_counter()
        seg.coarse(image, image.shape[:2], timer)
        if seg.device.type == "cuda":
            torch.cuda.synchronize(seg.device)
        totals.append(time.perf_counter() - start)
        runs.append(timer.times)
    stages = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}
    return statistics.median(totals), stages


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--short-side", type=int, default=None)
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--json", type=Path, default=Path("bench-results/methods_new.json"))
    args = parser.parse_args()
    console = Console()
    warnings.simplefilter("ignore", UserWarning)
    methods = args.methods.split(",")

    with console.status("building full-size random ViT-B/16 + DINO ViT-B/8…"):
        models = load_models("ViT-B/16", "dino_vitb8", None, mode="random", device=args.device)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(448, 608, 3), dtype=np.uint8)
    classes, background = [["cat"], ["dog"], ["person"]], ["sky", "wall"]
    base = SegmenterConfig(models="random", sam=None, device=args.device, precision=args.precision, window_batch=8)
    explicit = {"short_side": args.short_side} if args.short_side else {}
    rows = []
    for name in methods:
        cfg = method_config(base, name, PRESETS[args.preset] if args.preset else None, explicit)
        cfg = dataclasses.replace(cfg, sam=None, sam_refine=False)
        seg = Segmenter.build(cfg, classes, background, models=models)
        with console.status(f"timing {name}…"):
            seconds, stages = time_method(seg, image, args.repeats)
        windows = "whole image" if cfg.whole_image else f"{cfg.crop}/{cfg.stride}"
        rows.append({"method": name, "short_side": cfg.short_side, "windows": windows, "seconds": seconds,
                     "stages": stages})
    reference = next((r["seconds"] for r in rows if r["method"] == "s2clip"), rows[0]["seconds"])

    table = Table(title=f"Per-image time without SAM, 448x608 image, {models.clip.name} random weights, "
                        f"{args.device}, {torch.get_num_threads()} threads")
    for col in ("method", "short side", "windows", "s / image", "× s2clip", "stages (s)"):
        table.add_column(col)
    for r in rows:
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items())
        table.add_row(r["method"], str(r["short_side"]), r["windows"], f"{r['seconds']:.2f}",
                      f"{r['seconds'] / reference:.2f}", stages)
    console.print(table)
    payload = {"device": args.device, "threads": torch.get_num_threads(), "precision": args.precision,
               "preset": args.preset, "short_side": args.short_side, "image": [448, 608], "repeats": args.repeats,
               "methods": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    print(json.dumps(payload))


if __name__ == "__main__":
    main()
