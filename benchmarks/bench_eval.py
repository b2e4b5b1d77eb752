"""Evaluation throughput (images/s) on a synthetic voc21 dataset with --models tiny, one process
versus two (torchrun, gloo), measured side by side in one run.

    python benchmarks/bench_eval.py [--images 16] [--json bench-results/eval.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from s2clip_cli.data.synthetic import write_synthetic_dataset


def run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--json", type=Path, default=Path("bench-results/eval.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_dataset("voc21", Path(tmp) / "voc", n_images=args.images, size=(240, 320))
        common = ["eval", "--dataset", "voc21", "--data-root", str(root), "--models", "tiny", "--device", "cpu",
                  "--no-sam", "--num-workers", "1"]
        env = {**os.environ, "S2CLIP_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        one = run([sys.executable, "-m", "s2clip_cli", *common, "--work-dir", f"{tmp}/one"], env)
        two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "s2clip_cli", *common, "--work-dir", f"{tmp}/two"], env)
        same = bool((np.load(f"{tmp}/one/confusion.npy") == np.load(f"{tmp}/two/confusion.npy")).all())
    table = Table(title=f"s2clip eval, synthetic voc21, {args.images} images 240x320, --models tiny, no SAM")
    for col in ("processes", "wall s (incl. start-up)", "images/s", "speed-up"):
        table.add_column(col, justify="right")
    table.add_row("1", f"{one:.1f}", f"{args.images / one:.2f}", "1.00")
    table.add_row("2 (torchrun, gloo)", f"{two:.1f}", f"{args.images / two:.2f}", f"{one / two:.2f}")
    console = Console()
    console.print(table)
    console.print(f"confusion matrices identical: {same}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"images": args.images, "one_process_s": one, "two_process_s": two,
                                     "images_per_s": {"1": args.images / one, "2": args.images / two},
                                     "identical_confusion": same}, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
