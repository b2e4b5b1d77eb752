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
clean-up half-way; a clean-up still running `FORCE_EXIT_S` seconds after the first signal is cut
short (one line on stderr, the same exit status). After an interruption `exit_now` ends the process
at once: atexit handlers run, the interpreter's teardown (seconds once torch is loaded) is skipped.

`serve` replaces the handlers for the life of its server and puts these back after it
(`installed_handlers` / `restore`); a library user who never calls `install` keeps Python's own.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from ..errors import Terminated

FORCE_EXIT_S = 5.0  # a clean-up still running this long after the first signal is cut short

_first_signal: int | None = None  # the signal that interrupted this process, once one has


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """Raise the interruption in the main thread (the first signal only)."""
    global _first_signal
    if _first_signal is not None:
        return  # a clean-up is under way: let it finish (bounded by the backstop below)
    _first_signal = signum
    backstop = threading.Timer(FORCE_EXIT_S, _force_exit, args=(128 + signum,))
    backstop.daemon = True
    backstop.start()
    if signum == signal.SIGTERM:
        raise Terminated(signum)
    raise KeyboardInterrupt


def _force_exit(code: int) -> None:
    """The backstop: the clean-up after an interruption has hung; end the process now."""
    with contextlib.suppress(BaseException):
        os.write(2, f"error: interrupted (the clean-up was still running after {FORCE_EXIT_S:g} s; "
                    "stopped)\n".encode())
    os._exit(code)


def installed_handlers() -> dict[int, Any]:
    """The current SIGINT and SIGTERM handlers (to put back with `restore`)."""
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def install() -> dict[int, Any]:
    """Install the handlers (main thread only); returns the ones they replace, for `restore`."""
    previous = installed_handlers()
    if previous[signal.SIGINT] is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    return previous


def restore(previous: dict[int, Any]) -> None:
    """Put back handlers saved by `install` or `installed_handlers`."""
    for sig, handler in previous.items():
        if handler is not None:
            signal.signal(sig, handler)


def interrupted_by() -> int | None:
    """The signal that interrupted this process (through these handlers), or None."""
    return _first_signal


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
