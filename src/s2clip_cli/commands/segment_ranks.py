"""`segment` on several ranks (``torchrun``, or any launcher exporting ``RANK``/``WORLD_SIZE``/
``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``): which inputs a rank takes, and how the ranks'
counts and run-level export files come together on rank 0.

- **Shares.** Every rank expands the inputs and plans the outputs itself (the same list, in the
  same order, the same states: no rank writes before all have planned); then the inputs left to
  segment are dealt out strided, ``todo[rank::world]``, as `eval` deals out its images, and so are
  the inputs skipped because their outputs are complete (their masks are read back for the
  run-level files). Strided rather than contiguous because a folder walk puts alike files side by
  side (a folder of 24-megapixel photos, then one of thumbnails; the videos of one trip): dealing
  them out gives every rank its part of each. A video is one unit: its frames are decoded in order,
  its overlay video is one stream and its JSON lists every frame, so one rank does all of it.
- **Run-level files.** Each rank keeps what the run-level files hold of its images (`ExportSession`,
  as one process does); at the end rank 0 gathers the other ranks' parts (`io.export.RunRecord`) in
  chunks over the gloo control group (`DistContext.gather_to_main`) and writes coco.json, yolo/data.yaml,
  labelstudio.json and cvat.xml with the same writers as one process: same names, order and ids,
  the same bytes. Nothing goes through files, so a killed run leaves nothing to clean up, and the
  merge does not depend on the output folder being shared (the image sets are, for reruns).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from rich.console import Console
from rich.markup import escape

from ..distributed import DistContext, agreed
from ..errors import S2ClipError, one_line
from ..io.sources import Source

if TYPE_CHECKING:
    from ..io.export import ExportSession

RESUME_HINT = "finished inputs are kept: rerun the same command (with any number of ranks) to continue"
MERGE_CHUNK = 256  # run records a rank sends to rank 0 at a time


@dataclass(frozen=True)
class Share:
    """One rank's inputs: those it segments and those whose complete outputs it reads back."""

    todo: list[Source]
    skipped: list[Source]


def split_inputs(todo: Sequence[Source], skipped: Sequence[Source], rank: int, world_size: int) -> Share:
    """Rank ``rank``'s share of the run: every ``world_size``-th input to segment and every
    ``world_size``-th skipped one, from its own rank on (`DistContext.shard`'s rule). The shares
    of all ranks cover each input exactly once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    return Share(list(todo[rank::world_size]), list(skipped[rank::world_size]))


@dataclass(frozen=True)
class Totals:
    """Counts over every rank, and the slowest rank's segmenting time."""

    done: int
    skipped: int
    failed: int
    seconds: float


def sum_counts(ctx: DistContext, done: int, skipped: int, failed: int, seconds: float) -> Totals:
    """Collective: the counts of every rank summed, the longest time (every rank gets them)."""
    total = ctx.all_reduce_sum(np.array([done, skipped, failed], dtype=np.int64))
    return Totals(int(total[0]), int(total[1]), int(total[2]), ctx.all_reduce_max(seconds))


def merge_run_files(ctx: DistContext, exports: ExportSession, console: Console) -> tuple[str | None, float]:
    """Collective: every rank's run records reach rank 0's session, which writes the run-level files
    (single-process: the session writes them). Returns (on rank 0, the one-line error when they
    could not be written, printed already; the seconds it took)."""
    start = time.perf_counter()

    def adopt(records: list) -> None:
        for record in records:
            exports.add_record(record)

    ctx.gather_to_main([] if ctx.is_main else exports.run_records(), adopt, chunk=MERGE_CHUNK)

    def write() -> str | None:
        if not ctx.is_main:
            return None
        try:
            exports.finish()
        except S2ClipError as exc:
            console.print(f"[bold red]error:[/] {escape(one_line(exc))}", highlight=False, soft_wrap=True)
            return one_line(exc)
        return None

    message = agreed(ctx, write, long_wait=True)
    return message, time.perf_counter() - start
