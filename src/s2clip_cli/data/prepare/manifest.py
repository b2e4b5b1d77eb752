"""The record of a prepared folder: which outputs exist with which size and hash.

``s2clip-data.json`` (the manifest, in the output root) is written once a preparation completes.
While it runs, ``.s2clip-data-progress.json`` (same root) is rewritten atomically every few
seconds with the outputs finished so far, so an interrupted run resumes where it stopped. An
output counts as done only if it is recorded *and* the file on disk has the recorded size and
SHA-256.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import S2ClipError
from ...io.files import hash_file, write_json
from ..sources import MANIFEST_NAME
from ..untrusted import read_regular

PROGRESS_NAME = ".s2clip-data-progress.json"
FORMAT = 1
_TMP_NAME = re.compile(r"\..+\.tmp-\d+-[0-9a-f]{8}.*")  # what io.files.atomic_path leaves when killed


@dataclass(frozen=True)
class FileRecord:
    """One output file: path relative to the output root, size in bytes, SHA-256 hex."""

    rel: str
    size: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256}


def file_record(root: Path, rel: str) -> FileRecord:
    """Size and SHA-256 of ``root / rel``."""
    size, digests = hash_file(root / rel, "sha256")
    return FileRecord(rel, size, digests["sha256"])


def is_current(root: Path, record: FileRecord) -> bool:
    """True when ``record``'s file exists with the recorded size and hash."""
    path = root / record.rel
    try:
        st = path.lstat()  # a FIFO or a link put where an output was is redone, never read
        if not stat.S_ISREG(st.st_mode) or st.st_size != record.size:
            return False
        return file_record(root, record.rel).sha256 == record.sha256
    except OSError:
        return False


MAX_MANIFEST_BYTES = 16 << 20  # COCO's 15000 outputs take about 2.5 MB


def _read_json(path: Path) -> dict[str, Any] | None:
    try:  # a regular file only (never blocks on a FIFO), of a bounded size
        data = json.loads(read_regular(path, MAX_MANIFEST_BYTES).decode("utf-8"))
    except (S2ClipError, ValueError, RecursionError):
        return None  # absent, unreadable or not a file: outputs are re-verified or redone
    return data if isinstance(data, dict) else None


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a prepared folder, or None."""
    return _read_json(Path(root) / MANIFEST_NAME)


def _records(data: dict[str, Any] | None) -> dict[str, FileRecord]:
    out: dict[str, FileRecord] = {}
    files = data.get("files") if data else None
    if isinstance(files, dict):
        for rel, rec in files.items():
            if isinstance(rec, dict) and isinstance(rec.get("size"), int) and isinstance(rec.get("sha256"), str):
                out[rel] = FileRecord(rel, rec["size"], rec["sha256"])
    return out


def load_records(root: Path, preparation: str) -> dict[str, FileRecord]:
    """What earlier runs of ``preparation`` recorded in ``root`` (manifest, then progress file).

    A manifest of another preparation is an error: one folder holds one dataset."""
    manifest = read_manifest(root)
    if manifest is not None and manifest.get("preparation") not in (None, preparation):
        raise S2ClipError(f"{root} already holds a prepared {manifest.get('preparation')!r} dataset "
                          f"({MANIFEST_NAME}); prepare {preparation!r} into another folder")
    records = _records(manifest)
    progress = _read_json(root / PROGRESS_NAME)
    if progress is not None and progress.get("preparation") == preparation:
        records.update(_records(progress))
    return records


def write_progress(root: Path, preparation: str, records: dict[str, FileRecord]) -> None:
    write_json(root / PROGRESS_NAME, {"preparation": preparation,
                                      "files": {rel: records[rel].as_json() for rel in sorted(records)}})


def remove_progress(root: Path) -> None:
    (root / PROGRESS_NAME).unlink(missing_ok=True)


def write_manifest(root: Path, fields: dict[str, Any], records: dict[str, FileRecord]) -> Path:
    """Write the manifest: ``fields`` then every output's size and hash (sorted by path)."""
    data = {"format": FORMAT, **fields, "files": {rel: records[rel].as_json() for rel in sorted(records)}}
    write_json(root / MANIFEST_NAME, data)
    return root / MANIFEST_NAME


def remove_stale_temporaries(folders: set[Path]) -> int:
    """Delete the hidden temporary files a killed run left in ``folders``; returns how many."""
    removed = 0
    for folder in folders:
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        for name in names:
            if _TMP_NAME.fullmatch(name):
                (folder / name).unlink(missing_ok=True)
                removed += 1
    return removed
