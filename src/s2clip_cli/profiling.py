"""Opt-in timing and memory measurement, shared by the pipeline, the refinements and the benchmarks.

Timing is off unless asked for: a `StageTimer(enabled=False)` does nothing, so `eval` never
synchronises CUDA around every stage. The only CUDA-specific lines are the synchronisation and the
allocator statistics below.
"""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Iterator

import torch


class StageTimer:
    """Adds wall-clock seconds per named stage into `times` (a no-op unless `enabled`).

    On CUDA, the device is synchronised at stage boundaries so that a stage's time is its own."""

    def __init__(self, device: torch.device | str = "cpu", *, enabled: bool = True,
                 times: dict[str, float] | None = None) -> None:
        self.device = torch.device(device)
        self.enabled = enabled
        self.times: dict[str, float] = {} if times is None else times

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


def _status_kib(field: str) -> int:
    """A ``/proc/self/status`` memory field in KiB (0 where there is no such file)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _release_free_heap() -> None:
    """Return freed heap memory to the OS (glibc), so that the next peak counts new memory only."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux VmHWM)."""
    return _status_kib("VmHWM") * 1024


class PeakMemory:
    """Peak memory of a block above its start: CUDA allocator peak on a CUDA device; on the CPU,
    the peak resident set size (Linux VmHWM, reset through ``/proc/self/clear_refs`` after freed
    heap memory is given back to the OS, so memory that earlier work freed is not reused unseen)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.method = ("torch.cuda.max_memory_allocated above start" if self.device.type == "cuda"
                       else "peak RSS (VmHWM, reset, after malloc_trim) above RSS at start")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            _release_free_heap()
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")
            self._base = current_rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self.peak_bytes = max(0, peak_rss_bytes() - self._base)
