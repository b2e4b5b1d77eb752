"""The one exception type users see: the CLI prints its message on one line and exits non-zero."""


class S2ClipError(Exception):
    """A user-facing error (bad input, missing weights, wrong dataset layout...)."""
