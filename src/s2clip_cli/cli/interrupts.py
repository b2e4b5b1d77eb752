"""How every command stops on Ctrl-C and SIGTERM (`serve` installs its own shutdown over this).

`install` (called once by `cli.main`, before a command runs) sets the two handlers:

- SIGINT raises `KeyboardInterrupt`, as Python's default handler does — unless the process started
  with SIGINT ignored (a background job of a non-interactive shell, `nohup`): it stays ignored;
- SIGTERM raises `errors.Terminated`, a `KeyboardInterrupt`, so both take one path: the drivers'
  clean-ups run (`finally` blocks, `io.outputs.OutputSet`, the decode workers' shutdown), then
  `user_errors` prints ``error: interrupted`` (plus where the command stopped) and exits with 130
  (SIGINT) or 143 (SIGTERM).

Only the first signal raises. Later ones — a second Ctrl-C, or torchrun's agent passing on to its
ranks the signal they already got from the terminal — are ignored so that they cannot break a
clean-up half-way. After an interruption `exit_now` ends the process at once: atexit handlers run,
the interpreter's teardown (seconds once torch is loaded) is skipped.

Python runs a handler only between two bytecodes of the main thread, so one long computation in C
(a large matrix product of a full-size model on a slow CPU) would hold the interruption back. A
watcher thread therefore learns of the signal the moment it arrives (``signal.set_wakeup_fd``): if
the main thread has not taken it `REACT_S` seconds later, the process ends there (nothing is being
written while a model computes); a clean-up still running `FORCE_EXIT_S` seconds after the signal
is cut short too. Either way: one line on stderr and the same exit status. (torch's operations
release the GIL, so the watcher runs beside them; a C call that keeps the GIL — loading an extension
module — holds the watcher back as well, until it returns.)

`serve` replaces the handlers for the life of its server: `uninstall` puts back what `install`
replaced (Python's own), or `installed_handlers` / `restore` save and put back any set; the watcher
bounds only the signals these handlers take. A library user who never calls `install` keeps
Python's own.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any

from ..errors import Terminated

REACT_S = 1.0  # the main thread busy in C this long after the signal: the process ends there
FORCE_EXIT_S = 5.0  # a clean-up still running this long after the signal is cut short
_STOPPING = (signal.SIGINT, signal.SIGTERM)

_first_signal: int | None = None  # the signal that interrupted this process (its handler ran), if any
_taken = threading.Event()  # set when the main thread took the first signal (its handler ran)
_replaced: dict[int, Any] = {}  # the handlers `install` replaced
_wakeup: dict[str, int] = {}  # "previous": the wakeup fd `install` replaced


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Raise the interruption in the main thread (the first signal only)."""
    global _first_signal
    if _first_signal is not None:
        return  # a clean-up is under way: let it finish (bounded by the watcher)
    _first_signal = signum
    _taken.set()
    if signum == signal.SIGTERM:
        raise Terminated(signum)
    raise KeyboardInterrupt


def _watch(read_fd: int) -> None:
    """The watcher thread: wait for the first SIGINT/SIGTERM byte, then bound the time to the exit."""
    signum = None
    while signum is None:
        try:
            data = os.read(read_fd, 64)
        except InterruptedError:
            continue
        except OSError:
            return
        if not data:
            return
        # (a signal another handler took — `serve`'s — is not ours to bound)
        signum = next((b for b in data if b in _STOPPING and signal.getsignal(b) is _on_signal), None)
    arrived = time.monotonic()
    if not _taken.wait(REACT_S):
        _force_exit(128 + signum, f"the command was busy in one computation for {REACT_S:g} s")
    time.sleep(max(0.0, FORCE_EXIT_S - (time.monotonic() - arrived)))
    _force_exit(128 + signum, f"the clean-up was still running {FORCE_EXIT_S:g} s after the signal")


def _force_exit(code: int, why: str) -> None:
    with contextlib.suppress(BaseException):
        os.write(2, f"error: interrupted ({why}; stopped)\n".encode())
        if os.environ.get("S2CLIP_DEBUG"):  # where the main thread was held
            faulthandler.dump_traceback(all_threads=True)
    os._exit(code)


def installed_handlers() -> dict[int, Any]:
    """The current SIGINT and SIGTERM handlers (to put back with `restore`)."""
    return {sig: signal.getsignal(sig) for sig in _STOPPING}


def install() -> dict[int, Any]:
    """Install the handlers and the watcher (main thread only); returns the handlers they replace,
    for `restore`."""
    previous = installed_handlers()
    if previous[signal.SIGINT] is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    if not _replaced:
        _replaced.update(previous)
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        try:
            _wakeup["previous"] = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        except (ValueError, OSError):  # not possible here: no watcher, the handlers alone
            os.close(read_fd)
            os.close(write_fd)
        else:
            threading.Thread(target=_watch, args=(read_fd,), name="s2clip-interrupt-watch", daemon=True).start()
    return previous


def uninstall() -> None:
    """Put back the handlers (and the wakeup fd) the first `install` replaced (main thread only)."""
    restore(_replaced)
    if "previous" in _wakeup:
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(_wakeup.pop("previous"))


def restore(previous: dict[int, Any]) -> None:
    """Put back handlers saved by `install` or `installed_handlers`."""
    for sig, handler in previous.items():
        if handler is not None:
            signal.signal(sig, handler)


def interrupted_by() -> int | None:
    """The signal that interrupted this process (through these handlers), or None."""
    return _first_signal


def _on_late_signal(signum: int, frame: FrameType | None) -> None:
    """A signal during the interpreter's teardown, after the command ended: end the process now."""
    with contextlib.suppress(BaseException):
        os.write(2, b"error: interrupted after the command had finished (its outputs are complete)\n")
    os._exit(128 + signum)


def finishing() -> None:
    """The command has ended without an interruption; the interpreter's teardown (atexit handlers,
    library finalizers: seconds once torch is loaded) follows. A Ctrl-C or SIGTERM arriving then
    ends the process at once, in one line (128 + the signal's number) — not a traceback from inside
    whichever finalizer it interrupted: the command's own clean-ups have all run."""
    for sig in _STOPPING:
        if signal.getsignal(sig) is _on_signal:
            signal.signal(sig, _on_late_signal)


def exit_now(code: int) -> None:
    """After an interruption: flush the output, run the atexit handlers and end the process with
    ``code`` without the interpreter's teardown. Returns (does nothing) when there was none."""
    if _first_signal is None:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BaseException):
            stream.flush()
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    os._exit(code)
