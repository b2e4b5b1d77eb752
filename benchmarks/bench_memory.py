"""Peak memory (RSS) of s2clip commands on large inputs, each in a fresh process, --models tiny on
the CPU: a 4000x3000 photo through `segment` with SAM and the default background names, 171
classes (COCO-Stuff's) on a 1024x2048 image, and `ap` with the SAM-encoder source on a
Cityscapes-size image. Optionally the same commands from another checkout (`--baseline-src
OLD/src`, e.g. a `git worktree` of an earlier commit) side by side, as before/after.

    python benchmarks/bench_memory.py [--baseline-src /tmp/s2clip-old/src] [--json bench-results/memory.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

GOAL_GIB = 2.0

# Runs the CLI in this process and reports its peak RSS (ru_maxrss is KiB on Linux).
RUNNER = """
import resource, sys
from s2clip_cli.cli import main
sys.argv = ["s2clip", *sys.argv[1:]]
code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
print("PEAK_KIB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "EXIT", code, file=sys.stderr)
"""


def peak_rss_gib(args: list[str], src: Path | None) -> tuple[float | None, str]:
    env = {**os.environ, "S2CLIP_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    if src is not None:
        env["PYTHONPATH"] = str(src)
    proc = subprocess.run([sys.executable, "-c", RUNNER, *args], env=env, capture_output=True, text=True)
    for line in proc.stderr.splitlines():
        if line.startswith("PEAK_KIB"):
            _, kib, _, code = line.split()
            return (int(kib) / 2**20, "ok") if code == "0" else (int(kib) / 2**20, f"exit {code}")
    return None, proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"


def make_inputs(tmp: Path) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    photo = tmp / "photo_4000x3000.jpg"
    smooth = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(smooth).resize((4000, 3000), Image.BICUBIC).save(photo, quality=90)
    wide = tmp / "street_2048x1024.png"
    Image.fromarray(smooth).resize((2048, 1024), Image.BICUBIC).save(wide)
    from s2clip_cli.data.class_names import preset_class_names

    stuff = tmp / "coco_stuff_classes.txt"
    stuff.write_text("\n".join("; ".join(names) for names in preset_class_names("coco_stuff164k")) + "\n")
    from s2clip_cli.data.synthetic import write_synthetic_dataset

    city = write_synthetic_dataset("cityscapes", tmp / "cityscapes", n_images=1, size=(1024, 2048))
    tiny = ["--models", "tiny", "--device", "cpu"]
    return {
        "segment 4000x3000 photo, SAM, default background (28 names)":
            ["segment", str(photo), "--classes", "cat,dog", "-o", str(tmp / "out1"), *tiny],
        "segment 1024x2048, 171 classes, SAM":
            ["segment", str(wide), "--classes", f"@{stuff}", "--no-background", "-o", str(tmp / "out2"), *tiny],
        "ap cityscapes 1024x2048, clip:0-4 + sam_vitb16":
            ["ap", "--dataset", "cityscapes", "--data-root", str(city), "--sources", "clip:0-4,sam_vitb16",
             "--pairs", "200", "--out", str(tmp / "ap"), *tiny],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-src", type=Path, default=None, help="src/ of another checkout to compare")
    parser.add_argument("--json", type=Path, default=Path("bench-results/memory.json"))
    args = parser.parse_args()
    console = Console()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cli_args in make_inputs(Path(tmp)).items():
            after, status = peak_rss_gib(cli_args, None)
            before, before_status = peak_rss_gib(cli_args, args.baseline_src) if args.baseline_src else (None, "")
            rows.append({"case": name, "before_gib": before, "before_status": before_status,
                         "after_gib": after, "after_status": status})
    table = Table(title=f"Peak RSS, --models tiny, CPU (goal for the photo: ≤ {GOAL_GIB} GiB)")
    for col in ("case", "before (GiB)", "after (GiB)", "ratio"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in rows:
        before = "-" if r["before_gib"] is None else f"{r['before_gib']:.2f}" + (
            "" if r["before_status"] == "ok" else f" ({r['before_status']})")
        after = "-" if r["after_gib"] is None else f"{r['after_gib']:.2f}" + (
            "" if r["after_status"] == "ok" else f" ({r['after_status']})")
        ratio = f"{r['before_gib'] / r['after_gib']:.1f}x" if r["before_gib"] and r["after_gib"] else "-"
        table.add_row(r["case"], before, after, ratio)
    console.print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"goal_gib": GOAL_GIB, "rows": rows}, indent=2) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
