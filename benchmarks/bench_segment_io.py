"""Per-image time of `segment` before and after its input/output rework (input collection, skip
checks, outputs written as a set), at default settings (`--format png`, SAM on) on tiny models.

"before" is `segment_file` as it was at commit 35401cf (read, segment, mask, overlay, JSON; copied
below); "after" is today's driver (`run_segment` on the same folder: planning, completeness checks,
`OutputSet`). Both use one prebuilt Segmenter, write to a fresh folder each round, and alternate
(AB BA AB …) so that machine load and order hit both alike. Also timed: everything outside the model
call (reading, planning, writing: the part the rework touched; the compute is the same code), the
write stage alone, and the write path alone repeated on one image's result (no model noise).
Prints a table and writes JSON.

    python benchmarks/bench_segment_io.py [--images 4] [--repeats 3] [--no-sam] [--json bench-results/segment_io.json]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

from s2clip_cli.commands import segment as driver
from s2clip_cli.commands.methods import method_config
from s2clip_cli.io.files import write_json
from s2clip_cli.io.images import read_image
from s2clip_cli.io.outputs import class_shares, make_palette, save_mask_png, save_overlay
from s2clip_cli.io.sources import collect_sources
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CLASSES = [["cat"], ["dog"], ["person"], ["car"]]
BACKGROUND = ["sky", "wall", "floor"]


def segment_file_before(seg: Segmenter, path: Path, out_dir: Path, out: Console) -> float:
    """`commands.segment.segment_file` at 35401cf (record trimmed of nothing that costs time);
    returns the seconds spent writing."""
    image = read_image(path)
    result = seg(image)
    start = time.perf_counter()
    write_before(seg, path, image, result, out_dir)
    out.print(f"{path.name} → {out_dir / path.stem}_mask.png", highlight=False)
    return time.perf_counter() - start


def write_before(seg: Segmenter, path: Path, image: np.ndarray, result: Any, out_dir: Path) -> None:
    """The writes of `segment_file` at 35401cf: mask, overlay, JSON, each atomic on its own."""
    labels = seg.queries.labels
    palette = make_palette(len(labels), seg.queries.has_background)
    targets = {"mask": out_dir / f"{path.stem}_mask.png", "overlay": out_dir / f"{path.stem}_overlay.png",
               "json": out_dir / f"{path.stem}.json"}
    save_mask_png(targets["mask"], result.labels, palette)
    save_overlay(targets["overlay"], image, result.labels, labels, palette)
    shares = class_shares(result.labels, len(labels))
    record = {"image": str(path), "size": [int(image.shape[0]), int(image.shape[1])], "classes": labels,
              "class_names": seg.queries.class_names, "has_background": seg.queries.has_background,
              "pixel_share": {name: round(float(s), 6) for name, s in zip(labels, shares, strict=True)},
              "timings_s": {k: round(v, 4) for k, v in result.timings.items()}, "config": {},
              "run": driver._run_record(seg), "outputs": {k: str(v) for k, v in targets.items()}}
    write_json(targets["json"], record)


def photos(folder: Path, count: int) -> list[Path]:
    """`count` photos: the examples (cycled, resized copies) in a folder of their own."""
    sources = sorted(p for p in EXAMPLES.glob("*.jpg"))
    paths = []
    for i in range(count):
        image = Image.open(sources[i % len(sources)]).convert("RGB")
        image.thumbnail((640, 640))
        paths.append(folder / f"photo{i}.jpg")
        image.save(paths[-1], quality=92)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write-reps", type=int, default=40, help="Repeats of the write path alone.")
    parser.add_argument("--no-sam", action="store_true", help="Without SAM (the writes weigh more).")
    parser.add_argument("--json", type=Path, default=Path("bench-results/segment_io.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore", UserWarning)
    console = Console()
    config = SegmenterConfig(models="tiny", device=args.device, work_resolution="resized", timing=True,
                             prob_thd=0.2)
    explicit = {"no_sam": True} if args.no_sam else {}
    with console.status("building tiny models…"):
        seg = Segmenter.build(method_config(config, "s2clip", None, explicit), CLASSES, BACKGROUND)
    Segmenter.build = classmethod(lambda cls, *a, **k: seg)  # type: ignore[method-assign] # the driver reuses it
    quiet = Console(file=io.StringIO())

    # the write stage of the new driver, timed around write_image_set
    write_seconds: list[float] = []
    real_write = driver.write_image_set

    def timed_write(*a: Any, **k: Any) -> dict:
        start = time.perf_counter()
        try:
            return real_write(*a, **k)
        finally:
            write_seconds.append(time.perf_counter() - start)

    driver.write_image_set = timed_write  # type: ignore[assignment]
    # the model's own time (Segmenter.__call__), to separate what the rework touched from compute noise
    model_seconds: list[float] = []
    real_call = Segmenter.__call__

    def timed_call(self: Segmenter, *a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return real_call(self, *a, **k)
        finally:
            model_seconds.append(time.perf_counter() - start)

    Segmenter.__call__ = timed_call  # type: ignore[method-assign]
    rows: dict[str, list[float]] = {"before": [], "after": [], "before_write": [], "after_write": [],
                                    "before_outside_model": [], "after_outside_model": [],
                                    "before_write_only": [], "after_write_only": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        paths = photos(folder, args.images)
        seg(read_image(paths[0]))  # warm-up
        def before(round_: int) -> Path:
            out_b = Path(tmp) / f"before{round_}"
            out_b.mkdir()
            model_seconds.clear()
            start = time.perf_counter()
            writes = [segment_file_before(seg, p, out_b, quiet) for p in paths]
            rows["before"].append((time.perf_counter() - start) / len(paths))
            rows["before_outside_model"].append(rows["before"][-1] - sum(model_seconds) / len(paths))
            rows["before_write"].append(sum(writes) / len(paths))
            return out_b

        def after(round_: int) -> Path:
            out_a = Path(tmp) / f"after{round_}"
            write_seconds.clear()
            model_seconds.clear()
            start = time.perf_counter()
            counts = driver.run_segment(collect_sources([folder]), CLASSES, BACKGROUND, config, out_a,
                                        console=quiet, out=quiet, explicit=explicit)
            rows["after"].append((time.perf_counter() - start) / len(paths))
            rows["after_outside_model"].append(rows["after"][-1] - sum(model_seconds) / len(paths))
            rows["after_write"].append(sum(write_seconds) / len(paths))
            assert counts.done == len(paths) and counts.failed == 0
            return out_a

        for round_ in range(args.repeats):  # which goes first alternates, so neither gains from order
            if round_ % 2 == 0:
                out_b, out_a = before(round_), after(round_)
            else:
                out_a, out_b = after(round_), before(round_)
            for p in paths:  # the same labels either way
                a = np.asarray(Image.open(out_b / f"{p.stem}_mask.png"))
                b = np.asarray(Image.open(out_a / f"{p.stem}_mask.png"))
                assert np.array_equal(a, b), p

        # the write path alone, many times, on one image's result (no model noise)
        image = read_image(paths[0])
        result = seg(image)
        for rep in range(args.write_reps):
            order = ("before", "after") if rep % 2 == 0 else ("after", "before")
            for variant in order:
                target = Path(tmp) / f"w{variant}{rep}"
                target.mkdir()
                start = time.perf_counter()
                if variant == "before":
                    write_before(seg, paths[0], image, result, target)
                else:
                    real_write(seg, paths[0], image, result, driver.output_paths(target, paths[0].stem))
                rows[f"{variant}_write_only"].append(time.perf_counter() - start)

    med = {k: statistics.median(v) for k, v in rows.items()}
    table = Table(title=f"segment per image ({args.images} images × {args.repeats} rounds, tiny models, "
                        f"{'no SAM' if args.no_sam else 'SAM on'}, {args.device}; median of rounds)")
    for col in ("stage", "before (s)", "after (s)", "change"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    for name, b, a in (("whole image", med["before"], med["after"]),
                       ("outside the model (read, plan, write)", med["before_outside_model"],
                        med["after_outside_model"]),
                       ("writing outputs", med["before_write"], med["after_write"]),
                       (f"writing only ×{args.write_reps}, one image", med["before_write_only"],
                        med["after_write_only"])):
        table.add_row(name, f"{b:.4f}", f"{a:.4f}", f"{100 * (a / b - 1):+.1f}%")
    console.print(table)
    result = {"images": args.images, "repeats": args.repeats, "sam": not args.no_sam, "device": args.device,
              "per_image_s": rows, "median_s": med,
              "change_whole": med["after"] / med["before"] - 1,
              "change_outside_model": med["after_outside_model"] / med["before_outside_model"] - 1,
              "change_write": med["after_write"] / med["before_write"] - 1,
              "change_write_only": med["after_write_only"] / med["before_write_only"] - 1}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
