"""Writing files safely: atomic replacement, JSON that is always valid, output folders.

Every output of s2clip is written to a hidden temporary file beside its destination and renamed
into place once complete, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import S2ClipError, one_line


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    The temporary name keeps the suffix (so writers that pick the format from it work) and is
    hidden (``.name.tmp-XXXX.suffix``). If the body raises, the temporary file is removed and
    ``path`` is left untouched; an ``OSError`` (disk full, permission denied, missing
    directory...) is reported as ``S2ClipError`` naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise S2ClipError(f"cannot write {path}: {one_line(exc.strerror or exc)}") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, *, durable: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path. ``durable``: the data reach the disk
    (fsync) before the rename, so a crash of the machine cannot leave an empty file under the name."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
    return Path(path)


def hash_file(path: str | Path, *algorithms: str) -> tuple[int, dict[str, str]]:
    """(size, ``{algorithm: hex digest}``) of a file, read once in 1 MiB blocks (``hashlib`` names)."""
    digests = {name: hashlib.new(name, usedforsecurity=False) for name in algorithms}  # integrity, not security
    size = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            size += len(block)
            for digest in digests.values():
                digest.update(block)
    return size, {name: digest.hexdigest() for name, digest in digests.items()}


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def json_safe(obj: Any) -> Any:
    """Plain-JSON copy of ``obj``: NaN/inf become ``None``, numpy values and paths are converted."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented UTF-8 JSON, atomically; NaN and infinities are written as ``null``."""
    text = json.dumps(json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


_ONE_LINE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(", ", ": "))  # json's C encoder


class JsonText(str):
    """A value already encoded as one line of JSON (`json_text`): `write_json_items` writes it as it is."""


def json_text(value: Any) -> str:
    """``value`` (plain JSON values) as one line of JSON, as `write_json_items` writes an item."""
    return _ONE_LINE.encode(value)


def write_json_items(path: str | Path, obj: Any, depth: int) -> Path:
    """Write a large document of plain JSON values (str, int, finite float, bool, None, list, dict:
    no numpy, no paths) atomically, streamed: its first ``depth`` levels of lists and dicts indented
    as `write_json` writes them, every value below on one line. The run-level export files (an
    image, an annotation, a task a line) write 5-10x faster and smaller this way than fully
    indented, where each number of a mask's run lengths takes a line; json's C encoder writes each
    item, and a `JsonText` is written as it is. NaN and infinities are a ``ValueError``."""

    def write(fh: Any, value: Any, levels: int, indent: str) -> None:
        inner = indent + "  "
        if levels > 0 and isinstance(value, dict) and value:
            fh.write("{\n")
            for k, (key, item) in enumerate(value.items()):
                fh.write(f"{inner}{_ONE_LINE.encode(str(key))}: ")
                write(fh, item, levels - 1, inner)
                fh.write(",\n" if k < len(value) - 1 else "\n")
            fh.write(indent + "}")
        elif levels > 0 and isinstance(value, list) and value:
            fh.write("[\n")
            for k, item in enumerate(value):
                fh.write(inner)
                write(fh, item, levels - 1, inner)
                fh.write(",\n" if k < len(value) - 1 else "\n")
            fh.write(indent + "]")
        else:
            fh.write(value if isinstance(value, JsonText) else _ONE_LINE.encode(value))

    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        write(fh, obj, depth, "")
        fh.write("\n")
    return Path(path)


def prepare_output_dir(path: str | Path) -> Path:
    """Create the output directory (and its parents) if needed and return it."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise S2ClipError(f"output path {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise S2ClipError(f"cannot create output directory {path}: {one_line(exc.strerror or exc)}") from exc
    return path



# Descriptors of the locks this process holds (fd -> owner pid). A forked child closes its copies at
# once (`_close_locks_in_child`): flock belongs to the open file, shared by every copy of the
# descriptor, so a child that kept one (a decode worker forked after the lock was taken) would hold
# the lock after its parent died — and refuse the resume. O_CLOEXEC covers exec, not fork.
_HELD_LOCKS: dict[int, int] = {}


def _close_locks_in_child() -> None:
    for fd in list(_HELD_LOCKS):
        try:
            os.close(fd)  # this copy only: the parent keeps its lock
        except OSError:
            pass
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_locks_in_child)


@contextmanager
def exclusive_lock(path: Path, busy: Callable[[str], str], *, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive, non-blocking ``flock`` on ``path`` (created with its folder) for the body;
    `S2ClipError` ``busy(holder_pid)`` at once when a live process holds it. The file keeps the
    holder's pid for that message; the lock, not the file, is what counts, so a file left by a killed
    run never blocks. The lock is this process's alone: a child forked while it is held does not
    inherit it (its copy of the descriptor is closed), so it ends with the holder. ``remove``: the
    file is deleted when the body ends (a process that opened it just before is not fooled: it finds
    the name gone and retries on the new file)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:  # never through a link or into a FIFO/device planted under the lock's name
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            reason = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror or exc
            raise S2ClipError(f"cannot open the lock file {path}: {reason}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise S2ClipError(f"cannot open the lock file {path}: it is not a regular file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise S2ClipError(busy(holder) + _stale_holder_note(path, holder)) from None
        if not remove or _names_file(path, fd):
            break
        os.close(fd)  # the previous holder removed the file after we opened it: lock the new one
    owner = os.getpid()
    _HELD_LOCKS[fd] = owner
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner}\n".encode("ascii"), 0)
        yield
    finally:
        if _HELD_LOCKS.pop(fd, None) == owner == os.getpid():  # (a forked child has closed its copy)
            if remove:
                path.unlink(missing_ok=True)
            os.close(fd)  # releases the lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, another user's
        return True
    return True


def _stale_holder_note(path: Path, holder: str) -> str:
    """When the pid recorded in the lock file is gone yet the lock is held: who holds it (processes
    the dead holder left behind, found through /proc on Linux), so the user can stop them."""
    if not holder.isdigit() or _pid_alive(int(holder)):
        return ""
    holders = _processes_holding(path)
    who = f"process{'es' if len(holders) > 1 else ''} {', '.join(map(str, holders))}" if holders else \
        "another process"
    return (f" — pid {holder} has exited, but {who} it left behind still hold{'s' if len(holders) <= 1 else ''} "
            "the lock; stop them (they are left over from the killed run) and rerun")


def _processes_holding(path: Path) -> list[int]:
    """Pids with ``path`` open (Linux /proc; empty where unknown)."""
    try:
        target = os.stat(path)
    except OSError:
        return []
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            for fd in (entry / "fd").iterdir():
                st = os.stat(fd)
                if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
                    pids.append(int(entry.name))
                    break
        except OSError:
            continue
    return sorted(p for p in pids if p != os.getpid())


def _names_file(path: Path, fd: int) -> bool:
    """Whether ``path`` still names the open file ``fd``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
