"""Class-agnostic instance masks (CorrCLIP's region masks): SAM 2's automatic mask generator, a
content-keyed cache of its output, and CorrCLIP's published pre-generated mask files.

An *instance mask* is an ``int64 [H, W]`` array at the image's own size: 0 where no mask covers a
pixel, ids 1..N elsewhere. From SAM 2's masks it is painted as CorrCLIP's ``generate_mask`` paints
it: masks sorted by area, smallest first, id = rank + 1, each painted over the earlier ones (so a
larger mask covers the smaller ones it overlaps). Where a region of the image has no 0 pixel, the
consumer (CorrCLIP) treats its smallest id as "uncovered".

Sources, one interface (`MaskSource`: ``identity`` + ``masks(image, name)``):

- `Sam2MaskGenerator` — ``sam2.automatic_mask_generator.SAM2AutomaticMaskGenerator`` with CorrCLIP's
  parameters (`Sam2GeneratorParams`), under the run's precision; results cached on disk per image
  content and generator identity (`MaskCache`), so `eval` never generates the same masks twice.
- `MaskFolder` — CorrCLIP's pre-generated masks: ``<folder>/<image stem>.npz`` holding
  ``instance_mask`` (integer ``[H, W]`` at the original image size). The files are untrusted: only
  regular files, ``allow_pickle=False``, the array's header (shape, dtype) checked against the
  image before its data are read, ids in ``0..MAX_INSTANCE_ID``; every problem is one line naming
  the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import stat
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from numpy.lib import format as npy_format

from ..errors import S2ClipError, one_line
from ..io.files import atomic_path
from ..models.precision import autocast, dtype_name
from ..models.weights import weights_dir

ARRAY_KEY = "instance_mask"  # CorrCLIP's key in its .npz files
# CorrCLIP pads windows' masks with id 10000 and relabels merged regions 10000 + cluster: ids at or
# above it would collide with those, so files holding them are refused.
MAX_INSTANCE_ID = 9999
_HEADER_SLACK = 4096  # bytes an .npy header may take besides the data


# ------------------------------------------------------------------------------------ painting
def paint_instances(masks: list[Mapping[str, Any]], size: tuple[int, int]) -> np.ndarray:
    """CorrCLIP's instance mask from SAM 2's generator output (``segmentation`` boolean ``[H, W]``
    and ``area`` per mask): sorted by area (stable), smallest first, painted with ids 1..N, later
    (larger) masks over earlier ones. ``int64 [H, W]``, 0 where no mask is."""
    out = np.zeros(size, dtype=np.int64)
    for instance_id, ann in enumerate(sorted(masks, key=lambda a: a["area"]), start=1):
        seg = np.asarray(ann["segmentation"], dtype=bool)
        if seg.shape != tuple(size):
            raise ValueError(f"mask of shape {seg.shape} for an image of {size}")
        out[seg] = instance_id
    return out


# ------------------------------------------------------------------------------------ sources
class MaskSource(Protocol):
    """Where instance masks come from."""

    @property
    def identity(self) -> dict[str, Any]:
        """What determines the masks (part of an evaluation's identity)."""
        ...

    @property
    def needs_name(self) -> bool:
        """True when masks are found by the image's file name (not by its content)."""
        ...

    def masks(self, image: np.ndarray, name: str | None) -> np.ndarray:
        """``int64 [H, W]`` instance mask of the H×W×3 uint8 `image` (file stem `name`, if known)."""
        ...


@dataclass(frozen=True)
class Sam2GeneratorParams:
    """``SAM2AutomaticMaskGenerator`` arguments. Defaults: CorrCLIP's ``set_mask_generator('sam2')``
    (8 points per side, predicted-IoU and stability thresholds 0.4, one mask per point); the other
    fields are the generator's own defaults, which CorrCLIP keeps."""

    points_per_side: int = 8
    pred_iou_thresh: float = 0.4
    stability_score_thresh: float = 0.4
    multimask_output: bool = False
    points_per_batch: int = 64
    stability_score_offset: float = 1.0
    mask_threshold: float = 0.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0
    min_mask_region_area: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.points_per_side <= 256:
            raise S2ClipError(f"points per side must be in 1..256, got {self.points_per_side}")

    def as_kwargs(self) -> dict[str, Any]:
        return asdict(self)


def image_digest(image: np.ndarray) -> str:
    """sha256 of an image's pixels and shape (hex): the cache key of its masks."""
    digest = hashlib.sha256(f"{image.shape}|{image.dtype}".encode())
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


def mask_cache_dir() -> Path:
    """Where generated masks are cached (beside the text-embedding cache)."""
    return weights_dir() / "mask-cache"


class MaskCache:
    """Instance masks on disk, one compressed ``.npz`` per (image content, generator identity); a
    write failure is warned about once and costs only a regeneration later; an unreadable entry is
    regenerated."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder if folder is not None else mask_cache_dir()
        self._warned = False

    def path(self, image: np.ndarray, identity: Mapping[str, Any]) -> Path:
        key = hashlib.sha256(json.dumps({"image": image_digest(image), "generator": identity},
                                        sort_keys=True).encode()).hexdigest()[:32]
        return self.folder / f"{key}.npz"

    def get(self, image: np.ndarray, identity: Mapping[str, Any]) -> np.ndarray | None:
        path = self.path(image, identity)
        if not path.is_file():
            return None
        try:
            return read_instance_mask(path, image.shape[:2])
        except S2ClipError:
            return None

    def put(self, image: np.ndarray, identity: Mapping[str, Any], mask: np.ndarray) -> None:
        path = self.path(image, identity)
        dtype = np.uint16 if mask.size == 0 or int(mask.max()) <= np.iinfo(np.uint16).max else np.int64
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                np.savez_compressed(fh, **{ARRAY_KEY: mask.astype(dtype)})
        except Exception as exc:  # noqa: BLE001 - an unwritable cache only costs time
            if not self._warned:
                self._warned = True
                warnings.warn(f"cannot write the mask cache in {path.parent} ({type(exc).__name__}: "
                              f"{one_line(exc)[:200]}); masks are generated again on every run",
                              RuntimeWarning, stacklevel=3)


class Sam2MaskGenerator:
    """SAM 2's automatic mask generator painted into instance masks, cached per image content."""

    needs_name = False

    def __init__(self, model: torch.nn.Module, params: Sam2GeneratorParams, *, model_name: str,
                 weights_identity: str, device: torch.device, dtype: torch.dtype,
                 cache: MaskCache | None = None) -> None:
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        self.params = params
        self.device, self.dtype = device, dtype
        self.generator = SAM2AutomaticMaskGenerator(model, **params.as_kwargs())
        self._identity = {"generator": "sam2_automatic", "model": model_name, "weights": weights_identity,
                          "params": params.as_kwargs(), "precision": dtype_name(dtype)}
        self.cache = cache if cache is not None else MaskCache()

    @property
    def identity(self) -> dict[str, Any]:
        return dict(self._identity)

    def generate(self, image: np.ndarray) -> np.ndarray:
        """Run the generator (no cache): ``int64 [H, W]``."""
        with torch.inference_mode(), autocast(self.device, self.dtype):
            anns = self.generator.generate(np.ascontiguousarray(image))
        return paint_instances(anns, image.shape[:2])

    def masks(self, image: np.ndarray, name: str | None = None) -> np.ndarray:
        cached = self.cache.get(image, self._identity)
        if cached is not None:
            return cached
        mask = self.generate(image)
        self.cache.put(image, self._identity, mask)
        return mask


class MaskFolder:
    """CorrCLIP's pre-generated masks: ``<folder>/<stem>.npz``, key ``instance_mask``."""

    needs_name = True

    def __init__(self, folder: str | Path) -> None:
        path = Path(folder).expanduser()
        if not path.is_dir():
            raise S2ClipError(f"instance-mask folder {path} is not a folder")
        self.folder = path

    @property
    def identity(self) -> dict[str, Any]:
        return {"generator": "folder", "folder": str(self.folder.resolve())}

    def path_for(self, name: str) -> Path:
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise S2ClipError(f"bad image name {name!r} for a mask file")
        return self.folder / f"{name}.npz"

    def masks(self, image: np.ndarray, name: str | None) -> np.ndarray:
        if name is None:
            raise S2ClipError("pre-generated instance masks are found by the image's file name; this image has "
                              "none (a video frame or an image in memory): use the SAM 2 generator instead")
        return read_instance_mask(self.path_for(name), image.shape[:2])


# ------------------------------------------------------------------------------------ reading files
def _array_header(archive: zipfile.ZipFile, path: Path) -> tuple[zipfile.ZipInfo, tuple[int, ...], np.dtype]:
    member = f"{ARRAY_KEY}.npy"
    try:
        info = archive.getinfo(member)
    except KeyError:
        names = ", ".join(n.removesuffix(".npy") for n in archive.namelist()[:8]) or "nothing"
        raise S2ClipError(f"mask file {path} has no {ARRAY_KEY!r} array (it holds {names})") from None
    with archive.open(info) as fh:
        try:
            version = npy_format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(fh)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dtype = npy_format.read_array_header_2_0(fh)
            else:
                raise ValueError(f"unsupported .npy version {version}")
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise S2ClipError(f"mask file {path}: its {ARRAY_KEY!r} array is not a valid .npy "
                              f"({one_line(exc)[:120]})") from None
    return info, tuple(int(s) for s in shape), np.dtype(dtype)


def read_instance_mask(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """The ``instance_mask`` array of an ``.npz`` file as ``int64 [H, W]``, checked against the image
    size ``(H, W)`` before any array data are read. One-line `S2ClipError` for a missing file, a
    non-regular file, a file that is not an npz, a missing key, a non-integer or wrongly sized array,
    or ids outside ``0..MAX_INSTANCE_ID``."""
    path = Path(path)
    h, w = int(size[0]), int(size[1])
    try:
        st = path.stat()
    except FileNotFoundError:
        raise S2ClipError(f"mask file {path} is missing (expected <image stem>.npz with an {ARRAY_KEY!r} array)") \
            from None
    except OSError as exc:
        raise S2ClipError(f"cannot read mask file {path}: {one_line(exc.strerror or exc)}") from None
    if not stat.S_ISREG(st.st_mode):
        raise S2ClipError(f"mask file {path} is not a regular file")
    limit = 8 * h * w + _HEADER_SLACK
    if st.st_size > limit + 64 * 1024:
        raise S2ClipError(f"mask file {path} is {st.st_size} bytes, more than an {h}x{w} mask takes")
    try:
        with open(path, "rb") as raw:
            data = raw.read(st.st_size + 1)
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise S2ClipError(f"mask file {path} is not an .npz archive ({one_line(exc)[:120]})") from None
    with archive:
        info, shape, dtype = _array_header(archive, path)
        if dtype.kind not in "iu" or dtype.itemsize > 8:
            raise S2ClipError(f"mask file {path}: {ARRAY_KEY!r} holds {dtype}, not integer instance ids")
        if shape != (h, w):
            got = "x".join(str(s) for s in reversed(shape)) if len(shape) == 2 else f"of shape {shape}"
            raise S2ClipError(f"mask file {path}: {ARRAY_KEY!r} is {got}, but the image is {w}x{h} "
                              "(masks are at the original image size)")
        if info.file_size > h * w * dtype.itemsize + _HEADER_SLACK:
            raise S2ClipError(f"mask file {path}: {ARRAY_KEY!r} takes {info.file_size} bytes, more than its "
                              f"{h}x{w} {dtype} data")
        try:
            with archive.open(info) as fh:
                array = npy_format.read_array(fh, allow_pickle=False)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise S2ClipError(f"mask file {path}: cannot read {ARRAY_KEY!r} ({one_line(exc)[:120]})") from None
    if array.shape != (h, w):
        raise S2ClipError(f"mask file {path}: {ARRAY_KEY!r} is truncated")
    if array.size and (int(array.min()) < 0 or int(array.max()) > MAX_INSTANCE_ID):
        raise S2ClipError(f"mask file {path}: instance ids must be in 0..{MAX_INSTANCE_ID}, found "
                          f"{int(array.min())}..{int(array.max())}")
    return array.astype(np.int64, copy=False)


# ------------------------------------------------------------------------------------ loading
_LOADED: dict[tuple[str, str, str, str], tuple[torch.nn.Module, str]] = {}


def load_sam2_generator(model_name: str, params: Sam2GeneratorParams, *, mode: str = "real",
                        path: str | Path | None = None, offline: bool = False,
                        device: torch.device = torch.device("cpu"), dtype: torch.dtype = torch.float32,
                        cache: MaskCache | None = None) -> Sam2MaskGenerator:
    """A `Sam2MaskGenerator` on `device`: real weights located (explicit `path`, the weights dir,
    the libraries' caches) or downloaded unless offline, like every checkpoint; ``tiny``/``random``:
    seeded random models (`models.sam2`). The model is built once per process and reused."""
    from ..models import registry, weights
    from ..models.sam2 import build_sam2_model

    spec = registry.sam2_spec(model_name)
    checkpoint = weights.resolve(spec, path, offline=offline) if mode == "real" else None
    key = (spec.name, mode, str(checkpoint), str(device))
    if key not in _LOADED:
        if mode != "real":
            torch.manual_seed(0)
        model = build_sam2_model(spec, checkpoint=checkpoint, tiny=mode == "tiny").to(device)
        identity = weights.content_identity(checkpoint) if checkpoint is not None else f"random-{mode}-seed0"
        _LOADED[key] = (model, identity)
    model, identity = _LOADED[key]
    return Sam2MaskGenerator(model, params, model_name=spec.name, weights_identity=identity, device=device,
                             dtype=dtype, cache=cache)


def mask_source_for(folder: str | Path | None, model_name: str, params: Sam2GeneratorParams, **load: Any) -> MaskSource:
    """The pre-generated masks of `folder` when given, else SAM 2's generator (`load_sam2_generator`)."""
    if folder is not None:
        return MaskFolder(folder)
    return load_sam2_generator(model_name, params, **load)


__all__ = [
    "ARRAY_KEY", "MAX_INSTANCE_ID", "MaskCache", "MaskFolder", "MaskSource", "Sam2GeneratorParams",
    "Sam2MaskGenerator", "image_digest", "load_sam2_generator", "mask_cache_dir", "mask_source_for",
    "paint_instances", "read_instance_mask",
]
