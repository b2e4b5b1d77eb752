"""The raw downloads where they lie: plain folders, zip and tar archives, read in place.

:class:`RawIndex` lists every file under ``RAW`` and every member of every archive in it (zip;
tar, plain or gz/bz2/xz-compressed) without extracting anything. A dataset then *searches* that
listing for the folders it needs (e.g. a ``VOC2012/ImageSets/Segmentation/val.txt`` wherever it
sits) instead of assuming one unpacking. Each input file is a small picklable :class:`Blob` that a
worker process reads on its own: a plain file, a zip member, or a byte span of an uncompressed
tar. Members of a compressed tar cannot be read at random cheaply, so :func:`spill_compressed`
copies just the needed members out in one forward pass.

Nothing here trusts the download: only regular files are indexed (a FIFO, a device or a link out
of RAW is kept as a *refused* input, an error only if a dataset needs it), a member's declared
size is checked against a limit before a byte of it is read, reads are bounded by that limit, and
a tar that ends early is reported as truncated, naming it.
"""

from __future__ import annotations

import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from ...errors import S2ClipError, one_line
from ..untrusted import file_kind, format_bytes, open_regular, read_limited

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
_MAGIC_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")
# The most bytes one input file of a sample (image, label, polygons) may hold: the largest of any
# benchmark, a Cityscapes 2048x1024 PNG, is under 10 MiB. A member declaring more is refused
# before it is read (a zip bomb inflates only up to its declared size, which is checked first).
MAX_SAMPLE_BYTES = 64 << 20
_TAR_ERRORS = (OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError)


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
    size: int = 0  # bytes (for an archive member: as its header declares)
    origin: str = ""  # how to name it when it is a spilled copy of an archive member
    refused: str = ""  # why it must not be read (a FIFO, a link out of RAW...): an error if it is needed

    def describe(self) -> str:
        """``/raw/x.png`` or ``/raw/archive.zip:member`` — how errors name this input."""
        if self.origin:
            return self.origin
        return self.path if self.kind == "file" else f"{self.path}:{self.member}"

    @property
    def basename(self) -> str:
        return (self.member or self.path).rsplit("/", 1)[-1]


_ZIPS: dict[str, tuple[zipfile.ZipFile, BinaryIO]] = {}  # per process: zip files opened by read_blob


def check_readable(blob: Blob, limit: int = MAX_SAMPLE_BYTES) -> None:
    """An ``S2ClipError`` naming ``blob`` if it was refused (not a regular file, a link out of RAW)
    or declares more than ``limit`` bytes; nothing is read."""
    if blob.refused:
        raise S2ClipError(f"refusing to read {blob.describe()}: {blob.refused}")
    if blob.size > limit:
        raise S2ClipError(f"{blob.describe()} declares {blob.size} bytes, more than the {format_bytes(limit)} "
                          "such a file can hold (a zip bomb or a damaged download?); refusing to read it")


def read_blob(blob: Blob, limit: int = MAX_SAMPLE_BYTES) -> bytes:
    """The bytes of ``blob``, at most ``limit`` (its declared size is checked first, and no more
    than ``limit`` bytes are ever read); unreadable, refused or truncated input is an
    ``S2ClipError`` naming it."""
    check_readable(blob, limit)
    where = blob.describe()
    try:
        if blob.kind == "file":
            with open_regular(blob.path) as fh:
                return read_limited(fh, limit, where)
        if blob.kind == "zip":
            if blob.path not in _ZIPS:
                fh = open_regular(blob.path)
                try:
                    _ZIPS[blob.path] = (zipfile.ZipFile(fh), fh)
                except BaseException:
                    fh.close()
                    raise
            zf = _ZIPS[blob.path][0]
            with zf.open(blob.member) as src:  # inflates at most the declared size
                return read_limited(src, limit, where)
        if blob.kind == "tar":
            with open_regular(blob.path) as fh:
                fh.seek(blob.offset)
                data = fh.read(blob.size)
            if len(data) != blob.size:
                raise S2ClipError(f"archive {blob.path} is truncated: it ends inside {blob.member!r} ({len(data)} "
                                  f"of its {blob.size} bytes); download it again")
            return data
        if blob.kind == "tarz":  # one member of a compressed tar: decompress up to it (slow; bulk: spill)
            with open_regular(blob.path) as fh, tarfile.open(fileobj=fh, mode="r:*") as tf:
                for info in tf:
                    if info.name == blob.member:
                        src = tf.extractfile(info)
                        if src is not None:
                            return read_limited(src, limit, where)
            raise KeyError("member not found")
    except (OSError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, KeyError,
            ValueError, zlib.error, lzma.LZMAError, RuntimeError, NotImplementedError) as exc:
        # RuntimeError: an encrypted zip member; NotImplementedError: an unsupported compression
        raise S2ClipError(f"cannot read {where}: {one_line(exc)}") from None
    raise S2ClipError(f"cannot read {where}: unknown input kind {blob.kind!r}")


def close_archives() -> None:
    """Close the zip files this process opened (call when a batch of reads is over)."""
    for zf, fh in _ZIPS.values():
        zf.close()
        fh.close()
    _ZIPS.clear()


def is_archive_name(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


@dataclass
class Container:
    """One place files live: the RAW folder itself (``kind`` folder) or an archive in it."""

    path: Path
    kind: str  # folder | zip | tar | tarz
    files: dict[str, Blob] = field(default_factory=dict)  # posix name -> blob
    truncated: str = ""  # for an archive that ends early: what was found, in words (its members before are usable)

    @property
    def size(self) -> int:
        return 0 if self.kind == "folder" else self.path.stat().st_size

    def label(self) -> str:
        return f"{self.path}/" if self.kind == "folder" else str(self.path)

    def missing(self, text: str) -> S2ClipError:
        """The error for something this container should hold but does not: a truncated archive
        is named as such first (it is the likely reason)."""
        return S2ClipError(f"{self.truncated}; {text}" if self.truncated else text)


def _open_zip(path: Path) -> Container:
    box = Container(path, "zip")
    with open_regular(path) as fh, zipfile.ZipFile(fh) as zf:
        for info in zf.infolist():
            if not info.is_dir():
                box.files[info.filename] = Blob("zip", str(path), info.filename, info.header_offset,
                                                info.file_size)
    return box


def _open_tar(path: Path) -> Container:
    """List a tar's regular members (sparse ones refused). A tar that ends before its end-of-archive
    blocks (a cut download) keeps the members read so far and says where it ends."""
    with open_regular(path) as fh:
        compressed = any(fh.read(6).startswith(m) for m in _MAGIC_COMPRESSED)
        fh.seek(0)
        kind = "tarz" if compressed else "tar"
        box = Container(path, kind)
        last = ""
        with tarfile.open(fileobj=fh, mode="r:*") as tf:
            try:
                for info in tf:
                    last = info.name
                    if info.isfile():
                        name = info.name[2:] if info.name.startswith("./") else info.name
                        refused = "a sparse archive member" if info.issparse() else ""
                        box.files[name] = Blob(kind, str(path), info.name, info.offset_data, info.size,
                                               refused=refused)
                ending = _tar_ending(tf)
            except _TAR_ERRORS as exc:
                if not box.files:
                    raise
                ending = f"it ends inside {last!r} ({one_line(exc)})"
        if ending:
            box.truncated = (f"archive {path} is truncated: {ending}; download it again "
                             f"({len(box.files)} files before that were read)")
    return box


def _tar_ending(tf: tarfile.TarFile) -> str:
    """Empty when the tar ends with its end-of-archive block after the last member; else what it
    ends with instead, in words (tarfile stops listing silently at a cut or a damaged header)."""
    fileobj = tf.fileobj
    assert fileobj is not None
    fileobj.seek(tf.offset)
    block = fileobj.read(tarfile.BLOCKSIZE)
    last = tf.members[-1] if tf.members else None
    after = f"after {last.name!r}" if last else "at its start"
    if len(block) < tarfile.BLOCKSIZE:
        try:
            if last is not None and last.offset_data + last.size > fileobj.seek(0, os.SEEK_END):
                return f"it ends inside {last.name!r}"
        except (OSError, ValueError):  # a compressed stream cannot seek to its end
            pass
        return f"it ends {after} without the end-of-archive marker"
    if block.count(0) != len(block):
        return f"its data {after} is not a valid member header (damaged)"
    return ""


def open_archive(path: Path) -> Container:
    """List an archive's members; a damaged archive is an ``S2ClipError`` naming it."""
    try:
        if path.name.lower().endswith(".zip"):
            return _open_zip(path)
        return _open_tar(path)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error, lzma.LZMAError, tarfile.TarError) as exc:
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
        self.unreadable: list[str] = []  # one-line notes on archives skipped, unreadable or truncated
        try:
            mode = self.raw.stat().st_mode
        except OSError:
            raise S2ClipError(f"--from {self.raw} does not exist (point it at the folder holding the downloads)") \
                from None
        self.real = self.raw.resolve()  # links inside RAW may lead anywhere under this, not out of it
        if stat.S_ISREG(mode):
            if not is_archive_name(self.raw.name):
                raise S2ClipError(f"--from {self.raw} is a file but not an archive ({', '.join(ARCHIVE_SUFFIXES)})")
            self._add_archive(open_archive(self.raw))
            return
        if not stat.S_ISDIR(mode):
            raise S2ClipError(f"--from {self.raw} is {file_kind(mode)}, not a folder or an archive")
        folder = Container(self.raw, "folder")
        archives: list[Path] = []
        seen: set[tuple[int, int]] = set()  # (device, inode) of folders walked: symlink loops end
        for dirpath, dirnames, filenames in os.walk(self.raw, followlinks=True):
            base = Path(dirpath)
            try:
                st = base.stat()
            except OSError:
                dirnames[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
            kept = []
            for d in sorted(d for d in dirnames if not d.startswith(".")):
                outside = self._outside(base / d)
                if outside:
                    self.unreadable.append(f"skipped {base / d}: {outside}")
                else:
                    kept.append(d)
            dirnames[:] = kept
            rel_dir = base.relative_to(self.raw).as_posix()
            for fname in sorted(filenames):
                if fname.startswith("."):
                    continue
                path = base / fname
                refused, size = self._check_file(path)
                if size < 0:
                    continue  # vanished or a broken link
                if is_archive_name(fname):
                    if refused:
                        self.unreadable.append(f"skipped {path}: {refused}")
                    else:
                        archives.append(path)
                    continue
                rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
                folder.files[rel] = Blob("file", str(path), size=size, refused=refused)
        self.containers.append(folder)
        for path in archives:
            try:
                self._add_archive(open_archive(path))
            except S2ClipError as exc:
                self.unreadable.append(str(exc))

    def _add_archive(self, box: Container) -> None:
        self.containers.append(box)
        if box.truncated:
            self.unreadable.append(box.truncated)

    def _outside(self, path: Path) -> str:
        """Why the link ``path`` must not be followed (it leads out of RAW), or ``""``."""
        if not path.is_symlink():
            return ""
        target = path.resolve()
        if target == self.real or self.real in target.parents:
            return ""
        return f"a symbolic link to {target}, outside the --from folder {self.raw} (copy or move it in)"

    def _check_file(self, path: Path) -> tuple[str, int]:
        """(why ``path`` must not be read or ``""``, its size; -1 when it is gone or a broken link).
        Only regular files inside RAW are read: a FIFO would block the reader, a device never ends."""
        try:
            st = path.stat()
        except OSError:
            return "", -1
        outside = self._outside(path)
        if outside:
            return outside, 0
        if not stat.S_ISREG(st.st_mode):
            return f"it is {file_kind(st.st_mode)}, not a regular file", 0
        return "", st.st_size

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


def spill_compressed(blobs: Iterable[Blob], dest: Path, limit: int = MAX_SAMPLE_BYTES) -> dict[Blob, Blob]:
    """Copy the compressed-tar members among ``blobs`` to files under ``dest`` in one forward pass
    per archive; returns the replacement file blob of each. Each member's declared size is checked
    against ``limit`` before anything is copied, and no copy grows past it."""
    by_archive: dict[str, dict[str, Blob]] = {}
    for blob in blobs:
        if blob.kind == "tarz":
            check_readable(blob, limit)
            by_archive.setdefault(blob.path, {})[blob.member] = blob
    out: dict[Blob, Blob] = {}
    for n, (archive, wanted) in enumerate(sorted(by_archive.items())):
        folder = dest / f"archive{n}"
        try:
            with open_regular(archive) as raw_fh, tarfile.open(fileobj=raw_fh, mode="r:*") as tf:
                for info in tf:
                    blob = wanted.get(info.name)
                    if blob is None or not info.isfile():
                        continue
                    target = folder / f"{len(out):08d}-{blob.basename[-100:]}"  # a name, never a path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    src = tf.extractfile(info)
                    assert src is not None
                    with src, open(target, "wb") as fh:
                        _copy_limited(src, fh, limit, blob.describe())
                    out[blob] = Blob("file", str(target), size=info.size, origin=blob.describe())
        except _TAR_ERRORS as exc:
            raise S2ClipError(f"cannot read archive {archive}: {one_line(exc)} (truncated or damaged download?)") \
                from None
        missing = [b for b in wanted.values() if b not in out]
        if missing:
            raise S2ClipError(f"cannot read {missing[0].describe()}: member not found on the second pass")
    return out


def _copy_limited(src: BinaryIO, dst: BinaryIO, limit: int, where: str) -> None:
    copied = 0
    while block := src.read(1 << 20):
        copied += len(block)
        if copied > limit:
            raise S2ClipError(f"{where} is larger than {format_bytes(limit)}, the most such a file can hold; "
                              "refusing it")
        dst.write(block)
