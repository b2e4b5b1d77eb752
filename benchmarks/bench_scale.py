"""Beyond one process (issue 23): `segment` images/s on 1 and 2 ranks, the merge of 10 000 per-image
export records on rank 0, and 1 vs 2 `serve` workers under bursts of requests.

    python benchmarks/bench_scale.py [--images 96] [--size 240x320] [--models tiny] [--rounds 2]
                                     [--records 10000] [--serve-burst-size 4] [--json bench-results/scale.json]

- **segment**: the same folder of synthetic photos segmented by `torchrun --nproc-per-node 1` and
  `--nproc-per-node 2` (gloo on the CPU, ``OMP_NUM_THREADS=1``: one thread per rank), the command
  line as users run it, with every export format. images/s counts from the models built to every
  rank done (`RunCounts.seconds`, the slowest rank); the wall time with start-up is beside it. The
  speed-up is the median over rounds of each round's 2-rank rate over its 1-rank rate (the two runs
  of a round side by side, so that the load of a shared machine cancels out as far as it can), next
  to what 2 processes of plain arithmetic get done against 1 in the same round (`machine_ceiling`:
  2.0 on two idle cores, less when other work shares them: the most a 2-rank run can gain then).
  ``--models tiny`` (default) or ``random`` (full size; embedding the default background names at
  one thread takes minutes, so ``--no-background`` is used with it). The two runs alternate which
  goes first each round; the load average is printed.
- **merge**: 10 000 run records (coco, cvat, labelstudio parts of 640x480 label maps of about 40
  regions) held half by each of 2 ranks, gathered on rank 0 and written (`segment_ranks.merge_run_files`),
  against one process writing the same 10 000 images' run files; its share of a 10 000-image run at
  the 2-rank rate measured above (goal: at most 1 %).
- **serve workers**: 1 vs 2 `serve` workers under the same bursts (`bench_serve.py --burst`, run by
  `serve_burst`).
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
from typing import Any

import numpy as np

FORMATS = "png,coco,polygons,masks,yolo,labelstudio,cvat"
CLASSES = "cat,dog,tree,car"
RUN_FORMATS = ["coco", "yolo", "labelstudio", "cvat"]


# ----------------------------------------------------------------------------------- inputs


def photos(folder: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``count`` smooth random photos (blurred noise, so PNGs and regions look like photos')."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        small = rng.integers(0, 255, (size[0] // 16 + 1, size[1] // 16 + 1, 3), dtype=np.uint8)
        image = cv2.resize(small, (size[1], size[0]), interpolation=cv2.INTER_CUBIC)
        Image.fromarray(image).save(folder / f"photo_{k:05d}.png")
    return folder


def region_labels(shape: tuple[int, int], regions: int, classes: int, seed: int) -> np.ndarray:
    """A label map of about ``regions`` blobs (nearest of random seed points), classes 0..classes-1."""
    rng = np.random.default_rng(seed)
    points = rng.uniform((0, 0), shape, (regions, 2))
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]]
    nearest = np.argmin((rows[..., None] - points[:, 0]) ** 2 + (cols[..., None] - points[:, 1]) ** 2, axis=-1)
    return rng.integers(0, classes, regions)[nearest].astype(np.int64)


# ----------------------------------------------------------------------------------- rank workers


def rank_segment(result: Path, cli_args: list[str]) -> None:
    """One rank: the `segment` command line; rank 0 writes its counts and timings to ``result``."""
    import s2clip_cli.commands.segment as driver
    from s2clip_cli.cli import app

    seen: dict[str, Any] = {}
    real = driver.run_segment

    def run_segment(*args: Any, **kwargs: Any) -> Any:
        counts = real(*args, **kwargs)
        seen.update(done=counts.done, skipped=counts.skipped, failed=counts.failed, ranks=counts.ranks,
                    seconds=counts.seconds, merge_seconds=counts.merge_seconds)
        return counts

    driver.run_segment = run_segment  # type: ignore[assignment]
    try:
        app(args=cli_args, prog_name="s2clip", standalone_mode=False)
    finally:
        if int(os.environ.get("RANK", "0")) == 0 and seen:
            result.write_text(json.dumps(seen))


def _records(count: int, first: int, classes: list[str]) -> list[Any]:
    """``count`` run records (named ``img_<first + k>.png``) from 8 template label maps."""
    from s2clip_cli.io.export import ExportSession, RunRecord

    with tempfile.TemporaryDirectory() as tmp:
        templates = ExportSession(Path(tmp), RUN_FORMATS, classes, True)
        for t in range(8):
            templates.add_existing(Path(f"t{t}.png"), f"t{t}.png", region_labels((480, 640), 40, len(classes), t))
        parts = templates.run_records()
    return [RunRecord(f"in/img_{first + k:06d}.png", f"img_{first + k:06d}.png", 640, 480,
                      parts[(first + k) % len(parts)].payloads) for k in range(count)]


def rank_merge(result: Path, records: int, out: Path) -> None:
    """One rank: hold its share of ``records`` run records, then the timed merge on rank 0."""
    from rich.console import Console

    from s2clip_cli.commands.segment_ranks import merge_run_files
    from s2clip_cli.distributed import DistContext
    from s2clip_cli.io.export import ExportSession

    classes = ["background", *CLASSES.split(",")]
    with DistContext.from_env("cpu") as ctx:
        share = -(-records // ctx.world_size)
        session = ExportSession(out, RUN_FORMATS, classes, True)
        for record in _records(min(share, records - ctx.rank * share), ctx.rank * share, classes):
            session.add_record(record)  # what the rank would hold after segmenting its images
        ctx.barrier()
        message, seconds = merge_run_files(ctx, session, Console(stderr=True))
        if ctx.is_main:
            coco = json.loads((out / "coco.json").read_text())
            result.write_text(json.dumps({"seconds": seconds, "error": message, "images": len(coco["images"]),
                                          "annotations": len(coco["annotations"]),
                                          "bytes": {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}}))


# ----------------------------------------------------------------------------------- the machine


def _spin(seconds: float, counts: Any) -> None:
    os.setsid()  # a session of its own, as torchrun starts each rank (Linux shares CPU time out by session)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(1000):
            n += 1
    counts.put(n)


def machine_ceiling(seconds: float = 3.0) -> float:
    """What 2 processes get done, against 1, of plain arithmetic on this machine now: the most any
    2-rank run can gain here (2.0 on 2 idle cores; less when other work shares them)."""
    import multiprocessing

    def run(processes: int) -> int:
        counts = multiprocessing.Queue()
        workers = [multiprocessing.Process(target=_spin, args=(seconds, counts)) for _ in range(processes)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return sum(counts.get() for _ in workers)

    one = run(1)
    return run(2) / one


# ----------------------------------------------------------------------------------- the driver


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "S2CLIP_OFFLINE": "1"}


def launch(ranks: int, args: list[str]) -> tuple[float, dict[str, Any]]:
    """This script on ``ranks`` processes under torchrun; (wall seconds, rank 0's result)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               __file__, *args[:1], str(result), *args[1:]]
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not result.exists():
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return wall, json.loads(result.read_text())


def segment_scaling(args: argparse.Namespace, folder: Path, work: Path) -> dict[str, Any]:
    """1 vs 2 ranks on ``folder``, ``args.rounds`` times, alternating which goes first."""
    runs: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    extra = ["--no-background"] if args.models == "random" else []
    ceilings = []
    for round_ in range(args.rounds):
        ceilings.append(machine_ceiling())
        print(f"round {round_}: 2 processes of plain arithmetic do {ceilings[-1]:.2f}x what 1 does "
              f"(load {os.getloadavg()[0]:.1f})", flush=True)
        for ranks in ((1, 2) if round_ % 2 == 0 else (2, 1)):
            out = work / f"out-{ranks}-{round_}"
            cli = ["segment", str(folder), "--classes", CLASSES, "--format", FORMATS, "--models", args.models,
                   "--device", "cpu", "--no-sam", "--short-side", str(args.short_side), "-o", str(out), *extra]
            load = os.getloadavg()[0]
            wall, counts = launch(ranks, ["--rank-segment", *cli])
            if counts["done"] != args.images or counts["failed"]:
                raise SystemExit(f"{ranks} ranks segmented {counts}")
            runs[ranks].append({"wall_s": wall, "segment_s": counts["seconds"], "merge_s": counts["merge_seconds"],
                                "images_per_s": args.images / counts["seconds"], "load_before": load})
            print(f"round {round_}: {ranks} rank(s) {args.images / counts['seconds']:.2f} images/s "
                  f"(segmenting {counts['seconds']:.1f} s, wall {wall:.1f} s, load {load:.1f})", flush=True)
    rate = {r: float(np.median([run["images_per_s"] for run in v])) for r, v in runs.items()}
    # The machine is shared: each round's two runs are side by side, so their ratio is the robust figure.
    ratios = [two["images_per_s"] / one["images_per_s"] for one, two in zip(runs[1], runs[2], strict=True)]
    return {"runs": {str(r): v for r, v in runs.items()}, "images_per_s": {str(r): v for r, v in rate.items()},
            "speedup_per_round": ratios, "speedup": float(np.median(ratios)),
            "machine_ceiling_per_round": ceilings, "machine_ceiling": float(np.median(ceilings)),
            "of_the_ceiling": float(np.median([r / c for r, c in zip(ratios, ceilings, strict=True)]))}


def merge_cost(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The merge of ``args.records`` run records on 2 ranks against one process writing them."""
    _, two = launch(2, ["--rank-merge", str(args.records), str(work / "merge-2")])
    _, one = launch(1, ["--rank-merge", str(args.records), str(work / "merge-1")])
    return {"records": args.records, "two_ranks_s": two["seconds"], "one_process_s": one["seconds"],
            "images": two["images"], "annotations": two["annotations"], "bytes": two["bytes"]}


def serve_burst(args: argparse.Namespace, work: Path) -> dict[str, Any] | None:
    """1 vs 2 `serve` workers answering the same bursts of requests (`serve --devices cpu` against
    `--devices cpu,cpu`, one torch thread per worker): `bench_serve.py --burst`, run as it is, its JSON
    read back. None with `--no-serve`."""
    if args.serve_burst_size <= 0:
        return None
    out = work / "serve_burst.json"
    cmd = [sys.executable, str(Path(__file__).with_name("bench_serve.py")), "--burst", "--burst-size",
           str(args.serve_burst_size), "--rounds", str(args.rounds), "--models", "tiny", "--json", str(out)]
    subprocess.run(cmd, check=True, env=_env())
    report = json.loads(out.read_text())
    rows = {row["workers"]: row for row in report["rows"]}
    return {"requests_per_s": {str(n): rows[n]["requests_per_s"] for n in (1, 2)},
            "speedup": report["ratio_median"], "speedup_per_round": report["ratio_rounds"],
            "machine_ceiling": report["thread_ceiling_median"], "burst_size": report["burst_size"],
            "latency_p50_s": {str(n): rows[n]["latency_p50_s"] for n in (1, 2)}}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-segment":
        rank_segment(Path(sys.argv[2]), sys.argv[3:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--rank-merge":
        rank_merge(Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--size", default="240x320", help="HxW of the synthetic photos")
    parser.add_argument("--models", choices=["tiny", "random"], default="tiny")
    parser.add_argument("--short-side", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--records", type=int, default=10_000)
    parser.add_argument("--serve-burst-size", type=int, default=4,
                        help="requests per burst for 1 vs 2 serve workers (0: skip that part)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/scale.json"))
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.lower().split("x"))

    from rich.console import Console
    from rich.table import Table

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = photos(work / "photos", args.images, (height, width))
        scaling = segment_scaling(args, folder, work)
        merge = merge_cost(args, work)
        burst = serve_burst(args, work)
    run_s = args.records / scaling["images_per_s"]["2"]
    merge["share_of_run"] = merge["two_ranks_s"] / (run_s + merge["two_ranks_s"])

    title = (f"s2clip segment on 1 and 2 ranks (gloo, CPU, 1 thread each), {args.images} photos {height}x{width}, "
             f"--models {args.models}, no SAM, short side {args.short_side}, every format")
    table = Table(title=title)
    for col in ("measure", "1", "2", "2 / 1"):
        table.add_column(col, justify="right")
    one, two = scaling["runs"]["1"], scaling["runs"]["2"]
    table.add_row("segment images/s (median)", f"{scaling['images_per_s']['1']:.2f}",
                  f"{scaling['images_per_s']['2']:.2f}", f"{scaling['speedup']:.2f}x (median of rounds: "
                  + ", ".join(f"{r:.2f}" for r in scaling["speedup_per_round"]) + ")")
    table.add_row("the machine now: plain arithmetic, 2 vs 1 process", "", "",
                  f"{scaling['machine_ceiling']:.2f}x (rounds: " + ", ".join(
                      f"{r:.2f}" for r in scaling["machine_ceiling_per_round"]) + ")")
    table.add_row("speed-up / the machine's", "", "", f"{scaling['of_the_ceiling']:.2f} (median of rounds)")
    table.add_row("wall s with start-up (median)", f"{np.median([r['wall_s'] for r in one]):.1f}",
                  f"{np.median([r['wall_s'] for r in two]):.1f}", "")
    table.add_row(f"run files of {args.records} images, s", f"{merge['one_process_s']:.2f}",
                  f"{merge['two_ranks_s']:.2f} (merge)", f"{merge['share_of_run']:.2%} of the run")
    if burst is None:
        table.add_row("serve: a burst, 1 vs 2 workers", "not measured", "not measured", "")
    else:
        table.add_row(f"serve: bursts of {burst['burst_size']}, requests/s (workers)",
                      f"{burst['requests_per_s']['1']:.3f}", f"{burst['requests_per_s']['2']:.3f}",
                      f"{burst['speedup']:.2f}x (2 threads / 1 now: {burst['machine_ceiling']:.2f}x)")
    console = Console()
    console.print(table)
    console.print(f"merge share: {merge['two_ranks_s']:.2f} s against {run_s:.0f} s for {args.records} images at "
                  f"the 2-rank rate (goal <= 1 %); load average {load[0]:.1f} on {os.cpu_count()} cores at the start, "
                  f"{os.getloadavg()[0]:.1f} at the end")
    report = {"images": args.images, "size": [height, width], "models": args.models, "short_side": args.short_side,
              "formats": FORMATS, "segment": scaling, "merge": merge, "serve_burst": burst,
              "load_average": {"start": load[0], "end": os.getloadavg()[0]}, "cpus": os.cpu_count()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
