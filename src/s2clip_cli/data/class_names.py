"""Class-name lists: the packaged benchmark files and user-given lists.

A class is a list of one or more names (synonyms); the text side queries every name and keeps
the best-scoring one. Two spellings exist:

* a file: one class per line, synonyms separated by ``;`` (the lineage writes ``"; "``), blank
  lines skipped; for with-background presets the first line holds the background's stuff names;
* a CLI value: classes separated by ``,``, synonyms by ``;`` (``"cat,dog; puppy"``), or
  ``@file.txt`` for a file as above.

Names are stripped of surrounding whitespace. User lists may not repeat a name (case-insensitive)
anywhere; the packaged files are the lineage's data and are taken as they are (``coco_object``
queries "bed" both as a background stuff name and as a class).
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from ..errors import S2ClipError
from .presets import PRESETS, get_preset


def _split_names(text: str, where: str) -> list[str]:
    names = [name.strip() for name in text.split(";")]
    if any(not name for name in names):
        raise S2ClipError(f"{where}: empty class name in {text.strip()!r} (synonyms are separated by '; ')")
    return names


def _check_unique(classes: list[list[str]], source: str) -> None:
    seen: dict[str, int] = {}
    for idx, names in enumerate(classes):
        for name in names:
            key = name.casefold()
            if key in seen:
                other = seen[key]
                where = "twice in one class" if other == idx else f"in classes {other + 1} and {idx + 1}"
                raise S2ClipError(f"{source}: duplicate class name {name!r} ({where}); each name may appear once")
            seen[key] = idx


def parse_class_lines(lines: Iterable[str], source: str, *, strict: bool = True) -> list[list[str]]:
    """Parse one-class-per-line text (synonyms separated by ``;``), skipping blank lines.

    ``strict`` additionally refuses a name used twice (case-insensitive). Raises ``S2ClipError``
    for an empty result or an empty name.
    """
    classes: list[list[str]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        classes.append(_split_names(line, f"{source}, line {lineno}"))
    if not classes:
        raise S2ClipError(f"{source}: no class names (expected one class per line)")
    if strict:
        _check_unique(classes, source)
    return classes


CLASS_FILE_MAX_BYTES = 4 << 20  # LVIS's 1203 classes with synonyms are ~60 KB


def _read_text(path: Path) -> str:
    """A class-name file's text: a regular file (a FIFO would block, a device never end) of at most
    `CLASS_FILE_MAX_BYTES`."""
    try:
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError
        if not stat.S_ISREG(st.st_mode):
            raise S2ClipError(f"class-name file {path} is not a regular file")
        if st.st_size > CLASS_FILE_MAX_BYTES:
            raise S2ClipError(f"class-name file {path} is {st.st_size} bytes; a class list is at most "
                              f"{CLASS_FILE_MAX_BYTES}")
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise S2ClipError(f"class-name file {path} does not exist") from None
    except IsADirectoryError:
        raise S2ClipError(f"class-name file {path} is a directory, expected a text file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise S2ClipError(f"cannot read class-name file {path}: {exc}") from None


def read_class_file(path: str | Path, *, strict: bool = True) -> list[list[str]]:
    """Read a class-name file (one class per line, synonyms separated by ``; ``)."""
    path = Path(path).expanduser()
    return parse_class_lines(_read_text(path).splitlines(), str(path), strict=strict)


def parse_class_list(spec: str) -> list[list[str]]:
    """Parse a ``--classes`` value: ``"cat,dog; puppy"`` or ``"@classes.txt"``.

    Raises ``S2ClipError`` for an empty list, an empty name, a name given twice (case-insensitive)
    or an unreadable file.
    """
    spec = spec.strip()
    if spec.startswith("@"):
        if not spec[1:].strip():
            raise S2ClipError("--classes @FILE: no file name after '@'")
        return read_class_file(spec[1:].strip())
    if not spec:
        raise S2ClipError("no class names given: use --classes cat,dog (synonyms: 'dog; puppy') or @file.txt")
    classes = []
    for pos, item in enumerate(spec.split(","), start=1):
        if not item.strip():
            raise S2ClipError(f"--classes: empty class name at position {pos} in {spec!r}")
        classes.append(_split_names(item, "--classes"))
    _check_unique(classes, "--classes")
    return classes


def preset_class_names(preset_name: str) -> list[list[str]]:
    """The packaged class names of a benchmark preset (``voc21``, ``ade20k``, ...)."""
    preset = get_preset(preset_name)
    resource = resources.files("s2clip_cli.data").joinpath("class_names", preset.class_file)
    text = resource.read_text(encoding="utf-8")
    classes = parse_class_lines(text.splitlines(), f"{preset_name} class names", strict=False)
    if len(classes) != preset.num_classes:  # a packaging error, not a user error
        raise RuntimeError(f"{preset.class_file} has {len(classes)} classes, preset says {preset.num_classes}")
    return classes


def load_class_names(path_or_preset: str | Path) -> list[list[str]]:
    """Class names of a preset (given by name) or from a file (strictly checked)."""
    if isinstance(path_or_preset, str) and path_or_preset in PRESETS:
        return preset_class_names(path_or_preset)
    return read_class_file(path_or_preset)


def display_names(classes: list[list[str]], *, has_background: bool = False) -> list[str]:
    """One label per class: its first name (``"background"`` for a with-background preset's first
    class), made unique by suffixing ``#index`` where needed."""
    firsts = [names[0] for names in classes]
    if has_background and firsts:
        firsts[0] = "background"
    counts: dict[str, int] = {}
    for name in firsts:
        counts[name] = counts.get(name, 0) + 1
    return [name if counts[name] == 1 else f"{name}#{i}" for i, name in enumerate(firsts)]
