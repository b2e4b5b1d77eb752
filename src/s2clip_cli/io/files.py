"""Writing files safely: atomic replacement, JSON that is always valid, output folders.

Every output of s2clip is written to a hidden temporary file beside its destination and renamed
into place once complete, so an interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from collections.abc import Iterator
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


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


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

