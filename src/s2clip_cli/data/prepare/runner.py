"""Running a preparation: plan, skip what is already done, convert the rest in worker processes,
record progress, write the manifest.

``prepare(name, raw, out)`` is the whole capability: it finds the official downloads in ``raw``
(archives read in place, or extracted folders), writes the val split in exactly the layout
``open_dataset(name, out)`` reads, and is resumable: an output recorded in the manifest or the
progress file whose size and SHA-256 still match is not redone, so an interrupted run continues
where it stopped and a finished one is only verified. Every output is written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL

from ... import __version__
from ...errors import S2ClipError, noted_on_interrupt, one_line
from ...io.files import atomic_path, atomic_write_bytes, exclusive_lock, prepare_output_dir
from ...processes import worker_init
from ..presets import get_preset
from ..sources import default_data_root, source_for
from . import ade20k, cityscapes, coco, context, voc
from .archives import Blob, RawIndex, check_readable, close_archives, read_blob, spill_compressed
from .common import Job, Payload, Plan
from .manifest import (
    FileRecord,
    file_record,
    is_current,
    load_records,
    remove_progress,
    remove_stale_temporaries,
    write_manifest,
    write_progress,
)

ProgressCallback = Callable[[int, int, str], None]  # (done, total, stage)

PLANNERS: dict[str, Callable[[RawIndex], Plan]] = {
    "voc": voc.plan, "context": context.plan, "coco": coco.plan, "cityscapes": cityscapes.plan,
    "ade20k": ade20k.plan,
}
LOCK_NAME = ".s2clip-data.lock"
SPILL_DIR = ".s2clip-data-spill"
CHECKPOINT_SECONDS = 2.0
STOP_GRACE_S = 0.5  # after Ctrl-C, how long the conversions under way may take to finish


@dataclass
class PrepareSummary:
    """What a preparation did: where, how many samples, how many were (re)written or already done."""

    name: str
    preparation: str
    presets: tuple[str, ...]
    out: Path
    manifest: Path
    samples: int
    written: int  # samples converted by this run
    skipped: int  # samples already present and verified
    official: int  # the official val size
    route: str
    sources: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ one job
def output_path(root: Path, rel: str) -> Path:
    """``root / rel``, the one way a preparation names a file it writes: ``rel`` must be a plain
    relative path (no absolute path, no ``..``, ``.`` or empty part, no backslash) and must resolve
    inside ``root`` even through links already in the output (``root/JPEGImages`` linked elsewhere).
    Anything else is an ``S2ClipError``: a path read from a download never leaves the output folder."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or "\\" in rel or "\0" in rel or any(p in ("", ".", "..") for p in parts):
        raise S2ClipError(f"refusing to write {rel!r}: not a plain relative path inside the output folder {root}")
    dest = root / rel
    real_root = root.resolve()
    parent = dest.parent.resolve()
    if parent != real_root and real_root not in parent.parents:
        raise S2ClipError(f"refusing to write {dest}: it leads to {parent / dest.name}, outside the output folder "
                          f"{root}")
    return dest


def _write_output(root: Path, rel: str, payload: Payload) -> FileRecord:
    dest = output_path(root, rel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(payload, Blob):
        if payload.kind != "file":
            payload = read_blob(payload)
        else:
            src = Path(payload.path)
            if dest.exists() and os.path.samefile(src, dest):  # prepared in place
                return file_record(root, rel)
            with atomic_path(dest) as tmp:
                try:
                    os.link(src, tmp)  # same file system: no copy of big image folders
                except OSError:
                    shutil.copyfile(src, tmp)
            return file_record(root, rel)
    atomic_write_bytes(dest, payload)
    return FileRecord(rel, len(payload), hashlib.sha256(payload).hexdigest())


def run_job(job: Job, root: str) -> list[FileRecord]:
    """Convert one sample and write its outputs under ``root`` (runs in a worker process)."""
    try:
        payloads = job.convert(job)
        return [_write_output(Path(root), rel, payloads[rel]) for rel in job.outputs]
    except S2ClipError:
        raise
    except Exception as exc:  # noqa: BLE001 - name the sample in one line
        inputs = ", ".join(b.describe() for b in job.inputs.values())
        raise S2ClipError(f"cannot prepare {job.key} ({inputs}): {type(exc).__name__}: {one_line(exc)}") from None


# ------------------------------------------------------------------------------------------ execution
def _execute(jobs: list[Job], root: Path, workers: int, on_done: Callable[[list[FileRecord]], None]) -> None:
    """Run ``jobs`` in order (workers <= 1) or in a process pool; ``on_done`` gets each job's records.
    On an error every finished job is still reported before the first error is raised."""
    if workers <= 1:
        try:
            for job in jobs:
                on_done(run_job(job, str(root)))
        finally:
            close_archives()
        return
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: inherits no lock, no thread
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker_init,
                               initargs=(os.getpid(),))  # they die with this process, leave Ctrl-C to it
    running: set[Future] = set()
    job_of: dict[Future, Job] = {}
    error: BaseException | None = None
    queue = iter(jobs)
    try:
        while error is None:
            while len(running) < 4 * workers and (job := next(queue, None)) is not None:
                fut = pool.submit(run_job, job, str(root))
                running.add(fut)
                job_of[fut] = job
            if not running:
                break
            finished, running = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                try:
                    on_done(fut.result())
                except BrokenProcessPool:
                    error = error or S2ClipError("a worker process died unexpectedly (out of memory or "
                                                 "killed?); rerun to resume, perhaps with fewer --workers")
                except BaseException as exc:  # noqa: BLE001 - first error wins, others still recorded
                    error = error or exc
    except BaseException as exc:  # KeyboardInterrupt (or SIGTERM) while waiting
        error = exc
    finally:
        for fut in running:
            fut.cancel()
        if isinstance(error, KeyboardInterrupt):  # the running jobs get a moment to finish, then stop
            _stop_pool(pool, {fut: job_of[fut] for fut in running}, root)
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in running:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                on_done(fut.result())
    if error is not None:
        raise error


def _stop_pool(pool: ProcessPoolExecutor, running: dict[Future, Job], root: Path) -> None:
    """After an interruption: wait up to `STOP_GRACE_S` for the jobs under way (what finishes is
    kept), then kill the workers and remove the temporary files the killed jobs were writing."""
    wait(running, timeout=STOP_GRACE_S)
    unfinished = [job for fut, job in running.items() if not fut.done()]
    if not unfinished:
        return
    workers = list((getattr(pool, "_processes", None) or {}).values())
    for process in workers:
        with contextlib.suppress(Exception):
            process.kill()
    for process in workers:
        with contextlib.suppress(Exception):
            process.join(1.0)
    remove_stale_temporaries({output_path(root, rel).parent for job in unfinished for rel in job.outputs})


def _locked(root: Path) -> AbstractContextManager[None]:
    """One preparation at a time per output folder (a lock file left by a killed run does not block).
    The lock file is opened for writing, so one planted as a link (a raw folder prepared in place)
    is refused rather than followed."""
    for name in (LOCK_NAME, SPILL_DIR):
        if (root / name).is_symlink():
            raise S2ClipError(f"refusing to use {root / name}: it is a symbolic link (to {(root / name).resolve()}); "
                              "remove it")
    return exclusive_lock(root / LOCK_NAME, lambda pid: f"another `s2clip data prepare` (pid {pid}) is writing "
                          f"to {root}; wait for it to finish", remove=True)


# ------------------------------------------------------------------------------------------ prepare
def prepare(name: str, raw: str | Path, out: str | Path | None = None, *, workers: int = 0,
            progress: ProgressCallback | None = None) -> PrepareSummary:
    """Prepare the val split of preset ``name`` from the official downloads in ``raw`` into ``out``
    (default: :func:`~s2clip_cli.data.sources.default_data_root`).

    Presets that share files share one preparation: voc21/voc20, context60/context59,
    coco_stuff164k/coco_object (both label kinds are written). ``workers`` > 1 converts in that
    many processes; 0 or 1 works in this process. ``progress(done, total, stage)`` is called as
    samples finish. Returns a :class:`PrepareSummary`; raises ``S2ClipError`` (one line, naming
    the file) on a missing download, a damaged archive, an image without label, or a raw value
    that cannot occur.
    """
    get_preset(name)  # an unknown name is an error naming the choices
    if workers < 0:
        raise S2ClipError(f"--workers must be >= 0, got {workers}")
    source = source_for(name)
    report = progress or (lambda done, total, stage: None)
    report(0, 0, "searching the downloads")
    index = RawIndex(raw)
    plan = PLANNERS[source.preparation](index)
    root = prepare_output_dir(out if out is not None else default_data_root(name))
    _check_plan(plan, root)
    warnings = list(index.unreadable) + plan.warnings
    with _locked(root):
        known = load_records(root, plan.preparation)
        records: dict[str, FileRecord] = {}
        pending: list[Job] = []
        total = len(plan.jobs)
        for i, job in enumerate(plan.jobs):
            recs = [known.get(rel) for rel in job.outputs]
            if all(r is not None and is_current(root, r) for r in recs):
                records.update({r.rel: r for r in recs if r is not None})
            else:
                pending.append(job)
            report(i + 1, total, "verifying existing outputs")
        skipped = total - len(pending)
        remove_stale_temporaries({(root / rel).parent for job in pending for rel in job.outputs})
        spill = root / SPILL_DIR
        try:
            pending = _spilled(pending, spill)
            _run(plan, pending, root, workers, records, report, skipped)
            for rel, data in plan.extras.items():
                records[rel] = _write_output(root, rel, data)
        finally:
            shutil.rmtree(spill, ignore_errors=True)
        if total != source.official_val:
            warnings.append(f"{total} val samples prepared; the official {source.title} val split has "
                            f"{source.official_val}")
        manifest = write_manifest(root, _manifest_fields(plan, source.presets, index, total, source.official_val),
                                  records)
        remove_progress(root)
    report(total, total, "done")
    return PrepareSummary(name, plan.preparation, source.presets, root, manifest, total, len(pending), skipped,
                          source.official_val, plan.route, plan.sources, warnings)


def _check_plan(plan: Plan, root: Path) -> None:
    """Before anything is read or written: every output stays inside ``root`` and every input is a
    readable regular file whose (declared) size a sample file can have."""
    for job in plan.jobs:
        for rel in job.outputs:
            output_path(root, rel)
        for blob in job.inputs.values():
            check_readable(blob)
    for rel in plan.extras:
        output_path(root, rel)


def _spilled(jobs: list[Job], spill: Path) -> list[Job]:
    """Jobs whose compressed-tar inputs now point at copies extracted (only those) into ``spill``."""
    blobs = [b for job in jobs for b in job.inputs.values() if b.kind == "tarz"]
    if not blobs:
        return jobs
    copies = spill_compressed(blobs, spill)
    return [replace(job, inputs={k: copies.get(b, b) for k, b in job.inputs.items()}) for job in jobs]


def _run(plan: Plan, pending: list[Job], root: Path, workers: int, records: dict[str, FileRecord],
         report: ProgressCallback, skipped: int) -> None:
    total = len(plan.jobs)
    state = {"done": skipped, "saved": time.monotonic(), "dirty": False}

    def on_done(recs: list[FileRecord]) -> None:
        records.update({r.rel: r for r in recs})
        state["done"] += 1
        state["dirty"] = True
        report(state["done"], total, "converting")
        if time.monotonic() - state["saved"] > CHECKPOINT_SECONDS:
            write_progress(root, plan.preparation, records)
            state["saved"], state["dirty"] = time.monotonic(), False

    report(skipped, total, "converting")
    try:
        with noted_on_interrupt(lambda: f"{state['done']} of {total} samples are done in {root}; rerun the same "
                                "command to continue"):
            _execute(pending, root, workers, on_done)
    finally:
        if state["dirty"]:
            write_progress(root, plan.preparation, records)


def _manifest_fields(plan: Plan, presets: tuple[str, ...], index: RawIndex, samples: int,
                     official: int) -> dict[str, Any]:
    return {
        "tool": "s2clip data prepare",
        "s2clip_version": __version__,
        "preparation": plan.preparation,
        "presets": list(presets),
        "split": "val",
        "route": plan.route,
        "raw": str(index.raw.resolve()),
        "sources": plan.sources,
        "counts": {"samples": samples, "official_val": official, "complete": samples == official},
        "versions": {"pillow": PIL.__version__, "numpy": np.__version__, **plan.info},
    }
