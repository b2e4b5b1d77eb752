"""The model workers of `s2clip serve`: one worker thread per device of ``--devices``, each with its
own models and its own segmenters, all pulling from one shared bounded queue (a request runs on
whichever worker is free), and stopped together.

- **Queue.** At most `max_queue` requests are admitted at once (running on a worker or waiting for
  one); one more is refused with 503 before anything is queued.
- **Workers.** A `ThreadPoolExecutor` with one thread per worker; each thread binds itself to one
  `Worker` when it starts (its models, its segmenter cache, its device: `torch.cuda.set_device` for
  CUDA, its share of the CPU threads for CPU workers) and keeps it for life, so two requests never
  use the same models at once.
- **Stopping.** `stop` refuses new and queued requests (503); the running ones may finish within the
  grace time, then each is cancelled at its next torch module call (a forward pre-hook that raises on
  the worker threads of this pool only, whichever thread it is). `close` cancels at once and waits
  until every worker is idle.

No web dependency: `serve_service` builds the workers and submits requests here.
"""

from __future__ import annotations

import queue
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import S2ClipError, one_line
from ..models.factory import LoadedModels

T = TypeVar("T")

STOPPING = "the server is stopping; try again once it is back"
CUDA_NAME = re.compile(r"cuda(?::(\d{1,4}))?")


class RequestError(S2ClipError):
    """A request the server refuses: an HTTP status (4xx, or 503 when busy) and one line."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(one_line(message))
        self.status = status


class _Cancelled(BaseException):
    """Raised on a model worker, from inside a module call, when the server stops and the running
    request's grace time is over (a BaseException: no `except Exception` on the way swallows it)."""


# ------------------------------------------------------------------------------ --devices
def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(spec: str) -> list[str]:
    """`--devices`: comma-separated ``cpu``, ``cuda`` (= ``cuda:0``) or ``cuda:N``, one worker each (a
    device may repeat: each worker loads its own models), or ``all`` (every visible GPU once).
    One-line `S2ClipError` for an unknown name, a CUDA device that is not there, or a list mixing
    the CPU with CUDA (a request's answer would depend on the worker it lands on)."""
    text = spec.strip()
    if not text:
        raise S2ClipError("--devices is empty: give e.g. cuda:0,cuda:1 or cpu,cpu")
    if text.lower() == "all":
        count = _cuda_count()
        if count == 0:
            raise S2ClipError("--devices all: no CUDA device is visible (use --devices cpu, or cpu,cpu)")
        return [f"cuda:{index}" for index in range(count)]
    devices = []
    for item in text.split(","):
        name = item.strip().lower()
        if name == "cpu":
            devices.append("cpu")
            continue
        match = CUDA_NAME.fullmatch(name)
        if match is None:
            shown = repr(item.strip()[:20]) if item.strip() else "'' (an empty name)"
            raise S2ClipError(f"--devices: unknown device {shown}; use cpu, cuda, cuda:N or all, comma-separated")
        devices.append(f"cuda:{int(match.group(1) or 0)}")
    cuda = [d for d in devices if d != "cpu"]
    if cuda and len(cuda) < len(devices):
        raise S2ClipError("--devices mixes cpu and cuda: answers would depend on the worker a request lands on; "
                          "run a CPU server of its own")
    if cuda:
        count = _cuda_count()
        if count == 0:
            raise S2ClipError(f"--devices {cuda[0]}: no CUDA device is available (use --devices cpu, or cpu,cpu)")
        missing = next((d for d in cuda if int(d.split(":")[1]) >= count), None)
        if missing is not None:
            raise S2ClipError(f"--devices {missing}: only {count} CUDA device{'s' if count > 1 else ''} visible "
                              f"(cuda:0{f'…cuda:{count - 1}' if count > 1 else ''})")
    return devices


def cpu_threads_each(devices: list[str], available: int) -> int | None:
    """Torch CPU threads per CPU worker: the process's `available` threads split evenly between its
    CPU workers (at least one each); None for a single worker (it keeps the process's setting)."""
    workers = sum(d == "cpu" for d in devices)
    return max(1, available // workers) if workers > 1 else None


# ------------------------------------------------------------------------------ workers
@dataclass(eq=False)
class Worker:
    """One model worker: its device, its models (per served method) and its segmenters (an LRU cache
    per class set, on this worker's models), and what it has done."""

    index: int
    device: str
    models: dict[str, LoadedModels]
    cpu_threads: int | None = None  # torch threads of this worker's thread (CPU workers); None: unchanged
    segmenters: OrderedDict[tuple, Any] = field(default_factory=OrderedDict)
    busy: bool = False
    done: int = 0  # requests answered
    failed: int = 0  # requests that ended in an error on this worker (a bad image, cancelled)

    def bind(self) -> None:
        """Called once on the worker's own thread: its CUDA device, or its share of the CPU threads
        (`torch.set_num_threads` also sets the default of threads that have not run torch yet: the
        same share, as a pool does not mix CPU and CUDA workers)."""
        import torch

        if self.device.startswith("cuda:"):
            torch.cuda.set_device(torch.device(self.device))
        elif self.cpu_threads is not None:
            torch.set_num_threads(self.cpu_threads)

    def row(self) -> dict[str, Any]:
        return {"worker": self.index, "device": self.device, "busy": self.busy, "done": self.done,
                "failed": self.failed}


class WorkerPool:
    """`workers` serving one bounded queue of `max_queue` requests (running or waiting)."""

    def __init__(self, workers: list[Worker], max_queue: int) -> None:
        import torch

        if not workers:
            raise ValueError("a worker pool needs at least one worker")
        self.workers = workers
        self.max_queue = max_queue
        self._unbound: queue.SimpleQueue[Worker] = queue.SimpleQueue()
        for worker in workers:
            self._unbound.put(worker)
        self._local = threading.local()  # .worker: the Worker of a worker thread
        self._executor = ThreadPoolExecutor(max_workers=len(workers), thread_name_prefix="s2clip-model",
                                            initializer=self._bind)
        self._slots = threading.BoundedSemaphore(max_queue)
        self._state = threading.Condition()  # guards pending and each worker's busy/done/failed
        self._pending = 0  # admitted: running or waiting
        self._stopping = threading.Event()
        self._cancel = threading.Event()  # set: running requests stop at their next module call
        self._cancel_timer: threading.Timer | None = None
        self._cancel_hook = torch.nn.modules.module.register_module_forward_pre_hook(self._check_cancel)

    # ------------------------------------------------------------------ worker threads
    def _bind(self) -> None:
        worker = self._unbound.get_nowait()  # one per thread: the executor starts at most len(workers)
        self._local.worker = worker
        worker.bind()

    def current(self) -> Worker:
        """The worker whose thread calls this (only on a worker thread)."""
        worker = getattr(self._local, "worker", None)
        if worker is None:
            raise RuntimeError("WorkerPool.current() called outside a worker thread")
        return worker

    def _check_cancel(self, module: Any, args: Any) -> None:
        """A forward pre-hook on every torch module: a busy worker of this pool stops its run at its
        next module call once cancelled (other threads, and other pools' workers, are untouched)."""
        if self._cancel.is_set():
            worker = getattr(self._local, "worker", None)
            if worker is not None and worker.busy:
                raise _Cancelled

    def _guarded(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs on a worker: `fn`, unless the server is stopping; a cancelled run is a 503."""
        worker = self.current()
        if self._stopping.is_set():
            raise RequestError(STOPPING, 503)
        with self._state:
            worker.busy = True
        ok = False
        try:
            result = fn(*args)
            ok = True
            return result
        except _Cancelled:
            raise RequestError("the server is stopping: this request was cancelled", 503) from None
        finally:
            with self._state:
                worker.busy = False
                worker.done += ok
                worker.failed += not ok
                self._state.notify_all()

    # ------------------------------------------------------------------ the queue
    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue `fn(*args)` for the first free worker (`current()` names it inside `fn`);
        `RequestError` 503 when `max_queue` requests are already admitted or the server stops."""
        if self._stopping.is_set():
            raise RequestError(STOPPING, 503)
        if not self._slots.acquire(blocking=False):
            raise RequestError(f"server busy: {self.max_queue} requests are queued; try again later", 503)
        with self._state:
            self._pending += 1
        try:
            future = self._executor.submit(self._guarded, fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())
        return future

    def _release(self) -> None:
        with self._state:
            self._pending -= 1
        self._slots.release()

    @property
    def pending(self) -> int:
        return self._pending

    def health(self) -> dict[str, Any]:
        """The workers (device, busy, requests done and failed) and the queue: `length` requests
        admitted (running or waiting; at `capacity` the next gets 503), `waiting` for a worker."""
        with self._state:
            rows = [worker.row() for worker in self.workers]
            running = sum(row["busy"] for row in rows)
            pending = self._pending
        return {"workers": rows,
                "queue": {"length": pending, "waiting": max(0, pending - running), "capacity": self.max_queue}}

    # ------------------------------------------------------------------ stopping
    def stop(self, grace_s: float) -> None:
        """Stop taking requests: new and queued ones get 503; the running ones may finish within
        `grace_s`, then are cancelled (503). A second call cancels them now."""
        if self._stopping.is_set():
            self._cancel.set()
            return
        self._stopping.set()
        self._cancel_timer = threading.Timer(grace_s, self._cancel.set)
        self._cancel_timer.daemon = True
        self._cancel_timer.start()

    def close(self, timeout_s: float = 2.0) -> bool:
        """Stop at once (cancel what runs, drop what waits) and wait up to `timeout_s` for every
        worker; True once all are idle (False: a run is stuck outside any module call)."""
        self._stopping.set()
        self._cancel.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._state:
            idle = self._state.wait_for(lambda: not any(w.busy for w in self.workers), timeout_s)
        if self._cancel_timer is not None:
            self._cancel_timer.cancel()
        self._cancel_hook.remove()
        return idle
