"""Export cost per image of each `--format` next to `segment`'s compute on tiny models.

The labels come from `segment` itself (tiny random-weight CLIP + DINO + SAM, untrained, so their
maps are noisier than a trained model's) and, as a second case, from a smooth synthetic map with
few regions, closer to what real models give. For each format: `write_image` (per-image files
plus what the run-level files keep) and `finish` (the run-level files, divided by the images).

    python benchmarks/bench_export.py [--repeats 3] [--images 4] [--json bench-results/export.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

from s2clip_cli.io.export import FORMATS, ExportSession
from s2clip_cli.io.export._common import ClassTable, connected_regions
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig

SIZE = (448, 608)
CLASSES = [["cat"], ["dog"], ["person"], ["car"], ["tree"]]


def smooth_labels(num_classes: int, seed: int) -> np.ndarray:
    """A smooth random label map (argmax of heavily blurred noise): a few large regions per class."""
    noise = np.random.default_rng(seed).random((num_classes, *SIZE)).astype(np.float32)
    return np.stack([cv2.GaussianBlur(n, (0, 0), 25) for n in noise]).argmax(0).astype(np.uint8)


def time_format(fmt: str, label_maps: list[np.ndarray], names: list[str], has_background: bool,
                repeats: int) -> dict[str, float]:
    """Median seconds per image of `write_image` and of `finish` (per image) for one format."""
    writes, finishes = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            session = ExportSession(Path(tmp), [fmt], names, has_background)
            start = time.perf_counter()
            for index, labels in enumerate(label_maps):
                session.write_image(Path(f"img{index}.jpg"), f"img{index}", labels)
            middle = time.perf_counter()
            session.finish()
            end = time.perf_counter()
        writes.append((middle - start) / len(label_maps))
        finishes.append((end - middle) / len(label_maps))
    return {"write_s": statistics.median(writes), "finish_s": statistics.median(finishes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=Path("bench-results/export.json"))
    args = parser.parse_args()
    console = Console()
    warnings.simplefilter("ignore", UserWarning)

    with console.status("building tiny models…"):
        seg = Segmenter.build(SegmenterConfig(models="tiny", device=args.device), CLASSES, ["sky", "wall"])
    names, has_background = list(seg.queries.labels), seg.queries.has_background
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size=(*SIZE, 3), dtype=np.uint8) for _ in range(args.images)]
    seg(images[0])  # warm-up
    compute, tiny_maps = [], []
    for image in images:
        start = time.perf_counter()
        tiny_maps.append(np.asarray(seg(image).labels))
        compute.append(time.perf_counter() - start)
    segment_s = statistics.median(compute)
    smooth_maps = [smooth_labels(len(names), seed) for seed in range(args.images)]
    classes = ClassTable(tuple(names), has_background)
    cases = {"tiny-model labels": tiny_maps, "smooth labels": smooth_maps}
    regions = {case: statistics.mean(sum(1 for _ in connected_regions(m.astype(np.intp), classes)) for m in maps)
               for case, maps in cases.items()}

    results: dict[str, dict[str, dict[str, float]]] = {}
    for case, maps in cases.items():
        results[case] = {}
        for fmt in FORMATS[1:]:
            results[case][fmt] = time_format(fmt, maps, names, has_background, args.repeats)

    table = Table(title=f"export per {SIZE[0]}x{SIZE[1]} image vs segment {1000 * segment_s:.0f} ms "
                        f"(tiny models, {args.device})",
                  caption=", ".join(f"{case}: {regions[case]:.0f} regions per image" for case in cases))
    table.add_column("format")
    for case in cases:
        table.add_column(f"{case.split()[0]} ms", justify="right")
        table.add_column(f"{case.split()[0]} % of segment", justify="right")
    for fmt in FORMATS[1:]:
        row = [fmt]
        for case in cases:
            total = results[case][fmt]["write_s"] + results[case][fmt]["finish_s"]
            row += [f"{1000 * total:.1f}", f"{100 * total / segment_s:.1f}"]
        table.add_row(*row)
    console.print(table)
    console.print("png (the default) adds nothing: segment writes its own mask, overlay and JSON as before.")

    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "image_size": list(SIZE), "images": args.images, "repeats": args.repeats, "device": args.device,
        "classes": names, "segment_s_per_image": segment_s, "regions_per_image": regions,
        "export_s_per_image": results,
    }, indent=2) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
