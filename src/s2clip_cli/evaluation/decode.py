"""Decoding ahead for the evaluation loop: images and labels read in DataLoader worker processes
while the model works, and workers that never outlive the run.

The workers start with `processes.worker_init` (they die with the main process, even on SIGKILL,
and leave Ctrl-C/SIGTERM to it); they are forked after the work dir was locked but hold none of its
lock (`io.files.exclusive_lock`). `stop_workers` ends them: at the end of a run as torch does (they
finish and exit), after an error or an interruption at once — torch's own shutdown waits up to 5 s
per worker for a worker that is busy or blocked writing to a queue nobody reads any more.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.datasets import SegDataset
from ..errors import S2ClipError
from ..processes import worker_init

Reader = Callable[[Path], np.ndarray]
KILL_AFTER_S = 0.5  # after an error, workers still alive this long after being told to stop are killed


@dataclass
class DecodedItem:
    """One decoded sample, or the reason it could not be decoded (raised in the main process)."""

    image_id: str
    image: np.ndarray | None
    label: np.ndarray | None
    error: str | None = None


class DecodeSet(torch.utils.data.Dataset):
    """The samples to evaluate, decoded (image + mapped label) inside DataLoader workers."""

    def __init__(self, dataset: SegDataset, indices: list[int], reader: Reader) -> None:
        self.dataset, self.indices, self.reader = dataset, indices, reader

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> DecodedItem:
        i = self.indices[k]
        image_id = self.dataset.samples[i].id
        try:
            image = np.ascontiguousarray(self.reader(self.dataset.image_path(i)))
            label = self.dataset.load_label(i)
        except Exception as exc:  # noqa: BLE001 - reported, with the image id, by the main process
            return DecodedItem(image_id, None, None, str(exc) if isinstance(exc, S2ClipError)
                               else f"{type(exc).__name__}: {exc}")
        return DecodedItem(image_id, image, label)


def _as_is(item: DecodedItem) -> DecodedItem:
    return item


def decode_loader(dataset: SegDataset, indices: list[int], reader: Reader, num_workers: int) -> torch.utils.data.DataLoader:
    """A DataLoader yielding `DecodedItem`s of ``dataset``'s samples ``indices`` in order, decoded by
    ``num_workers`` worker processes (0: in this process)."""
    workers = min(num_workers, len(indices))
    return torch.utils.data.DataLoader(
        DecodeSet(dataset, indices, reader), batch_size=None, shuffle=False, num_workers=workers,
        collate_fn=_as_is, prefetch_factor=2 if workers > 0 else None,
        worker_init_fn=functools.partial(worker_init, os.getpid()) if workers > 0 else None)


@contextlib.contextmanager
def decoding(loader: torch.utils.data.DataLoader) -> Iterator[Iterator[DecodedItem]]:
    """Iterate ``loader``; its workers are stopped when the body ends (`stop_workers`), at once
    when it ends with an exception (an interruption included)."""
    batches = iter(loader)
    try:
        yield batches
    except BaseException:
        stop_workers(batches, now=True)
        raise
    else:
        stop_workers(batches, now=False)


def stop_workers(batches: Any, *, now: bool) -> None:
    """Shut down the worker processes of a DataLoader iterator. ``now``: kill those still running
    after `KILL_AFTER_S` (their items are not wanted any more) instead of torch's 5 s per worker."""
    workers = list(getattr(batches, "_workers", []))
    shutdown = getattr(batches, "_shutdown_workers", None)
    if not workers or shutdown is None:
        return
    timer = None
    if now:
        _forget_worker_pids(batches)  # else torch's SIGCHLD check takes the kill below for a crash
        timer = threading.Timer(KILL_AFTER_S, _kill, args=(workers,))
        timer.daemon = True
        timer.start()
    try:
        shutdown()
    finally:
        if timer is not None:
            timer.cancel()
        _kill(workers)  # (torch terminates stragglers with SIGTERM, which workers ignore)


def _forget_worker_pids(batches: Any) -> None:
    """Take the iterator's workers off torch's list of workers whose death is an error."""
    if getattr(batches, "_worker_pids_set", False):
        with contextlib.suppress(Exception):
            from torch.utils.data._utils import signal_handling

            signal_handling._remove_worker_pids(id(batches))
            batches._worker_pids_set = False


def _kill(workers: list[Any]) -> None:
    for worker in workers:
        with contextlib.suppress(Exception):
            if worker.is_alive():
                worker.kill()
                worker.join(1.0)
