"""The instance-mask component (refine/instance_masks): painting SAM 2's masks as CorrCLIP does, the
reader of CorrCLIP's pre-generated <stem>.npz files (every bad file a one-line error, sizes checked
before the data are read), the content-keyed cache, and SAM 2's real automatic mask generator on
the tiny model (`models.sam2`: a stub mask decoder at the model level)."""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from s2clip_cli.errors import S2ClipError
from s2clip_cli.models.registry import sam2_spec
from s2clip_cli.models.sam2 import build_sam2_model, sam2_installed
from s2clip_cli.refine.instance_masks import (
    MAX_INSTANCE_ID,
    MaskCache,
    MaskFolder,
    Sam2GeneratorParams,
    load_sam2_generator,
    paint_instances,
    read_instance_mask,
)

needs_sam2 = pytest.mark.skipif(not sam2_installed(), reason="SAM 2's package (`make install` installs it)")


def _save(path: Path, **arrays: np.ndarray) -> Path:
    np.savez_compressed(path, **arrays)
    return path


# ------------------------------------------------------------------------------------ painting
def test_paint_instances_smallest_first_larger_over_smaller() -> None:
    big = np.zeros((4, 6), bool)
    big[:, :4] = True
    small = np.zeros((4, 6), bool)
    small[1:3, 2:6] = True
    tie = np.zeros((4, 6), bool)
    tie[0, 5] = True
    out = paint_instances([{"segmentation": big, "area": 16}, {"segmentation": small, "area": 8},
                           {"segmentation": tie, "area": 1}], (4, 6))
    # ids by ascending area: tie 1, small 2, big 3; big is painted last, over small
    assert out.dtype == np.int64
    assert out.tolist() == [[3, 3, 3, 3, 0, 1], [3, 3, 3, 3, 2, 2], [3, 3, 3, 3, 2, 2], [3, 3, 3, 3, 0, 0]]
    assert paint_instances([], (2, 3)).tolist() == [[0, 0, 0], [0, 0, 0]]


# ------------------------------------------------------------------------------------ reading files
def test_read_a_corrclip_mask_file(tmp_path: Path) -> None:
    mask = np.arange(12, dtype=np.int64).reshape(3, 4)
    path = _save(tmp_path / "a.npz", instance_mask=mask)
    out = read_instance_mask(path, (3, 4))
    assert out.dtype == np.int64 and np.array_equal(out, mask)
    # other integer types are accepted (our cache stores uint16)
    assert np.array_equal(read_instance_mask(_save(tmp_path / "b.npz", instance_mask=mask.astype(np.uint16)), (3, 4)),
                          mask)


def _fifo(tmp_path: Path) -> Path:
    path = tmp_path / "fifo.npz"
    os.mkfifo(path)
    return path


BAD_FILES = {
    "missing": (lambda d: d / "nope.npz", "is missing"),
    "folder": (lambda d: (d / "dir.npz").mkdir() or d / "dir.npz", "not a regular file"),
    "fifo": (_fifo, "not a regular file"),
    "not npz": (lambda d: (d / "t.npz").write_bytes(b"hello, not a zip") and d / "t.npz", "not an .npz archive"),
    "no key": (lambda d: _save(d / "k.npz", masks=np.zeros((3, 4), np.int64)), "has no 'instance_mask' array"),
    "float": (lambda d: _save(d / "f.npz", instance_mask=np.zeros((3, 4), np.float32)), "not integer instance ids"),
    "objects": (lambda d: _save(d / "o.npz", instance_mask=np.array([[{"a": 1}] * 4] * 3, dtype=object)),
                "not integer instance ids"),
    "wrong size": (lambda d: _save(d / "s.npz", instance_mask=np.zeros((4, 3), np.int64)),
                   "'instance_mask' is 3x4, but the image is 4x3"),
    "3-d": (lambda d: _save(d / "3.npz", instance_mask=np.zeros((3, 4, 1), np.int64)), "of shape (3, 4, 1)"),
    "negative": (lambda d: _save(d / "n.npz", instance_mask=-np.ones((3, 4), np.int64)), "must be in 0..9999"),
    "too big an id": (lambda d: _save(d / "b.npz", instance_mask=np.full((3, 4), MAX_INSTANCE_ID + 1)),
                      "must be in 0..9999"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_mask_files_are_one_line_errors(tmp_path: Path, case: str) -> None:
    make, message = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(S2ClipError) as info:
        read_instance_mask(path, (3, 4))
    text = str(info.value)
    assert message in text and "\n" not in text and str(path) in text


def test_sizes_are_checked_before_the_data_are_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A header claiming a huge array (or a member declaring more bytes than its shape takes) is
    refused from the header alone: the array reader is never called."""
    from numpy.lib import format as npy_format

    called = []
    monkeypatch.setattr(npy_format, "read_array", lambda *a, **k: called.append(1))
    huge = io.BytesIO()
    npy_format.write_array_header_1_0(huge, {"descr": "<i8", "fortran_order": False, "shape": (100000, 100000)})
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as archive:
        archive.writestr("instance_mask.npy", huge.getvalue())
    with pytest.raises(S2ClipError, match="is 100000x100000, but the image is 4x3"):
        read_instance_mask(tmp_path / "huge.npz", (3, 4))
    padded = io.BytesIO()
    np.save(padded, np.zeros((3, 4), np.int64))
    with zipfile.ZipFile(tmp_path / "long.npz", "w") as archive:
        archive.writestr("instance_mask.npy", padded.getvalue() + b"\0" * 10000)
    with pytest.raises(S2ClipError, match="more than its 3x4 int64 data"):
        read_instance_mask(tmp_path / "long.npz", (3, 4))
    (tmp_path / "bloat.npz").write_bytes(b"\0" * (8 * 12 + 4096 + 70000))
    with pytest.raises(S2ClipError, match="more than an 3x4 mask takes"):
        read_instance_mask(tmp_path / "bloat.npz", (3, 4))
    assert not called


def test_mask_folder_finds_masks_by_stem(tmp_path: Path) -> None:
    _save(tmp_path / "cat.npz", instance_mask=np.ones((2, 3), np.int64))
    folder = MaskFolder(tmp_path)
    assert folder.needs_name and folder.identity == {"generator": "folder", "folder": str(tmp_path.resolve())}
    image = np.zeros((2, 3, 3), np.uint8)
    assert folder.masks(image, "cat").tolist() == [[1, 1, 1], [1, 1, 1]]
    for name in ("../cat", "a/b", ".."):
        with pytest.raises(S2ClipError, match="bad image name"):
            folder.masks(image, name)
    with pytest.raises(S2ClipError, match="found by the image's file name"):
        folder.masks(image, None)
    with pytest.raises(S2ClipError, match="is not a folder"):
        MaskFolder(tmp_path / "cat.npz")


# ------------------------------------------------------------------------------------ cache
def test_cache_is_keyed_by_content_and_generator(tmp_path: Path) -> None:
    cache = MaskCache(tmp_path / "cache")
    image = np.random.default_rng(0).integers(0, 255, (5, 7, 3), dtype=np.uint8)
    mask = np.arange(35, dtype=np.int64).reshape(5, 7)
    ident = {"generator": "x", "params": {"points_per_side": 8}}
    assert cache.get(image, ident) is None
    cache.put(image, ident, mask)
    assert np.array_equal(cache.get(image.copy(), ident), mask)  # same pixels, another array: a hit
    assert cache.get(image, {**ident, "params": {"points_per_side": 32}}) is None  # other parameters
    other = image.copy()
    other[0, 0, 0] ^= 1
    assert cache.get(other, ident) is None  # one pixel changed
    path = cache.path(image, ident)
    path.write_bytes(b"damaged")
    assert cache.get(image, ident) is None  # a bad entry is a miss, regenerated by the caller


def test_an_unwritable_cache_warns_once_and_carries_on(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cache = MaskCache(blocker / "cache")  # under a file: cannot be created
    image = np.zeros((2, 2, 3), np.uint8)
    with pytest.warns(RuntimeWarning, match="cannot write the mask cache"):
        cache.put(image, {}, np.zeros((2, 2), np.int64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.put(image, {}, np.zeros((2, 2), np.int64))  # no second warning


# ------------------------------------------------------------------------------------ SAM 2 generator
@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8)


@needs_sam2
def test_tiny_sam2_generator_masks_and_cache(tmp_path: Path, image: np.ndarray,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    cache = MaskCache(tmp_path / "cache")
    gen = load_sam2_generator("sam2_hiera_large", Sam2GeneratorParams(points_per_side=3), mode="tiny",
                              device=torch.device("cpu"), cache=cache)
    ident = gen.identity
    assert ident["generator"] == "sam2_automatic" and ident["model"] == "sam2_hiera_large"
    assert ident["weights"] == "random-tiny-seed0" and ident["precision"] == "fp32"
    assert ident["params"]["points_per_side"] == 3 and ident["params"]["pred_iou_thresh"] == 0.4
    assert ident["params"]["stability_score_thresh"] == 0.4 and ident["params"]["multimask_output"] is False
    masks = gen.masks(image)
    assert masks.shape == (60, 80) and masks.dtype == np.int64
    ids = np.unique(masks)
    assert ids[0] == 0 and len(ids) == 10  # 9 points, 9 masks (blobs around them), and uncovered pixels
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    # The second call reads the cache: the generator is not run again.
    monkeypatch.setattr(gen, "generate", lambda *_: pytest.fail("regenerated a cached image"))
    assert np.array_equal(gen.masks(image.copy()), masks)
    other = load_sam2_generator("sam2_hiera_large", Sam2GeneratorParams(points_per_side=2), mode="tiny",
                                device=torch.device("cpu"), cache=cache)
    assert other.identity != ident and len(np.unique(other.masks(image))) == 5  # other params: generated anew


@needs_sam2
def test_generator_runs_under_reduced_precision(image: np.ndarray, tmp_path: Path) -> None:
    gen = load_sam2_generator("sam2_hiera_large", Sam2GeneratorParams(points_per_side=2), mode="tiny",
                              device=torch.device("cpu"), dtype=torch.bfloat16, cache=MaskCache(tmp_path))
    assert gen.identity["precision"] == "bf16"
    masks = gen.masks(image)
    assert masks.shape == image.shape[:2] and masks.max() >= 1


@needs_sam2
def test_real_weights_are_located_like_every_checkpoint(tmp_path: Path) -> None:
    """Offline without the file: one line naming sam2_hiera_large, where to put it and the command."""
    with pytest.raises(S2ClipError) as info:
        load_sam2_generator("sam2_hiera_large", Sam2GeneratorParams(), mode="real", offline=True)
    text = str(info.value)
    assert "sam2_hiera_large.pt" in text and "s2clip models download sam2_hiera_large" in text and "\n" not in text
    empty = tmp_path / "sam2.pt"
    empty.write_bytes(b"")
    with pytest.raises(S2ClipError, match="SAM 2 checkpoint .* is empty"):
        load_sam2_generator("sam2_hiera_large", Sam2GeneratorParams(), mode="real", path=empty)
    other = tmp_path / "other.pt"
    torch.save({"model": {"nope": torch.zeros(1)}}, other)
    with pytest.raises(S2ClipError, match="SAM 2 checkpoint .* does not match the SAM 2 architecture"):
        build_sam2_model(sam2_spec("sam2_hiera_large"), checkpoint=other, tiny=True)


def test_points_per_side_is_checked() -> None:
    with pytest.raises(S2ClipError, match="points per side"):
        Sam2GeneratorParams(points_per_side=0)


@needs_sam2
def test_models_verify_checks_the_sam2_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from s2clip_cli.models.registry import any_spec
    from s2clip_cli.models.verify import verify_spec

    monkeypatch.setenv("S2CLIP_WEIGHTS_DIR", str(tmp_path))
    spec = any_spec("sam2_hiera_large")
    with pytest.raises(S2ClipError, match="s2clip models download sam2_hiera_large"):
        verify_spec(spec)
    (tmp_path / "sam2_hiera_large.pt").write_bytes(b"")
    with pytest.raises(S2ClipError, match="SAM 2 checkpoint .*sam2_hiera_large.pt is empty"):
        verify_spec(spec)
