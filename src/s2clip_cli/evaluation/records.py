"""Durable per-image evaluation records, so an interrupted ``eval`` resumes where it stopped.

Each rank appends to its own file ``<work_dir>/records/rank-<r>.jsonl``. A file is text, one
record per line, every line ``<crc32 of the JSON, 8 hex digits> <JSON>\\n``:

* line 1, the header: ``{"kind": "s2clip-eval-records", "version": 1, "signature": {...}}``;
* then one line per finished image: ``{"id": ..., "i": [flat indices], "c": [counts]}``, the
  non-zero entries of its ``[K, K]`` confusion matrix.

Every append is flushed and ``os.fsync``'d before the next image starts, so a crash or Ctrl-C loses
at most the image in flight. Reading stops at the first line that is incomplete or fails its
checksum; the owner truncates the file there before appending again. A file whose header carries
another signature (dataset, number of classes, config hash) is refused: results of different
configurations never mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import S2ClipError

KIND = "s2clip-eval-records"
VERSION = 1
Sparse = tuple[np.ndarray, np.ndarray]  # (flat indices, counts), both int64
MAX_COUNT = 1 << 40  # pixels of one image in one cell: more is a damaged record (sums stay far from overflow)


def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able configuration (keys sorted; non-JSON values via ``str``)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class RunSignature:
    """What must match for records to be summed together."""

    dataset: str
    num_classes: int
    config_hash: str

    @classmethod
    def create(cls, dataset: str, num_classes: int, config: Mapping[str, Any]) -> RunSignature:
        return cls(dataset, int(num_classes), config_hash(config))

    def describe(self) -> str:
        return f"dataset {self.dataset}, {self.num_classes} classes, config {self.config_hash}"


def _encode(obj: dict[str, Any]) -> bytes:
    payload = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return b"%08x " % zlib.crc32(payload) + payload + b"\n"


def _decode(line: bytes) -> dict[str, Any] | None:
    """The JSON object of one complete line (without its newline), or None if it is damaged."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    payload = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        obj = json.loads(payload.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def _parse_record(obj: dict[str, Any], kk: int) -> tuple[str, Sparse] | None:
    image_id, idx, cnt = obj.get("id"), obj.get("i"), obj.get("c")
    if not isinstance(image_id, str) or not isinstance(idx, list) or not isinstance(cnt, list):
        return None
    if len(idx) != len(cnt) or not all(type(v) is int for v in (*idx, *cnt)):
        return None
    try:
        idx_a, cnt_a = np.asarray(idx, dtype=np.int64), np.asarray(cnt, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        return None
    if idx_a.ndim != 1 or (idx_a.size and (idx_a.min() < 0 or idx_a.max() >= kk or cnt_a.min() < 0
                                           or cnt_a.max() > MAX_COUNT)):
        return None
    return image_id, (idx_a, cnt_a)


def _int_or_zero(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RecordLog:
    """One rank's append-only record file (``writable``) or a read-only view of another's."""

    def __init__(self, path: Path, signature: RunSignature, *, writable: bool = True) -> None:
        self.path = Path(path)
        self.signature = signature
        self.writable = writable
        self._records: dict[str, Sparse] = {}
        self._fh: Any = None
        valid_end, size = self._load()
        if writable:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise S2ClipError(f"cannot create the records folder {self.path.parent}: "
                                  f"{exc.strerror or exc}; use a new --work-dir") from None
            if valid_end == 0:
                self._write_header()
            elif valid_end < size:  # drop a partial or corrupt tail before appending after it
                with open(self.path, "r+b") as fh:
                    fh.truncate(valid_end)
                    fh.flush()
                    os.fsync(fh.fileno())
            self._fh = open(self.path, "ab")  # noqa: SIM115 - kept open across appends, closed in close()

    # -- reading -------------------------------------------------------------------------------
    def _load(self) -> tuple[int, int]:
        """Parse the file; return (end of the valid prefix, file size). 0 means "no valid header"."""
        try:
            st = self.path.lstat()  # a link is refused, not followed: appending through it would write elsewhere
        except FileNotFoundError:
            return 0, 0
        except OSError as exc:
            raise S2ClipError(f"cannot read evaluation records {self.path}: {exc.strerror or exc}") from None
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block, a device never end
            raise S2ClipError(f"evaluation records {self.path} is not a regular file; use a new --work-dir")
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise S2ClipError(f"cannot read evaluation records {self.path}: {exc.strerror or exc}") from None
        kk = self.signature.num_classes ** 2
        pos = 0
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            obj = _decode(data[pos:nl])
            if obj is None:
                break
            if pos == 0:
                self._check_header(obj)
            else:
                parsed = _parse_record(obj, kk)
                if parsed is None:
                    break
                self._records.setdefault(*parsed)
            pos = nl + 1
        return pos, len(data)

    def _check_header(self, obj: dict[str, Any]) -> None:
        if obj.get("kind") != KIND or obj.get("version") != VERSION:
            raise S2ClipError(f"{self.path} is not an s2clip evaluation record file (version {VERSION}); "
                              "use a new --work-dir")
        stored = obj.get("signature")
        if stored != asdict(self.signature):
            if not isinstance(stored, dict):
                raise S2ClipError(f"{self.path} has a damaged header (no run signature); use a new --work-dir")
            theirs = RunSignature(str(stored.get("dataset")), _int_or_zero(stored.get("num_classes")),
                                  str(stored.get("config_hash")))
            raise S2ClipError(f"work dir {self.path.parent.parent} holds results of another configuration "
                              f"({theirs.describe()}; this run: {self.signature.describe()}); "
                              "use a new --work-dir, or delete the old one to start over")

    def done_ids(self) -> set[str]:
        return set(self._records)

    def records(self) -> dict[str, Sparse]:
        return dict(self._records)

    def total(self, ids: Iterable[str] | None = None) -> np.ndarray:
        """Sum of the confusion matrices of ``ids`` (all records when None; unknown ids are skipped)."""
        return sum_records(self._records, self.signature.num_classes, ids)

    # -- writing -------------------------------------------------------------------------------
    def _write_header(self) -> None:
        header = {"kind": KIND, "version": VERSION, "signature": asdict(self.signature)}
        tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as fh:
            fh.write(_encode(header))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)

    def append(self, image_id: str, conf: np.ndarray) -> None:
        """Record one finished image durably (flushed and fsync'd before returning)."""
        if self._fh is None:
            raise RuntimeError(f"{self.path} is not open for appending")
        k = self.signature.num_classes
        conf = np.asarray(conf)
        if conf.shape != (k, k):
            raise ValueError(f"confusion matrix {conf.shape} does not match {k} classes")
        flat = conf.reshape(-1).astype(np.int64)
        idx = np.flatnonzero(flat)
        self._fh.write(_encode({"id": image_id, "i": idx.tolist(), "c": flat[idx].tolist()}))
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._records.setdefault(image_id, (idx.astype(np.int64), flat[idx]))

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> RecordLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sum_records(records: Mapping[str, Sparse], num_classes: int, ids: Iterable[str] | None = None) -> np.ndarray:
    """Dense ``[K, K]`` int64 sum of sparse records (those of ``ids`` when given; unknown ids skipped)."""
    total = np.zeros(num_classes * num_classes, dtype=np.int64)
    for key in records if ids is None else ids:
        rec = records.get(key)
        if rec is not None:
            np.add.at(total, rec[0], rec[1])
    return total.reshape(num_classes, num_classes)


def records_dir(work_dir: Path) -> Path:
    return Path(work_dir) / "records"


def rank_log_path(work_dir: Path, rank: int) -> Path:
    return records_dir(work_dir) / f"rank-{rank:05d}.jsonl"


def read_all_records(work_dir: Path, signature: RunSignature) -> dict[str, Sparse]:
    """Every record of every rank file in ``work_dir`` (read-only; damaged tails ignored).

    Covers files of earlier runs with another number of ranks. An id recorded twice keeps its
    first record (files in name order).
    """
    merged: dict[str, Sparse] = {}
    folder = records_dir(work_dir)
    if not folder.is_dir():
        return merged
    for path in sorted(folder.glob("rank-*.jsonl")):
        for key, rec in RecordLog(path, signature, writable=False).records().items():
            merged.setdefault(key, rec)
    return merged
