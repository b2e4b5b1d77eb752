"""The raw downloads where they lie: plain folders, zip and tar archives, read in place.

:class:`RawIndex` lists every file under ``RAW`` and every member of every archive in it (zip;
tar, plain or gz/bz2/xz-compressed) without extracting anything. A dataset then *searches* that
listing for the folders it needs (e.g. a ``VOC2012/ImageSets/Segmentation/val.txt`` wherever it
sits) instead of assuming one unpacking. Each input file is a small picklable :class:`Blob` that a
worker process reads on its own: a plain file, a zip member, or a byte span of an uncompressed
tar. Members of a compressed tar cannot be read at random cheaply, so :func:`spill_compressed`
copies just the needed members out in one forward pass.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import S2ClipError, one_line

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_MAGIC_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


@dataclass(frozen=True)
class Blob:
    """Where one input file's bytes are.

    ``kind``: ``file`` (``path`` is the file), ``zip`` (``member`` of the zip at ``path``),
    ``tar`` (``size`` bytes at ``offset`` of the uncompressed tar at ``path``) or ``tarz`` (a
    member of a compressed tar; read it after :func:`spill_compressed`).
    """

    kind: str
    path: str
    member: str = ""
    offset: int = 0
    size: int = 0
    origin: str = ""  # how to name it when it is a spilled copy of an archive member

    def describe(self) -> str:
        """``/raw/x.png`` or ``/raw/archive.zip:member`` — how errors name this input."""
        if self.origin:
            return self.origin
        return self.path if self.kind == "file" else f"{self.path}:{self.member}"

    @property
    def basename(self) -> str:
        return (self.member or self.path).rsplit("/", 1)[-1]


_ZIPS: dict[str, zipfile.ZipFile] = {}  # per process: zip files opened by read_blob


def read_blob(blob: Blob) -> bytes:
    """The bytes of ``blob``; unreadable or truncated input is an ``S2ClipError`` naming it."""
    try:
        if blob.kind == "file":
            return Path(blob.path).read_bytes()
        if blob.kind == "zip":
            zf = _ZIPS.get(blob.path)
            if zf is None:
                zf = _ZIPS[blob.path] = zipfile.ZipFile(blob.path)
            return zf.read(blob.member)
        if blob.kind == "tar":
            with open(blob.path, "rb") as fh:
                fh.seek(blob.offset)
                data = fh.read(blob.size)
            if len(data) != blob.size:
                raise EOFError(f"archive ends after {len(data)} of {blob.size} bytes (truncated download?)")
            return data
        if blob.kind == "tarz":  # one member of a compressed tar: decompress up to it (slow; bulk: spill)
            with tarfile.open(blob.path, "r:*") as tf:
                for info in tf:
                    if info.name == blob.member:
                        src = tf.extractfile(info)
                        if src is not None:
                            return src.read()
            raise KeyError("member not found")
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, KeyError,
            ValueError) as exc:
        raise S2ClipError(f"cannot read {blob.describe()}: {one_line(exc)}") from None
    raise S2ClipError(f"cannot read {blob.describe()}: unknown input kind {blob.kind!r}")


def close_archives() -> None:
    """Close the zip files this process opened."""
    while _ZIPS:
        _, zf = _ZIPS.popitem()
        zf.close()


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass
class Container:
    """One place files live: the RAW folder itself (``kind`` folder) or an archive in it."""

    path: Path
    kind: str  # folder | zip | tar | tarz
    files: dict[str, Blob] = field(default_factory=dict)  # posix name -> blob

    @property
    def size(self) -> int:
        return 0 if self.kind == "folder" else self.path.stat().st_size

    def label(self) -> str:
        return f"{self.path}/" if self.kind == "folder" else str(self.path)


def _open_zip(path: Path) -> Container:
    box = Container(path, "zip")
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if not info.is_dir():
                box.files[info.filename] = Blob("zip", str(path), info.filename, info.header_offset,
                                                info.file_size)
    return box


def _open_tar(path: Path) -> Container:
    with open(path, "rb") as fh:
        head = fh.read(6)
    compressed = any(head.startswith(m) for m in _MAGIC_COMPRESSED)
    box = Container(path, "tarz" if compressed else "tar")
    with tarfile.open(path, "r:*") as tf:
        for info in tf:
            if info.isfile():
                name = info.name[2:] if info.name.startswith("./") else info.name
                kind = "tarz" if compressed else "tar"
                box.files[name] = Blob(kind, str(path), info.name, info.offset_data, info.size)
    return box


def open_archive(path: Path) -> Container:
    """List an archive's members; a damaged archive is an ``S2ClipError`` naming it."""
    try:
        if path.name.lower().endswith(".zip"):
            return _open_zip(path)
        return _open_tar(path)
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise S2ClipError(f"cannot read archive {path}: {one_line(exc)} (truncated or damaged download?)") from None


@dataclass(frozen=True)
class DirHit:
    """A folder (inside one container) holding files that match what a dataset looks for."""

    container: Container
    dir: str  # posix path of the folder inside the container ("" = its top)
    files: dict[str, Blob]  # path relative to ``dir`` -> blob, for the matching files

    def where(self) -> str:
        return f"{self.container.label()}:{self.dir}" if self.container.kind != "folder" else \
            str(self.container.path / self.dir)

    def get(self, rel: str) -> Blob | None:
        """Any file under this folder (matching or not), by its path relative to the folder."""
        return self.container.files.get(f"{self.dir}/{rel}" if self.dir else rel)


class RawIndex:
    """Every file under RAW (a folder or one archive) and in the archives found there."""

    def __init__(self, raw: str | Path) -> None:
        self.raw = Path(raw).expanduser()
        self.containers: list[Container] = []
        self.unreadable: list[str] = []  # one-line reasons for archives that could not be listed
        if not self.raw.exists():
            raise S2ClipError(f"--from {self.raw} does not exist (point it at the folder holding the downloads)")
        if self.raw.is_file():
            if not is_archive_name(self.raw.name):
                raise S2ClipError(f"--from {self.raw} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)})")
            self.containers.append(open_archive(self.raw))
            return
        folder = Container(self.raw, "folder")
        archives: list[Path] = []
        seen: set[tuple[int, int]] = set()  # (device, inode) of folders walked: symlink loops end
        for dirpath, dirnames, filenames in os.walk(self.raw, followlinks=True):
            base = Path(dirpath)
            try:
                stat = base.stat()
            except OSError:
                dirnames[:] = []
                continue
            if (stat.st_dev, stat.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((stat.st_dev, stat.st_ino))
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = base.relative_to(self.raw).as_posix()
            for fname in sorted(filenames):
                if fname.startswith("."):
                    continue
                path = base / fname
                if is_archive_name(fname):
                    archives.append(path)
                    continue
                rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                folder.files[rel] = Blob("file", str(path), size=size)
        self.containers.append(folder)
        for path in archives:
            try:
                self.containers.append(open_archive(path))
            except S2ClipError as exc:
                self.unreadable.append(str(exc))

    def describe_search(self) -> str:
        """What was searched, for "not found" errors (names unreadable archives first)."""
        n_arch = sum(c.kind != "folder" for c in self.containers)
        text = f"searched {self.raw} ({n_arch} readable archive(s))"
        if self.unreadable:
            text += "; " + "; ".join(self.unreadable)
        return text

    def find_dirs(self, dir_suffix: str, pattern: str) -> list[DirHit]:
        """Folders whose path ends with ``dir_suffix`` (whole components) holding files whose path
        relative to the folder fully matches ``pattern``; most matches first, folders before archives."""
        want = dir_suffix.strip("/").split("/")
        regex = re.compile(pattern)
        hits: list[DirHit] = []
        for box in self.containers:
            by_dir: dict[str, dict[str, Blob]] = {}
            for name, blob in box.files.items():
                parts = name.split("/")
                for i in range(len(parts) - len(want)):
                    if parts[i:i + len(want)] == want:
                        rel = "/".join(parts[i + len(want):])
                        if regex.fullmatch(rel):
                            by_dir.setdefault("/".join(parts[:i + len(want)]), {})[rel] = blob
            hits += [DirHit(box, d, files) for d, files in by_dir.items()]
        hits.sort(key=lambda h: (-len(h.files), h.container.kind != "folder", h.container.label(), h.dir))
        return hits

    def find_files(self, path_suffix: str) -> list[tuple[Container, str]]:
        """(container, member) of each file whose path ends with ``path_suffix`` (whole
        components); plain files before archive members."""
        suffix = path_suffix.strip("/")
        found = [(box, name) for box in self.containers for name in box.files
                 if name == suffix or name.endswith("/" + suffix)]
        found.sort(key=lambda f: (f[0].kind != "folder", f[0].label(), f[1]))
        return found


def spill_compressed(blobs: Iterable[Blob], dest: Path) -> dict[Blob, Blob]:
    """Copy the compressed-tar members among ``blobs`` to files under ``dest`` in one forward pass
    per archive; returns the replacement file blob of each."""
    by_archive: dict[str, dict[str, Blob]] = {}
    for blob in blobs:
        if blob.kind == "tarz":
            by_archive.setdefault(blob.path, {})[blob.member] = blob
    out: dict[Blob, Blob] = {}
    for n, (archive, wanted) in enumerate(sorted(by_archive.items())):
        folder = dest / f"archive{n}"
        try:
            with tarfile.open(archive, "r:*") as tf:
                for info in tf:
                    blob = wanted.get(info.name)
                    if blob is None or not info.isfile():
                        continue
                    target = folder / f"{len(out):08d}-{blob.basename}"
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(info)
                    assert src is not None
                    with src, open(target, "wb") as fh:
                        shutil.copyfileobj(src, fh)
                    out[blob] = Blob("file", str(target), size=info.size, origin=blob.describe())
        except (OSError, EOFError, tarfile.TarError) as exc:
            raise S2ClipError(f"cannot read archive {archive}: {one_line(exc)} (truncated or damaged download?)") \
                from None
        missing = [b for b in wanted.values() if b not in out]
        if missing:
            raise S2ClipError(f"cannot read {missing[0].describe()}: member not found on the second pass")
    return out
