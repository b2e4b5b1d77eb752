"""Reading files a user hands us: only regular files, never more bytes than a limit.

A path given on the command line or found in a dataset folder may be a FIFO (opening it for
reading blocks until a writer comes), a device (``/dev/zero`` never ends) or a link to one.
:func:`open_regular` opens without blocking and checks what it opened, so such a path is a
one-line error naming it, never a hang; :func:`read_limited` reads at most a limit.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from ..errors import S2ClipError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a ``st_mode`` describes, in words (``a FIFO (named pipe)``, ``a regular file``...)."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def not_regular(path: str | Path, mode: int) -> S2ClipError:
    return S2ClipError(f"refusing to read {path}: it is {file_kind(mode)}, not a regular file")


def open_regular(path: str | Path) -> BinaryIO:
    """Open ``path`` for reading if it is (or links to) a regular file; a FIFO, device, socket or
    folder is an ``S2ClipError`` naming it. Never blocks: the open is non-blocking and the file's
    kind is checked on the opened descriptor (no window between a check and the open)."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise S2ClipError(f"{path} does not exist") from None
    except OSError as exc:
        raise S2ClipError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_limited(fh: BinaryIO, limit: int, where: str) -> bytes:
    """All of ``fh`` if it holds at most ``limit`` bytes; more is an ``S2ClipError`` naming ``where``
    (reads at most ``limit + 1`` bytes, whatever the file claims)."""
    data = fh.read(limit + 1)
    if len(data) > limit:
        raise S2ClipError(f"{where} is larger than {format_bytes(limit)}, the most this file can hold; refusing it")
    return data


def read_regular(path: str | Path, limit: int) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them (see :func:`open_regular`)."""
    with open_regular(path) as fh:
        return read_limited(fh, limit, str(path))


def format_bytes(n: int) -> str:
    """``64 MiB``, ``2 GiB``, ``512 bytes``: a limit in words."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"
