"""SAM's image encoder alone: s2clip's (attention through `scaled_dot_product_attention`,
`models/sam_fused.py`) beside segment-anything's own forward, on the same full-size random weights
(relative positions random too: released SAMs' are not zero), one 1024x1024 input, in one run.

Per variant and precision: seconds per image (median of --repeats runs after a warm-up, the two
implementations alternating so that a change of machine load hits both), the ratio, the largest
difference relative to the output's largest magnitude (fp32: the two are the same function), and
the peak memory of one forward above its start (CPU: peak RSS; CUDA: the allocator's peak). Also
Trident's guidance input (the last block's input): the encoder run whole with a hook, as before,
against `last_block_input`, which stops before the last (global) block and the neck.

    python benchmarks/bench_sam_encoder.py [--variants vit_b,vit_l,vit_h] [--precisions fp32,bf16]
        [--threads 1] [--repeats 3] [--device cpu|cuda] [--json bench-results/sam_encoder.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from s2clip_cli.models.precision import autocast
from s2clip_cli.models.sam import build_sam
from s2clip_cli.models.sam_attention import BlockInputCapture, last_block_input, last_global_block
from s2clip_cli.models.sam_fused import use_reference_attention, use_reference_convolutions
from s2clip_cli.profiling import PeakMemory

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Any, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _peak_bytes(fn: Any, device: torch.device) -> int:
    with PeakMemory(device) as peak:
        fn()
    return peak.peak_bytes


def _hooked_last_block_input(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The guidance input as it was read before: the whole encoder run, its last block's input hooked."""
    with BlockInputCapture(last_global_block(encoder)) as capture:
        encoder(x)
    return capture.input


def side_by_side(name: str, reference: Any, ours: Any, device: torch.device, repeats: int) -> dict[str, Any]:
    """Time, compare and measure two callables that return tensors."""
    ref_out, our_out = reference().float(), ours().float()  # (warm-up)
    scale = ref_out.abs().max().clamp_min(1e-30)
    rel_diff = float((our_out - ref_out).abs().max() / scale)
    del ref_out, our_out
    ref_s, our_s = [], []
    for _ in range(repeats):
        ref_s.append(_seconds(reference, device))
        our_s.append(_seconds(ours, device))
    row = {"what": name, "reference_s": statistics.median(ref_s), "s2clip_s": statistics.median(our_s),
           "max_rel_diff": rel_diff, "reference_peak_bytes": _peak_bytes(reference, device),
           "s2clip_peak_bytes": _peak_bytes(ours, device)}
    row["speedup"] = row["reference_s"] / row["s2clip_s"]
    return row


def bench_variant(variant: str, precision: str, device: torch.device, repeats: int, seed: int) -> list[dict[str, Any]]:
    torch.manual_seed(seed)
    encoder = build_sam(variant).image_encoder.to(device)
    with torch.no_grad():
        for block in encoder.blocks:
            block.attn.rel_pos_h.normal_(0.0, 0.5)
            block.attn.rel_pos_w.normal_(0.0, 0.5)
    reference = use_reference_convolutions(use_reference_attention(copy.deepcopy(encoder)))
    x = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(seed)).to(device)
    dtype = DTYPES[precision]

    def run(fn: Any) -> Any:
        def call() -> torch.Tensor:
            with torch.no_grad(), autocast(device, dtype):
                return fn()
        return call

    rows = [
        side_by_side(f"{variant} encoder", run(lambda: reference(x)), run(lambda: encoder(x)), device, repeats),
        side_by_side(f"{variant} Trident guidance input", run(lambda: _hooked_last_block_input(reference, x)),
                     run(lambda: last_block_input(encoder, x)), device, repeats),
    ]
    for row in rows:
        row["precision"] = precision
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="vit_b")
    parser.add_argument("--precisions", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=Path("bench-results/sam_encoder.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = []
    for variant in args.variants.split(","):
        for precision in args.precisions.split(","):
            rows += bench_variant(variant, precision, device, args.repeats, args.seed)

    table = Table(title=f"SAM image encoder at 1024x1024, {device}, {args.threads} thread(s), median of {args.repeats}")
    for col in ("what", "precision", "segment-anything s/img", "s2clip s/img", "speed-up", "max rel diff",
                "peak MiB (s-a)", "peak MiB (s2clip)"):
        table.add_column(col, justify="left" if col == "what" else "right")
    for r in rows:
        table.add_row(r["what"], r["precision"], f"{r['reference_s']:.2f}", f"{r['s2clip_s']:.2f}",
                      f"{r['speedup']:.2f}x", f"{r['max_rel_diff']:.1e}", f"{r['reference_peak_bytes'] / 2**20:.0f}",
                      f"{r['s2clip_peak_bytes'] / 2**20:.0f}")
    Console(width=150).print(table)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "threads": args.threads, "device": str(device),
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}
    args.json.write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    print(json.dumps({"machine": info, "rows": rows}))


if __name__ == "__main__":
    main()
