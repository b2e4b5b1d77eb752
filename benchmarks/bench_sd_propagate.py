"""SD refinement propagation: CLIPer's product form (form P = M1·…·MK, then P·coarseᵀ) against
`propagate` (maps applied right to left, fused per-map normalisation), on the same random inputs;
checks that both agree and prints both times and their ratio.

    python benchmarks/bench_sd_propagate.py [--n 4096] [--k 10] [--t 21] [--threshold 0.2]
        [--repeats 2] [--device cpu] [--dtype float32] [--json bench-results/sd_propagate.json]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from s2clip_cli.io.files import write_json
from s2clip_cli.refine.sd_refine import propagate, propagate_product

AGREEMENT_TOLERANCE = 1e-4  # max |difference| relative to max |product-form result|


def attention_like_maps(k: int, n: int, seed: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``[k, n, n]`` row-stochastic maps: softmax of scaled Gaussian logits (peaked rows, as
    self-attention probabilities are)."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.empty(k, n, n, dtype=dtype, device=device)
    for i in range(k):  # one map at a time keeps peak memory at one float32 map
        logits = torch.randn(n, n, generator=generator) * 4.0
        maps[i] = logits.softmax(dim=-1).to(device=device, dtype=dtype)
    return maps


def propagate_unfused(maps: torch.Tensor, coarse: torch.Tensor, threshold: float) -> torch.Tensor:
    """Right to left like `propagate`, but each map normalised with CLIPer's separate passes
    (column max, divide, threshold, row sums, divide: new tensors each time) before its product
    with ``[N, T]`` — the plain loop the fused version is compared with."""
    x = coarse.float().T
    for k in range(maps.shape[0] - 1, -1, -1):
        att = maps[k].float()
        att = att / (att.amax(dim=0, keepdim=True) + 1e-5)
        att = torch.where(att < threshold, 0, att)
        att = att / (att.sum(dim=-1, keepdim=True) + 1e-5)
        x = att @ x
    return x.T


def timed(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> tuple[list[float], torch.Tensor]:
    """Wall times of `repeats` calls (synchronised on CUDA) and the last result."""
    times: list[float] = []
    result = torch.empty(0)
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096, help="tokens per map (64×64 for SD at 512 px)")
    parser.add_argument("--k", type=int, default=10, help="number of maps (2 layers × 5 heads)")
    parser.add_argument("--t", type=int, default=21, help="number of classes")
    parser.add_argument("--threshold", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="dtype of the stored maps (float16 as captured on CUDA)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/sd_propagate.json"))
    args = parser.parse_args()
    console = Console()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    with console.status(f"making {args.k} random {args.n}×{args.n} maps…"):
        maps = attention_like_maps(args.k, args.n, args.seed, device, dtype)
        coarse = torch.rand(args.t, args.n, generator=torch.Generator().manual_seed(args.seed + 1)).to(device)
    checksum = maps.float().sum().item()

    propagate(maps, coarse, args.threshold)  # warm-up (allocator, thread pool)
    with console.status("propagate (right to left)…"):
        fast_times, fast = timed(lambda: propagate(maps, coarse, args.threshold), args.repeats, device)
    with console.status("right to left, unfused…"):
        plain_times, plain = timed(lambda: propagate_unfused(maps, coarse, args.threshold), args.repeats, device)
    with console.status("product form (forming P)…"):
        slow_times, slow = timed(lambda: propagate_product(maps, coarse, args.threshold), args.repeats, device)
    if maps.float().sum().item() != checksum:
        console.print("[red]the maps were modified[/]")
        return 1

    scale = max(slow.abs().max().item(), 1e-30)
    max_diff = (fast - slow).abs().max().item()
    rel_diff = max_diff / scale
    plain_rel_diff = (plain - slow).abs().max().item() / scale
    agree = max(rel_diff, plain_rel_diff) <= AGREEMENT_TOLERANCE
    speedup = min(slow_times) / min(fast_times)
    plain_speedup = min(slow_times) / min(plain_times)

    table = Table(title=f"SD propagation, K={args.k} N={args.n} T={args.t} threshold={args.threshold} "
                        f"({args.dtype} maps, {device.type}, {torch.get_num_threads()} threads)")
    for col in ("method", "best (s)", "median (s)", "speed-up over forming P"):
        table.add_column(col, justify="right" if col != "method" else "left")
    table.add_row("form P (CLIPer: reduce(matmul))", f"{min(slow_times):.3f}", f"{statistics.median(slow_times):.3f}",
                  "1.0×")
    table.add_row("right to left, unfused passes", f"{min(plain_times):.3f}",
                  f"{statistics.median(plain_times):.3f}", f"{plain_speedup:.1f}×")
    table.add_row("propagate (fused, right to left)", f"{min(fast_times):.3f}",
                  f"{statistics.median(fast_times):.3f}", f"{speedup:.1f}×")
    console.print(table)
    console.print(f"propagate vs product: max |difference| = {max_diff:.3g} ({rel_diff:.2g} of the result's max); "
                  f"unfused vs product: {plain_rel_diff:.2g}: "
                  + ("[green]agree[/]" if agree else "[red]DISAGREE[/]"))

    report = {
        "config": {"k": args.k, "n": args.n, "t": args.t, "threshold": args.threshold, "repeats": args.repeats,
                   "seed": args.seed, "device": str(device), "maps_dtype": args.dtype},
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "python": sys.version.split()[0], "machine": platform.machine(),
                        "processor": platform.processor(),
                        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
        "product_seconds": slow_times,
        "propagate_seconds": fast_times,
        "unfused_seconds": plain_times,
        "speedup_best": speedup,
        "unfused_speedup_best": plain_speedup,
        "max_abs_difference": max_diff,
        "max_rel_difference": rel_diff,
        "unfused_max_rel_difference": plain_rel_diff,
        "agree": agree,
    }
    write_json(args.json, report)
    console.print(f"JSON: {args.json}")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
