"""``s2clip data check``: is a data root complete and sane for its preset?

It opens the preset's layout exactly as eval does (:func:`~s2clip_cli.data.datasets.open_dataset`),
compares the sample count with the official val size, and reads every label: its size must equal
its image's, and its stored values must lie in the preset's range plus 255 — raw 0..num_classes
for a reduce-zero-label preset (0 is its ignored "other"/background), 0..num_classes−1 otherwise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import S2ClipError, one_line
from .datasets import open_dataset
from .presets import DatasetPreset, get_preset
from .sources import MANIFEST_NAME, OFFICIAL_VAL_COUNTS
from .untrusted import open_regular

MAX_PROBLEMS = 20


@dataclass(frozen=True)
class CheckRow:
    """One line of the report: what was checked, what was found, and whether it passed."""

    check: str
    result: str
    ok: bool


@dataclass
class CheckReport:
    """Rows for a table and the first problems found (at most ``MAX_PROBLEMS``, one line each)."""

    name: str
    root: Path
    rows: list[CheckRow] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    more_problems: int = 0  # problems found beyond those listed

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows) and not self.problems

    def add_problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(one_line(text))
        else:
            self.more_problems += 1


def official_count_mismatch(name: str, dataset_len: int) -> str | None:
    """One warning line when ``dataset_len`` differs from the official val size of preset ``name``
    (None when it matches, or for a dataset without an official size, e.g. ``custom``)."""
    official = OFFICIAL_VAL_COUNTS.get(name)
    if official is None or dataset_len == official:
        return None
    return (f"{name}: {dataset_len} samples, but the official val split has {official}; scores will not be "
            "comparable to published ones (incomplete data root? see `s2clip data check`)")


def allowed_values(preset: DatasetPreset) -> np.ndarray:
    """256 booleans: the stored label values valid for ``preset`` (255 always)."""
    allowed = np.zeros(256, dtype=bool)
    allowed[: preset.num_classes + (1 if preset.reduce_zero_label else 0)] = True
    allowed[preset.ignore_index] = True
    return allowed


def _value_range(preset: DatasetPreset) -> str:
    top = preset.num_classes if preset.reduce_zero_label else preset.num_classes - 1
    note = " (0 = ignored, reduce-zero-label)" if preset.reduce_zero_label else ""
    return f"0..{top} and {preset.ignore_index}{note}"


def _read_image(path: Path, *, header_only: bool) -> Image.Image:
    """An image (only its header with ``header_only``; else a decoded 8-bit index label) from a
    regular file: a FIFO or device is refused without blocking, a decompression bomb is refused."""
    try:
        with open_regular(path) as fh, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(fh, formats=None if header_only else ["PNG"])  # labels: never EPS & co.
            if header_only:
                return img
            if img.mode not in ("L", "P"):
                raise S2ClipError(f"{path} is a {img.mode} image, not an 8-bit index map")
            img.load()
            return img
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise S2ClipError(f"cannot read {path}: {one_line(exc)}") from None


def check(name: str, data_root: str | Path, *,
          progress: Callable[[int, int], None] | None = None) -> CheckReport:
    """Check the data root of preset ``name``; never raises for a bad root (problems are reported)."""
    preset = get_preset(name)
    layout = preset.layout
    root = Path(data_root).expanduser()
    report = CheckReport(name, root)
    report.rows.append(CheckRow("data root", str(root), root.is_dir()))
    try:
        dataset = open_dataset(name, root)
    except S2ClipError as exc:
        report.rows.append(CheckRow("layout", layout.title, False))
        report.add_problem(str(exc))
        return report
    report.rows.append(CheckRow("layout", layout.describe(), True))
    official = OFFICIAL_VAL_COUNTS[name]
    n = len(dataset)
    report.rows.append(CheckRow("samples", f"{n} (official val: {official})", n == official))
    if n != official:
        report.add_problem(f"{name}: {n} samples, but the official val split has {official} (incomplete data root?)")
    allowed = allowed_values(preset)
    bad_sizes = bad_values = unreadable = 0
    for i in range(n):
        image_path, label_path = dataset.image_path(i), dataset.label_path(i)
        try:
            image_size = _read_image(image_path, header_only=True).size
            label = np.asarray(_read_image(label_path, header_only=False))
        except S2ClipError as exc:
            unreadable += 1
            report.add_problem(f"{dataset.sample_ids[i]}: {one_line(exc)}")
            continue
        if (label.shape[1], label.shape[0]) != image_size:
            bad_sizes += 1
            report.add_problem(f"{label_path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
                               f"{image_size[0]}x{image_size[1]}")
        present = np.unique(label)
        bad = present[~allowed[present]]
        if bad.size:
            bad_values += 1
            report.add_problem(f"{label_path} holds value(s) {', '.join(map(str, bad[:5].tolist()))} outside "
                               f"{_value_range(preset)}")
        if progress is not None:
            progress(i + 1, n)
    readable = f"; {unreadable} unreadable" if unreadable else ""
    report.rows.append(CheckRow("label sizes", f"{n - bad_sizes - unreadable} of {n} equal to their image's"
                                f"{readable}", bad_sizes == 0 and unreadable == 0))
    report.rows.append(CheckRow("label values", f"{n - bad_values - unreadable} of {n} within "
                                f"{_value_range(preset)}", bad_values == 0 and unreadable == 0))
    manifest = root / MANIFEST_NAME
    report.rows.append(CheckRow("manifest", str(manifest) if manifest.is_file()
                                else f"none ({MANIFEST_NAME}: not prepared by `s2clip data prepare`)", True))
    return report
