"""The one exception type users see: the CLI prints its message on one line and exits non-zero; and
how an interruption (Ctrl-C, SIGTERM) carries where the work stopped."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager


class S2ClipError(Exception):
    """A user-facing error (bad input, missing weights, wrong dataset layout...)."""


def one_line(text: object) -> str:
    """``str(text)`` with line breaks collapsed, for one-line error messages."""
    return " ".join(str(text).split())


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by the CLI's handler (`cli.interrupts`): a `KeyboardInterrupt`, so every cleanup
    that runs on Ctrl-C runs on SIGTERM too; the command exits with ``128 + signum`` (143)."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def interrupt_exit_code(exc: BaseException | None) -> int:
    """The exit status of a command stopped by `exc`: 143 for SIGTERM (`Terminated`), else 130
    (Ctrl-C), as shells report a process killed by that signal (128 + its number)."""
    return 128 + exc.signum if isinstance(exc, Terminated) else 130


def interrupt_message(exc: BaseException | None) -> str:
    """``interrupted``, then what the command noted about where it stopped (``exc.add_note``)."""
    notes = [one_line(n) for n in getattr(exc, "__notes__", None) or [] if str(n).strip()]
    return "; ".join(["interrupted", *notes])


@contextmanager
def noted_on_interrupt(note: Callable[[], str]) -> Iterator[None]:
    """Add ``note()`` (where the work stopped, how to resume) to a Ctrl-C/SIGTERM interruption that
    ends the body; the CLI prints it after ``error: interrupted``."""
    try:
        yield
    except KeyboardInterrupt as exc:
        exc.add_note(note())
        raise
