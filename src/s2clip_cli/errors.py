"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class S2ClipError(Exception):
    """A user-facing error (bad input, missing weights, wrong dataset layout...)."""


def one_line(text: object) -> str:
    """``str(text)`` with line breaks collapsed, for one-line error messages."""
    return " ".join(str(text).split())
