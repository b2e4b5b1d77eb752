"""The evaluation loop: decode ahead, predict, count, record durably, sum over ranks, report.

The runner knows nothing about models: ``predict_fn(image, image_id)`` gets an H x W x 3 uint8 RGB
image and returns H x W class indices in the dataset's class index space. Images and labels are
decoded in DataLoader worker processes while the model works (`decode`: they die with the main
process, even on SIGKILL, hold none of its lock, and stop at once on Ctrl-C/SIGTERM). Each finished image's confusion
matrix is appended to ``<work_dir>/records/`` (fsync'd), so a rerun skips finished images and ends
with the same numbers as an uninterrupted run. Under ``torchrun`` the remaining images are split
over the ranks and the confusion matrices summed with ``torch.distributed``; only rank 0 writes
``results.json``, ``results.md`` and ``confusion.npy`` (the summed ``[K, K]`` int64 matrix, rows =
ground truth).

One run per work dir: rank 0 holds an exclusive ``fcntl.flock`` on ``<work_dir>/.lock`` for the whole
run (the other ranks write only their own record files), so a second ``eval`` on a work dir that a
live run holds is refused at once; the lock dies with its process, so a stale lock file never blocks.
A rank that fails stops every rank within a few images (see `distributed.FailureWatch`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.datasets import MAX_EVAL_CLASSES, SegDataset, label_colours
from ..distributed import DistContext, LostContact, PeerFailure, agreed, check_points
from ..errors import S2ClipError
from ..io.files import atomic_write_bytes, exclusive_lock, prepare_output_dir
from ..io.images import read_image
from .decode import Reader, decode_loader, decoding
from .metrics import confusion_matrix, summarize
from .records import RecordLog, RunSignature, rank_log_path, read_all_records, sum_records

PredictFn = Callable[[np.ndarray, str], np.ndarray]
LOCK_NAME = ".lock"
CHECK_EVERY = 8  # images between failure checks across ranks (distributed runs only)


def _pred_path(preds_dir: Path, image_id: str) -> Path:
    """``preds/<id>.png``; ids with folders (Cityscapes ``city/name``) keep them, never escaping."""
    parts = [p for p in image_id.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return preds_dir.joinpath(*parts[:-1], f"{parts[-1] if parts else '_'}.png")


def save_prediction(path: Path, pred: np.ndarray, num_classes: int) -> None:
    """A palette PNG of class indices (VOC colours); a 16-bit grey PNG when there are > 256 classes."""
    if num_classes <= 256:
        img = Image.fromarray(pred.astype(np.uint8)).convert("P")
        img.putpalette(label_colours(256).reshape(-1).tolist())
    else:
        img = Image.fromarray(pred.astype(np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue(), durable=True)


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    for key, dist in (("open_clip", "open_clip_torch"), ("timm", "timm"), ("segment_anything", "segment-anything"),
                      ("numpy", "numpy"), ("s2clip", "s2clip")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def results_markdown(results: dict[str, Any]) -> str:
    """``results.md``: summary, per-class table and configuration."""
    s = results["summary"]
    lines = [f"# s2clip eval — {results['dataset']}", "",
             f"{results['num_images']} images, {results['num_classes']} classes.", "",
             "| mIoU | mAcc | aAcc |", "|---:|---:|---:|",
             f"| {_fmt(s['mIoU'])} | {_fmt(s['mAcc'])} | {_fmt(s['aAcc'])} |", "",
             "## Per class", "",
             "n/a: IoU when the class is neither in the ground truth nor predicted, Acc when it has no "
             "ground-truth pixel; such values are left out of the means.", "",
             "| class | IoU | Acc |", "|---|---:|---:|"]
    for name, iou in results["per_class"]["IoU"].items():
        lines.append(f"| {name} | {_fmt(iou)} | {_fmt(results['per_class']['Acc'][name])} |")
    lines += ["", "## Configuration", "", f"config hash `{results['config_hash']}`", "", "```json",
              json.dumps(results.get("settings", results["config"]), indent=2, sort_keys=True, default=str), "```", "",
              "## Timings and versions", "", "```json",
              json.dumps({"timings": results["timings"], "versions": results["versions"]}, indent=2), "```", ""]
    return "\n".join(lines)


def _progress(console: Any, enabled: bool, title: str) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn(f"[bold]{title}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]} img/s"), TextColumn("mIoU {task.fields[miou]}"),
                    TimeElapsedColumn(), TimeRemainingColumn(),
                    console=console or Console(stderr=True), disable=not enabled, transient=False)


def work_dir_lock(work_dir: Path) -> contextlib.AbstractContextManager[None]:
    """An exclusive lock on ``<work_dir>/.lock`` (creating the folder) for one run: `S2ClipError` at
    once when a live process holds it; a file left by a killed run does not block."""
    return exclusive_lock(work_dir / LOCK_NAME, lambda pid: f"work dir {work_dir} is in use by another s2clip "
                          f"eval (pid {pid}); wait for it to finish or use another --work-dir")


def _checked_work_dir(work_dir: Path) -> Path:
    """`work_dir`, created if needed; `S2ClipError` when it is a file, or when its lock file, records or
    predictions folder is a symbolic link (writing through one would change files outside it, e.g.
    truncate the file a planted ``.lock`` link points to)."""
    work_dir = prepare_output_dir(work_dir)
    for name in (LOCK_NAME, "records", "preds"):
        entry = work_dir / name
        if entry.is_symlink():
            raise S2ClipError(f"work dir {work_dir} holds {name} as a symbolic link (to {os.readlink(entry)}); "
                              "an eval writes only inside its work dir: remove the link or use another --work-dir")
    lock = work_dir / LOCK_NAME
    if lock.exists() and not lock.is_file():
        raise S2ClipError(f"{lock} is not a regular file; remove it or use another --work-dir")
    return work_dir


def lock_work_dirs(work_dirs: Sequence[Path], ctx: DistContext) -> contextlib.ExitStack:
    """Rank 0 takes the lock of every work dir in `work_dirs` (`work_dir_lock`) and every rank learns
    whether it got them (`S2ClipError` at once on rank 0, `PeerFailure` on the others, when a live
    run holds one). Returns the stack holding them: close it (or use it as a context manager) to
    release. A driver calls this before it builds any model, then passes ``locked=True`` to
    `evaluate`."""
    stack = contextlib.ExitStack()
    try:
        agreed(ctx, lambda: [stack.enter_context(work_dir_lock(_checked_work_dir(d))) for d in work_dirs]
                if ctx.is_main else None)
    except BaseException:
        stack.close()
        raise
    return stack


def evaluate(dataset: SegDataset, predict_fn: PredictFn, *, work_dir: Path, config: dict[str, Any],
             limit: int | None = None, save_preds: bool = False, num_workers: int = 2, console: Any = None,
             dist: DistContext | None = None, device: str = "cpu", reader: Reader | None = None,
             check_every: int = CHECK_EVERY, options: dict[str, Any] | None = None,
             locked: bool = False) -> dict[str, Any]:
    """Evaluate ``predict_fn`` on the first ``limit`` samples of ``dataset``; return the results dict.

    ``options``, when given (the CLI's options as `--config` takes them back), is written as the
    results' ``config`` block and ``config`` (the hashed settings) as ``settings``; without it,
    ``config`` is written as ``config``.

    ``config`` (JSON-able) is everything that changes predictions: its hash goes into the records'
    signature, so a work dir holding another configuration's records is refused. ``dist`` defaults
    to :meth:`DistContext.from_env` with ``device`` choosing NCCL vs gloo (and is then closed here).
    ``reader`` decodes an image path to H x W x 3 uint8 RGB (default: ``s2clip_cli.io.images.read_image``).
    With ``save_preds``, palette PNGs of the predictions go to ``work_dir/preds/``
    (only for images predicted in this run). Every rank returns the same dict; rank 0 also writes
    ``results.json``, ``results.md`` and ``confusion.npy`` (rows = ground truth) atomically.

    Rank 0 holds ``work_dir``'s lock for the run (a second run on it is refused at once); ``locked``:
    the caller holds it already (`lock_work_dirs`, taken before the models were built). Under
    several ranks, every ``check_every`` images the ranks exchange a failure flag: when one rank
    raises, every rank raises (`distributed.PeerFailure` on the others) within two check intervals.
    """
    if limit is not None and limit < 0:
        raise S2ClipError(f"--limit must be >= 0, got {limit}")
    if not 1 <= dataset.num_classes <= MAX_EVAL_CLASSES:  # before any K x K matrix is allocated
        raise S2ClipError(f"{dataset.name}: {dataset.num_classes} classes; evaluation takes 1 to {MAX_EVAL_CLASSES}")
    if check_every < 1:
        raise S2ClipError(f"check_every must be >= 1, got {check_every}")
    own_dist = dist is None
    ctx = DistContext.from_env(device) if dist is None else dist
    work_dir = Path(work_dir)
    try:
        with contextlib.ExitStack() as stack:
            # Only rank 0 locks; every rank learns whether it got the lock before going on.
            if not locked:
                stack.enter_context(lock_work_dirs([work_dir], ctx))
            return _evaluate(dataset, predict_fn, work_dir, config, limit, save_preds, num_workers, console,
                             ctx, reader or read_image, check_every, options)
    finally:
        if own_dist:
            ctx.close()


def _open_records(work_dir: Path, rank: int, signature: RunSignature) -> tuple[RecordLog, dict[str, Any]]:
    """This rank's record file (open for appending) and every rank's records read so far."""
    log = RecordLog(rank_log_path(work_dir, rank), signature)
    try:
        return log, read_all_records(work_dir, signature)
    except BaseException:
        log.close()
        raise


def _evaluate(dataset: SegDataset, predict_fn: PredictFn, work_dir: Path, config: dict[str, Any],
              limit: int | None, save_preds: bool, num_workers: int, console: Any, ctx: DistContext,
              reader: Reader, check_every: int, options: dict[str, Any] | None = None) -> dict[str, Any]:
    t_start = time.perf_counter()
    k, ignore = dataset.num_classes, dataset.preset.ignore_index
    ids = dataset.sample_ids if limit is None else dataset.sample_ids[:limit]
    # A preset's data may move; a custom dataset's folders are part of what is being evaluated.
    identity = {"config": config, "class_names": dataset.class_names,
                "source": dataset.source if dataset.name == "custom" else None, "numerics": 2}  # 2: lineage normalisation
    signature = RunSignature.create(dataset.name, k, identity)
    work_dir.mkdir(parents=True, exist_ok=True)
    preds_dir = work_dir / "preds"

    # Every rank has opened its own file and read the same records before any rank appends.
    log, done = agreed(ctx, lambda: _open_records(work_dir, ctx.rank, signature))
    watch = ctx.failure_watch("finished images are kept: rerun with the same --work-dir to resume")
    predict_s, n_new = 0.0, 0
    try:
        todo = [i for i in ids if i not in done]
        longest_shard = math.ceil(len(todo) / ctx.world_size)
        mine = ctx.shard(todo)
        index = {sample_id: i for i, sample_id in enumerate(dataset.sample_ids)}
        loader = decode_loader(dataset, [index[i] for i in mine], reader, num_workers)

        running = sum_records(done, k, ids) if ctx.is_main else np.zeros((k, k), np.int64)
        title = f"eval {dataset.name}" + (f" (rank 0 of {ctx.world_size})" if ctx.is_distributed else "")
        with _progress(console, ctx.is_main, title) as progress:
            task = progress.add_task("eval", total=len(mine), rate="-", miou=_fmt(summarize(
                running, dataset.labels)["mIoU"]))
            t_loop = time.perf_counter()
            with decoding(loader) as batches:
                for item in batches:
                    if item.error is not None or item.image is None or item.label is None:
                        raise S2ClipError(f"{dataset.name} {item.image_id}: {item.error}")
                    image, label = item.image, item.label
                    if image.shape[:2] != label.shape:
                        raise S2ClipError(f"{dataset.name} {item.image_id}: image is {image.shape[1]}x{image.shape[0]} "
                                          f"but its label is {label.shape[1]}x{label.shape[0]} (EXIF-rotated image?)")
                    t0 = time.perf_counter()
                    pred = np.asarray(predict_fn(image, item.image_id))
                    predict_s += time.perf_counter() - t0
                    if pred.shape != label.shape:
                        raise S2ClipError(f"{dataset.name} {item.image_id}: prediction is {pred.shape}, "
                                          f"label is {label.shape}; predictions must be at the label's size")
                    conf = confusion_matrix(pred, label, k, ignore)
                    if save_preds:
                        save_prediction(_pred_path(preds_dir, item.image_id), pred, k)
                    log.append(item.image_id, conf)
                    n_new += 1
                    if n_new % check_every == 0:
                        watch.post()  # raises PeerFailure when another rank has failed
                    if ctx.is_main:
                        running += conf
                        elapsed = time.perf_counter() - t_loop
                        progress.update(task, advance=1, rate=f"{n_new / elapsed:.2f}" if elapsed > 0 else "-",
                                        miou=_fmt(summarize(running, dataset.labels)["mIoU"]))
        # The checks a longer shard posts, then one that every rank waits for: past it, every rank
        # is alive and done, so the final collectives below wait for nobody.
        watch.finish(check_points(longest_shard, check_every))
    except (PeerFailure, LostContact):
        raise  # nothing to tell the others: they know, or they are gone
    except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM: no waiting for the other ranks (they got it
        # too, or see this rank's connections close at their next check)
        before = len(set(done) & set(ids))
        exc.add_note((f"rank {ctx.rank} recorded {n_new} image{'' if n_new == 1 else 's'} in {work_dir} ({before} of {len(ids)} were there "
                      "before)" if ctx.is_distributed else
                      f"{before + n_new} of {len(ids)} images are recorded in {work_dir}")
                     + "; rerun the same command to resume")
        raise
    except BaseException:
        watch.abort()  # the other ranks stop at their next check
        raise
    finally:
        log.close()

    # Every rank has finished its share: sum the records of a fixed partition of all ids.
    records = read_all_records(work_dir, signature)
    final_shard = ctx.shard(ids)
    missing = [i for i in final_shard if i not in records]
    stats = ctx.all_reduce_sum(np.array([len(missing), n_new, round(predict_s * 1e6)], dtype=np.int64))
    if stats[0]:
        raise S2ClipError(f"{int(stats[0])} images have no record after evaluation (first on this rank: "
                          f"{', '.join(missing[:3]) or 'none'}); rerun with the same --work-dir")
    total = ctx.all_reduce_sum(sum_records(records, k, final_shard))
    wall_s = ctx.all_reduce_max(time.perf_counter() - t_start)

    summary = summarize(total, dataset.labels)
    n_run = int(stats[1])
    results: dict[str, Any] = {
        "dataset": dataset.name,
        "num_classes": k,
        "num_images": len(ids),
        "limit": limit,
        "summary": {key: summary[key] for key in ("mIoU", "mAcc", "aAcc", "num_pixels")},
        "per_class": {"IoU": summary["IoU"], "Acc": summary["Acc"]},
        **({"config": config} if options is None else {"config": options, "settings": config}),
        "config_hash": signature.config_hash,
        "versions": _versions(),
        "timings": {"wall_s": wall_s, "predict_s": stats[2] / 1e6, "images_this_run": n_run,
                    "images_resumed": len(ids) - n_run, "images_per_s": n_run / wall_s if wall_s > 0 else None,
                    "world_size": ctx.world_size},
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    if ctx.is_main:
        text = json.dumps(results, indent=2, default=str) + "\n"
        atomic_write_bytes(work_dir / "results.json", text.encode("utf-8"), durable=True)
        atomic_write_bytes(work_dir / "results.md", results_markdown(results).encode("utf-8"), durable=True)
        buf = io.BytesIO()
        np.save(buf, total)
        atomic_write_bytes(work_dir / "confusion.npy", buf.getvalue(), durable=True)
    return results
