"""What `segment` reads: files, folders (optionally recursive), glob patterns, ``@list.txt`` files
of paths, and videos — expanded to a list of `Source`s, each with a collision-free output name.

Output names (the part of every output path after ``-o``, without its suffix; `io.naming`):

- a file named directly (argument or list entry): its stem (``photos/cat.jpg`` → ``cat``);
- a file found in a folder: its path relative to that folder, without suffix
  (``photos/`` → ``trip/cat`` for ``photos/trip/cat.jpg`` with ``--recursive``), so sub-folders
  are mirrored under ``-o``;
- a file matched by a pattern: its path relative to the pattern's fixed leading folders
  (``"photos/**/*.jpg"`` → ``trip/cat``); a match outside those folders (``photos/*/../../x.jpg``)
  is refused.

The same path with its suffix is the input's name in the export files (`Source.image_name`:
``trip/cat.jpg``). Two inputs with the same output name are refused (`check_unique_names`). Images the tool writes
(``*_mask.png``, ``*_overlay.png``, ``*_overlay.mp4``, the ``masks`` export's ``<stem>_masks/``
folders) are never picked up from folders or patterns.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from ..errors import S2ClipError, one_line
from .images import IMAGE_SUFFIXES
from .naming import check_name, split_suffix

VIDEO_SUFFIXES: frozenset[str] = frozenset({".mp4", ".mov", ".avi", ".mkv"})
"""Suffixes (lower-case) read as videos (frame by frame, through OpenCV)."""
TOOL_OUTPUT_ENDINGS: tuple[str, ...] = ("_mask.png", "_overlay.png", "_overlay.mp4")
"""Names of files `segment` writes; never taken as inputs from a folder or a pattern."""
LIST_FILE_LIMIT = 16 * 2**20  # bytes: a list of paths larger than this is refused
_GLOB_CHARS = frozenset("*?[")

Kind = Literal["image", "video"]


@dataclass(frozen=True)
class Source:
    """One input: the file, what it holds, its output name, and whether the user named it
    (a file argument or list entry) rather than it being found in a folder or by a pattern."""

    path: Path
    name: str  # POSIX relative path without suffix, e.g. "cat" or "trip/cat"
    kind: Kind
    named: bool

    @property
    def image_name(self) -> str:
        """The input's name in export files: its output name with the file's suffix (``trip/cat.jpg``),
        its path relative to the input root as CVAT names the frames of a folder (`io.naming`)."""
        return self.name + split_suffix(self.path.name)[1]


def kind_of(path: Path) -> Kind:
    return "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"


def is_tool_output(path: Path) -> bool:
    """Whether `path`'s name is one `segment` gives its own outputs (a mask, an overlay)."""
    name = path.name.lower()
    return name.endswith(TOOL_OUTPUT_ENDINGS)


def is_tool_folder(path: Path) -> bool:
    """Whether `path` is a folder of class masks the ``masks`` export wrote (``<stem>_masks/`` with
    its ``index.json``), never searched for inputs."""
    return path.name.endswith("_masks") and (path / "index.json").is_file()


def _wanted(path: Path) -> bool:
    """A file found in a folder or by a pattern is an input when it has an image or video suffix, is
    not hidden, is not one of the tool's outputs, and is a regular file (links to one included)."""
    return (path.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES and not path.name.startswith(".")
            and not is_tool_output(path) and path.is_file())


def _output_name(relative: Path) -> str:
    """The output name of a file at ``relative`` (a relative path of plain parts): POSIX, without suffix."""
    return check_name(str(PurePosixPath(*relative.parent.parts, split_suffix(relative.name)[0])))


def _list_directory(directory: Path) -> list[str]:
    try:
        return sorted(entry.name for entry in os.scandir(directory))
    except OSError as exc:
        raise S2ClipError(f"cannot list directory {directory}: {one_line(exc.strerror or exc)}") from exc


def _walk(root: Path, recursive: bool, skip: set[Path]) -> Iterable[Path]:
    """Files under `root` (sorted by name, hidden folders and the folders in `skip` left out;
    links to folders are not followed)."""
    for name in _list_directory(root):
        path = root / name
        if path.is_dir():
            if (recursive and not name.startswith(".") and not path.is_symlink() and path.resolve() not in skip
                    and not is_tool_folder(path)):
                yield from _walk(path, recursive, skip)
        else:
            yield path


def _folder_sources(root: Path, recursive: bool, skip: set[Path]) -> list[Source]:
    found = [Source(p, _output_name(p.relative_to(root)), kind_of(p), False)
             for p in _walk(root, recursive, skip) if _wanted(p)]
    if not found:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))
        where = "or its sub-folders " if recursive else ""
        raise S2ClipError(f"directory {root} {where}contains no images or videos ({suffixes})")
    return found


def _pattern_base(pattern: str) -> Path:
    """The leading folders of a glob pattern that hold no wildcard."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _GLOB_CHARS & set(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _pattern_name(match: str, base: Path, pattern: str) -> str:
    """The output name of a pattern's match: its path relative to the pattern's fixed folders, with
    ``..`` parts resolved lexically; `S2ClipError` for a match outside those folders."""
    relative = Path(os.path.normpath(Path(match).relative_to(base)))
    if relative.parts[0] == ".." or relative.is_absolute():
        raise S2ClipError(f"pattern {pattern!r} matches {match}, outside its folder {base}: "
                          "name that file directly or start the pattern from a common folder")
    return _output_name(relative)


def _pattern_sources(pattern: str) -> list[Source]:
    base = _pattern_base(pattern)
    matches = sorted(glob.glob(pattern, recursive=True))
    found = [Source(Path(m), _pattern_name(m, base, pattern), kind_of(Path(m)), False)
             for m in matches if _wanted(Path(m)) and not any(is_tool_folder(f) for f in Path(m).parents)]
    if not found:
        raise S2ClipError(f"pattern {pattern!r} matches no image or video")
    return found


def _read_list(path: Path) -> list[str]:
    """The entries of a list file: one path a line; blank lines and lines starting with '#' skipped."""
    if not path.is_file():
        raise S2ClipError(f"list file {path} does not exist or is not a regular file")
    if path.stat().st_size > LIST_FILE_LIMIT:
        raise S2ClipError(f"list file {path} is larger than {LIST_FILE_LIMIT // 2**20} MiB")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise S2ClipError(f"cannot read list file {path}: {one_line(exc)}") from exc
    entries = [line.strip() for line in text.splitlines()]
    return [e for e in entries if e and not e.startswith("#")]


def _item_sources(text: str, recursive: bool, skip: set[Path], origin: str = "") -> list[Source]:
    """The sources of one argument (or list entry, `origin` naming its list file)."""
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder_sources(path, recursive, skip)
    if path.is_file():
        return [Source(path, _output_name(Path(path.name)), kind_of(path), True)]
    if path.exists() or path.is_symlink():
        raise S2ClipError(f"input {path}{origin} is not a regular file")
    if _GLOB_CHARS & set(text):
        return _pattern_sources(str(path))
    raise S2ClipError(f"input {path}{origin} does not exist")


def collect_sources(inputs: Sequence[str | Path], *, recursive: bool = False,
                    skip_dirs: Sequence[Path] = ()) -> list[Source]:
    """Expand the user's inputs to the images and videos to segment, in order, each file once.

    An input is a file (kept whatever its suffix; reading it reports a file it cannot decode), a
    folder (its image and video files, sorted by name; sub-folders too with `recursive`, except
    hidden ones and `skip_dirs` — the output folder), a glob pattern that names no existing file
    (``*``, ``?``, ``[...]``; ``**`` crosses folders), or ``@list.txt``: a text file of such paths,
    one a line (``#`` comments), relative ones taken from the list file's folder.

    Raises `S2ClipError` for no input, a path that does not exist or is not a regular file, a
    folder or pattern without images, or an unreadable list file.
    """
    if not inputs:
        raise S2ClipError("no input images given")
    skip = {Path(d).resolve() for d in skip_dirs}
    sources: list[Source] = []
    for item in inputs:
        text = str(item)
        if text.startswith("@"):
            listing = Path(text[1:]).expanduser()
            entries = _read_list(listing)
            if not entries:
                raise S2ClipError(f"list file {listing} names no input")
            for entry in entries:
                entry_path = Path(entry).expanduser()
                full = entry_path if entry_path.is_absolute() else listing.parent / entry_path
                sources.extend(_item_sources(str(full), recursive, skip, f" (listed in {listing})"))
        else:
            sources.extend(_item_sources(text, recursive, skip))
    unique: list[Source] = []
    seen: set[Path] = set()
    for source in sources:
        key = source.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(source)
    return unique


def check_unique_names(sources: Sequence[Source]) -> None:
    """`S2ClipError` naming both files when two inputs would write the same outputs."""
    seen: dict[str, Path] = {}
    for source in sources:
        if source.name in seen:
            raise S2ClipError(f"{seen[source.name]} and {source.path} would write the same outputs "
                              f"({source.name}); rename one of them")
        seen[source.name] = source.path
