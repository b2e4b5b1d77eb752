"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class S2ClipError(Exception):
    """A user-facing error (bad input, missing weights, wrong dataset layout...)."""


def one_line(text: object) -> str:
    """``str(text)`` with line breaks collapsed, for one-line error messages."""
    return " ".join(str(text).split())


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
