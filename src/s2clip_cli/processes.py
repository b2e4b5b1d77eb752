"""Worker processes that end with their parent.

s2clip's worker processes (eval's DataLoader decode workers, `data prepare`'s conversion pool) run
`worker_init(parent_pid)` first:

- **they die with their parent**, even when it is killed with SIGKILL (the OOM killer): on Linux
  the kernel sends them SIGKILL when it dies (``prctl(PR_SET_PDEATHSIG)``); a worker whose parent
  died before that call exits at once; and a watchdog thread checks every `WATCH_S` seconds that the
  parent is still theirs (other platforms, and belt and braces). PR_SET_PDEATHSIG fires when the
  *thread* that started the worker ends, so workers must be started from a thread that lives as
  long as the process (s2clip starts them from the main thread);
- **they leave signals to their parent**: SIGINT and SIGTERM are ignored, so a Ctrl-C sent to the
  process group stops the parent, which then stops its workers (no traceback from each worker, no
  worker that dies while the parent still counts on it).

A worker never holds a lock of its parent: `io.files.exclusive_lock` closes its descriptors in any
forked child.

Processes s2clip does not start itself — the ranks torchrun's agent starts — use `stop_when_orphaned`:
when the agent dies (killed with SIGKILL, it cannot stop them), each rank stops as on SIGTERM (its
clean-up runs, the work dir's lock is released) instead of computing on alone. Only a watchdog thread
here: PR_SET_PDEATHSIG would fire when the agent's *thread* that started the rank ends, which s2clip
does not control.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

WATCH_S = 0.5  # how often a worker checks that its parent is alive
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _ask_kernel_to_kill_on_parent_death() -> bool:
    """Linux: SIGKILL this process when its parent (thread) dies. False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCH_S)
    os.kill(os.getpid(), sig)


def die_with_parent(parent_pid: int) -> None:
    """In a child process: end when the process `parent_pid` (its parent) ends, however it ends."""
    _ask_kernel_to_kill_on_parent_death()
    if os.getppid() != parent_pid:  # the parent died before the kernel was asked
        os.kill(os.getpid(), signal.SIGKILL)  # nothing of a worker is worth a clean-up
    threading.Thread(target=_watch_parent, args=(parent_pid,), name="s2clip-parent-watch", daemon=True).start()


def worker_init(parent_pid: int, *_: object) -> None:
    """First thing in an s2clip worker process (a DataLoader ``worker_init_fn`` via
    ``functools.partial(worker_init, os.getpid())``, a pool's ``initializer``): die with the parent,
    leave SIGINT and SIGTERM to it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent_pid)


def stop_when_orphaned(parent_pid: int) -> None:
    """Send this process SIGTERM when its parent ``parent_pid`` has died (checked every `WATCH_S`)."""
    threading.Thread(target=_watch_parent, args=(parent_pid, signal.SIGTERM), name="s2clip-parent-watch",
                     daemon=True).start()
