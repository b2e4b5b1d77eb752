"""Benchmark datasets in their MMSegmentation layouts, and a generic images + masks folder pair.

Each preset is read exactly as the lineage's MMSegmentation configs read it:

* a *split* layout lists sample ids in a text file (VOC, Pascal Context), image and label are
  ``<img_dir>/<id><img_suffix>`` and ``<ann_dir>/<id><seg_suffix>``;
* a *scan* layout lists every ``*<img_suffix>`` under the image folder, recursively and sorted
  (COCO, Cityscapes, ADE20K); the id is the path relative to that folder without the suffix and
  the label is the same relative path under the label folder with the label suffix.

Labels are returned with the preset's mapping applied (reduce-zero-label: 0 -> 255, k -> k-1,
255 stays 255, as mmseg's ``LoadAnnotations`` does); the ignore index is 255.
"""

from __future__ import annotations

import stat
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import S2ClipError, one_line
from ..io.images import IMAGE_SUFFIXES, read_image
from .class_names import display_names, preset_class_names, read_class_file
from .presets import CUSTOM, PRESETS, DatasetPreset, Layout, custom_preset

MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp")
MAX_EVAL_CLASSES = 4096  # a K x K int64 confusion matrix: 128 MiB at this size (LVIS has 1203 classes)
LABEL_FORMATS = ("PNG", "TIFF", "BMP")  # the decoders a label file may use, whatever its name says
SPLIT_MAX_BYTES = 16 << 20  # the largest real split list (COCO's ids) is ~100 KB
_SHOW_MISSING = 5


def label_colours(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), ``n`` x 3 uint8; also the prediction palette."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def read_label(path: str | Path, reduce_zero_label: bool) -> np.ndarray:
    """Read a label map (index PNG, no palette conversion) and apply the mapping.

    Returns H x W uint8 for 8-bit files, int64 for wider ones. A colour (RGB) label is an error.
    """
    try:
        with Image.open(path, formats=LABEL_FORMATS) as img:  # never EPS & co. (Ghostscript) under a .png name
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"):
                raise S2ClipError(f"label {path} is a {img.mode} image; expected a single-channel index map "
                                  "(one class index per pixel, 255 = ignore)")
            label = np.asarray(img)
    except UnidentifiedImageError:
        raise S2ClipError(f"cannot read label {path}: not a PNG, TIFF or BMP label map") from None
    except Image.DecompressionBombError as exc:
        raise S2ClipError(f"label {path} is too large to be a label map ({one_line(exc)})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # (PIL's decoders raise all of these)
        raise S2ClipError(f"cannot read label {path}: {one_line(exc) or type(exc).__name__}") from None
    label = label.astype(np.uint8) if label.dtype in (np.bool_, np.uint8) else label.astype(np.int64)
    if reduce_zero_label:  # mmseg: gt[gt == 0] = 255; gt = gt - 1; gt[gt == 254] = 255
        label = label.copy()
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    return label


@dataclass(frozen=True)
class Sample:
    id: str
    image: Path
    label: Path


@dataclass
class SegDataset:
    """An evaluation set: class names, preset and (image, label) files in a fixed order."""

    name: str
    preset: DatasetPreset
    class_names: list[list[str]]
    samples: list[Sample]
    root: Path | None = None
    source: str = ""  # where the files come from (custom: the resolved images and masks folders)
    notices: tuple[str, ...] = ()  # what the user should know about the files (one line each, for a warning)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def sample_ids(self) -> list[str]:
        return [s.id for s in self.samples]

    @property
    def labels(self) -> list[str]:
        """Display name per class ("background" for a with-background preset's class 0)."""
        return display_names(self.class_names, has_background=self.preset.has_background)

    def image_path(self, i: int) -> Path:
        return self.samples[i].image

    def label_path(self, i: int) -> Path:
        return self.samples[i].label

    def load_image(self, i: int, reader: Callable[[Path], np.ndarray] | None = None) -> np.ndarray:
        return (reader or read_image)(self.samples[i].image)

    def load_label(self, i: int) -> np.ndarray:
        """The ground truth of sample ``i`` with the preset's label mapping applied (255 = ignore)."""
        return read_label(self.samples[i].label, self.preset.reduce_zero_label)

    def head(self, limit: int | None) -> SegDataset:
        """The first ``limit`` samples (all when None)."""
        if limit is None:
            return self
        if limit < 0:
            raise S2ClipError(f"--limit must be >= 0, got {limit}")
        return replace(self, samples=self.samples[:limit])

    def subset(self, ids: Sequence[str]) -> SegDataset:
        """The samples with these ids, in the given order."""
        by_id = {s.id: s for s in self.samples}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise S2ClipError(f"{self.name}: unknown sample ids: {', '.join(missing[:_SHOW_MISSING])}")
        return replace(self, samples=[by_id[i] for i in ids])


def _layout_missing(root: Path, layout: Layout) -> list[str]:
    missing = []
    for entry in layout.required():
        path = root / entry.rstrip("/")
        if not (path.is_dir() if entry.endswith("/") else path.is_file()):
            missing.append(entry)
    return missing


def _check_layout(name: str, root: Path, layout: Layout) -> None:
    if not root.is_dir():
        raise S2ClipError(f"{name}: data root {root} does not exist or is not a folder")
    missing = _layout_missing(root, layout)
    if not missing:
        return
    hint = ""
    try:
        subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        subdirs = []
    for sub in subdirs:  # a common slip: pointing at the parent (VOCdevkit instead of VOCdevkit/VOC2012)
        if not _layout_missing(sub, layout):
            hint = f" (did you mean --data-root {sub}?)"
            break
    raise S2ClipError(f"{name}: expected {root / missing[0].rstrip('/')} ({layout.title}: {', '.join(layout.required())}); "
                      f"missing: {', '.join(missing)}{hint}")


def _missing_files_error(name: str, root: Path, missing: list[Path], total: int) -> S2ClipError:
    shown = ", ".join(str(p.relative_to(root)) if p.is_relative_to(root) else str(p)
                      for p in missing[:_SHOW_MISSING])
    more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
    return S2ClipError(f"{name}: {len(missing)} of {total} samples under {root} lack files: {shown}{more}")


def _read_split(name: str, split: Path) -> list[str]:
    """The ids a split file lists (one per line, blank lines skipped): a regular file of at most
    `SPLIT_MAX_BYTES`, UTF-8, each id a plain relative name (no absolute path, ``..``, backslash or
    control character): `S2ClipError` naming the file (and the id) otherwise."""
    try:
        st = split.stat()
        if not stat.S_ISREG(st.st_mode):
            raise S2ClipError(f"{name}: {split} is not a regular file")
        if st.st_size > SPLIT_MAX_BYTES:
            raise S2ClipError(f"{name}: {split} is {st.st_size} bytes; a split list is at most {SPLIT_MAX_BYTES}")
        with open(split, "rb") as fh:
            text = fh.read(SPLIT_MAX_BYTES + 1).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else one_line(exc)
        raise S2ClipError(f"{name}: cannot read {split}: {reason}") from None
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    for lineno, sample_id in enumerate(ids, start=1):
        if not _plain_id(sample_id):
            raise S2ClipError(f"{name}: {split} lists {sample_id[:80]!r} (id {lineno}), which is not a plain "
                              "sample name (absolute paths, '..', backslashes and control characters are refused)")
    return ids


def _plain_id(sample_id: str) -> bool:
    """A relative name that stays under the folder it is joined to."""
    if sample_id.startswith("/") or "\\" in sample_id or any(ord(c) < 32 or ord(c) == 127 for c in sample_id):
        return False
    return all(part not in ("", ".", "..") for part in sample_id.split("/"))


def _split_samples(name: str, root: Path, layout: Layout) -> tuple[list[Sample], list[str]]:
    """The samples a split file lists, and notices (ids listed more than once are kept once)."""
    assert layout.split_file is not None
    split = root / layout.split_file
    listed = _read_split(name, split)
    if not listed:
        raise S2ClipError(f"{name}: {split} lists no sample ids")
    ids = list(dict.fromkeys(listed))  # first occurrence, in order
    notices = []
    if len(ids) < len(listed):
        repeated = [i for i, n in Counter(listed).items() if n > 1]
        notices.append(f"{name}: {split} lists {len(repeated)} sample id(s) more than once "
                       f"({', '.join(repeated[:_SHOW_MISSING])}{' ...' if len(repeated) > _SHOW_MISSING else ''}); "
                       f"each is evaluated once ({len(ids)} samples, not {len(listed)})")
    samples = [Sample(i, root / layout.img_dir / f"{i}{layout.img_suffix}",
                      root / layout.ann_dir / f"{i}{layout.seg_suffix}") for i in ids]
    missing = [p for s in samples for p in (s.image, s.label) if not p.is_file()]
    if missing:
        raise _missing_files_error(name, root, missing, len(samples))
    return samples, notices


def _scan_samples(name: str, root: Path, layout: Layout) -> list[Sample]:
    img_dir, ann_dir = root / layout.img_dir, root / layout.ann_dir
    images = sorted(p for p in img_dir.rglob(f"*{layout.img_suffix}") if p.is_file())
    if not images:
        raise S2ClipError(f"{name}: no *{layout.img_suffix} images under {img_dir} ({layout.describe()})")
    samples = []
    for img in images:
        rel = img.relative_to(img_dir).as_posix()[: -len(layout.img_suffix)]
        samples.append(Sample(rel, img, ann_dir / f"{rel}{layout.seg_suffix}"))
    missing = [s.label for s in samples if not s.label.is_file()]
    if missing:
        raise _missing_files_error(name, root, missing, len(samples))
    return samples


def _list_files(folder: Path, suffixes: tuple[str, ...], what: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise S2ClipError(f"custom dataset: {what} folder {folder} does not exist or is not a folder")
    by_stem: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes and not p.name.startswith("."):
            if p.stem in by_stem:
                raise S2ClipError(f"custom dataset: two {what} files share the name {p.stem!r}: "
                                  f"{by_stem[p.stem].name}, {p.name}")
            by_stem[p.stem] = p
    return by_stem


def _open_custom(images: Path, masks: Path, class_names: str | Path | list[list[str]],
                 reduce_zero_label: bool) -> SegDataset:
    classes = class_names if isinstance(class_names, list) else read_class_file(class_names)
    if len(classes) > MAX_EVAL_CLASSES:
        raise S2ClipError(f"custom dataset: {class_names if not isinstance(class_names, list) else 'the class list'} "
                          f"names {len(classes)} classes; evaluation counts a {len(classes)}x{len(classes)} confusion "
                          f"matrix and takes at most {MAX_EVAL_CLASSES} classes")
    imgs = _list_files(Path(images).expanduser(), tuple(sorted(IMAGE_SUFFIXES)), "image")
    if not imgs:
        raise S2ClipError(f"custom dataset: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {images}")
    labels = _list_files(Path(masks).expanduser(), MASK_SUFFIXES, "mask")
    missing = [stem for stem in imgs if stem not in labels]
    if missing:
        more = f" and {len(missing) - _SHOW_MISSING} more" if len(missing) > _SHOW_MISSING else ""
        raise S2ClipError(f"custom dataset: {len(missing)} of {len(imgs)} images have no mask of the same name "
                          f"({'/'.join(MASK_SUFFIXES)}) in {masks}: {', '.join(missing[:_SHOW_MISSING])}{more}")
    samples = [Sample(stem, path, labels[stem]) for stem, path in imgs.items()]
    notices = []
    orphans = [labels[stem].name for stem in labels if stem not in imgs]
    if orphans:
        more = f" and {len(orphans) - _SHOW_MISSING} more" if len(orphans) > _SHOW_MISSING else ""
        notices.append(f"custom dataset: {len(orphans)} of {len(labels)} masks in {masks} have no image of the same "
                       f"name in {images} and are not evaluated: {', '.join(orphans[:_SHOW_MISSING])}{more}")
    preset = custom_preset(len(classes), reduce_zero_label=reduce_zero_label)
    source = f"images={Path(images).expanduser().resolve()} masks={Path(masks).expanduser().resolve()}"
    return SegDataset(CUSTOM, preset, classes, samples, None, source, tuple(notices))


def open_dataset(name: str | None, data_root: Path | str | None, *, images: Path | str | None = None,
                 masks: Path | str | None = None, class_names: str | Path | list[list[str]] | None = None,
                 reduce_zero_label: bool = False, limit: int | None = None) -> SegDataset:
    """Open a benchmark preset under ``data_root``, or (``name`` "custom" or None) a generic dataset
    from ``images`` + ``masks`` folders (masks matched by file stem) and a class-name file.

    For a preset, ``class_names`` optionally replaces the packaged names (same number of classes);
    ``reduce_zero_label`` applies to custom datasets only. Raises ``S2ClipError`` with one line
    naming what is expected and what is missing.
    """
    if name in (None, CUSTOM):
        if images is None or masks is None or class_names is None:
            raise S2ClipError("a custom dataset needs --images DIR, --masks DIR and --class-names FILE")
        return _open_custom(Path(images), Path(masks), class_names, reduce_zero_label).head(limit)
    if name not in PRESETS:
        raise S2ClipError(f"unknown dataset {name!r}; choose one of: {', '.join(PRESETS)}, or {CUSTOM} "
                          "(--images/--masks/--class-names)")
    if images is not None or masks is not None:
        raise S2ClipError(f"--images/--masks describe a custom dataset; {name} reads its files from --data-root")
    if data_root is None:
        raise S2ClipError(f"{name} needs --data-root (the folder in the {PRESETS[name].layout.title})")
    preset = PRESETS[name]
    layout = preset.layout
    root = Path(data_root).expanduser()
    _check_layout(name, root, layout)
    samples, notices = (_split_samples(name, root, layout) if layout.split_file
                        else (_scan_samples(name, root, layout), []))
    if class_names is None:
        classes = preset_class_names(name)
    else:
        classes = class_names if isinstance(class_names, list) else read_class_file(class_names, strict=False)
        if len(classes) != preset.num_classes:
            raise S2ClipError(f"{name} has {preset.num_classes} classes but the class names given have "
                              f"{len(classes)}")
    return SegDataset(name, preset, classes, samples, root, str(root.resolve()), tuple(notices)).head(limit)
