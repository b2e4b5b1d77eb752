"""Image reading (odd but valid and broken files), input collection, resizing, atomic writes,
palette masks and overlays."""

from __future__ import annotations

import io as stdio
import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from s2clip_cli.errors import S2ClipError
from s2clip_cli.io.files import (
    atomic_path,
    atomic_write_bytes,
    exclusive_lock,
    hash_file,
    prepare_output_dir,
    write_json,
)
from s2clip_cli.io.images import IMAGE_SUFFIXES, collect_images, read_image
from s2clip_cli.io.outputs import (
    OutputSet,
    class_shares,
    make_palette,
    mask_png_kind,
    read_mask_png,
    save_mask_png,
    save_overlay,
)
from s2clip_cli.pipeline.transforms import rescale_size, resize_short_side

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (30, 40, 3), dtype=np.uint8)


def _save(tmp_path: Path, name: str, image: Image.Image, **kwargs) -> Path:
    path = tmp_path / name
    image.save(path, **kwargs)
    return path


def _assert_rgb(array: np.ndarray, shape: tuple[int, int]) -> None:
    assert array.dtype == np.uint8
    assert array.shape == (*shape, 3)


# --------------------------------------------------------------------------- odd but valid images


@pytest.mark.parametrize("name", ["a.png", "a.bmp", "a.tif", "a.tiff", "a.PNG"])
def test_lossless_formats_round_trip_exactly(tmp_path: Path, name: str) -> None:
    path = _save(tmp_path, name, Image.fromarray(RGB), format="TIFF" if "tif" in name else None)
    np.testing.assert_array_equal(read_image(path), RGB)


def test_webp_lossless_and_jpeg(tmp_path: Path) -> None:
    webp = _save(tmp_path, "a.webp", Image.fromarray(RGB), lossless=True)
    np.testing.assert_array_equal(read_image(webp), RGB)
    smooth = np.full((30, 40, 3), (200, 100, 50), np.uint8)
    jpeg = _save(tmp_path, "a.JPG", Image.fromarray(smooth), quality=95)
    out = read_image(jpeg)
    _assert_rgb(out, (30, 40))
    assert np.abs(out.astype(int) - smooth).max() <= 3


def test_greyscale_becomes_three_equal_channels(tmp_path: Path) -> None:
    grey = RNG.integers(0, 256, (20, 20), dtype=np.uint8)
    out = read_image(_save(tmp_path, "g.png", Image.fromarray(grey)))
    _assert_rgb(out, (20, 20))
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_rgba_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., :3] = (255, 0, 0)
    rgba[:, :6, 3] = 255  # left half opaque red, right half fully transparent
    out = read_image(_save(tmp_path, "a.png", Image.fromarray(rgba)))
    _assert_rgb(out, (10, 12))
    assert (out[:, :6] == (255, 0, 0)).all()
    assert (out[:, 6:] == 255).all()


def test_grey_alpha_is_composited_on_white(tmp_path: Path) -> None:
    la = Image.merge("LA", [Image.new("L", (8, 6), 0), Image.new("L", (8, 6), 128)])
    out = read_image(_save(tmp_path, "la.png", la))
    _assert_rgb(out, (6, 8))
    assert 120 <= int(out[0, 0, 0]) <= 135  # black at half opacity over white


def test_palette_image(tmp_path: Path) -> None:
    pal = Image.new("P", (5, 4), 1)
    pal.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    out = read_image(_save(tmp_path, "p.png", pal))
    assert (out == (10, 20, 30)).all()


def test_cmyk_jpeg(tmp_path: Path) -> None:
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = read_image(_save(tmp_path, "c.jpg", cmyk, quality=95))
    _assert_rgb(out, (8, 16))
    r, g, b = out.reshape(-1, 3).mean(axis=0)
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_keeps_high_byte(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256, 4112, 32768, 65535]], np.uint16)
    path = tmp_path / "g16.png"
    cv2.imwrite(str(path), values)
    assert Image.open(path).mode.startswith("I;16")
    out = read_image(path)
    _assert_rgb(out, (1, 6))
    np.testing.assert_array_equal(out[0, :, 0], [0, 0, 1, 16, 128, 255])


def test_16bit_rgb_png_and_tiff(tmp_path: Path) -> None:
    rgb16 = np.zeros((2, 3, 3), np.uint16)
    rgb16[..., 0] = 65535  # red, written in OpenCV's BGR order below
    for name in ("c16.png", "c16.tif"):
        path = tmp_path / name
        cv2.imwrite(str(path), rgb16[..., ::-1])
        out = read_image(path)
        _assert_rgb(out, (2, 3))
        assert (out == (255, 0, 0)).all()


def test_int32_and_float_tiff(tmp_path: Path) -> None:
    as_int = _save(tmp_path, "i.tif", Image.fromarray(np.full((3, 4), 32768, np.int32)))
    assert (read_image(as_int) == 128).all()
    unit = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    out = read_image(_save(tmp_path, "f.tif", Image.fromarray(unit)))
    _assert_rgb(out, (3, 4))
    np.testing.assert_array_equal(out[..., 1], np.rint(unit * 255).astype(np.uint8))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, :20] = 255  # left half white; after a 90° clockwise rotation: top half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = _save(tmp_path, "rot.jpg", Image.fromarray(image), exif=exif, quality=95)
    out = read_image(path)
    _assert_rgb(out, (40, 20))
    assert out[:15].mean() > 200 and out[25:].mean() < 50


@pytest.mark.parametrize("shape", [(20, 20), (20, 3000), (3000, 20), (1, 1)])
def test_tiny_and_extreme_aspect(tmp_path: Path, shape: tuple[int, int]) -> None:
    image = RNG.integers(0, 256, (*shape, 3), dtype=np.uint8)
    np.testing.assert_array_equal(read_image(_save(tmp_path, "x.png", Image.fromarray(image))), image)


def test_explicit_file_with_unusual_suffix_is_decoded(tmp_path: Path) -> None:
    path = _save(tmp_path, "image.data", Image.fromarray(RGB), format="PNG")
    np.testing.assert_array_equal(read_image(path), RGB)


# --------------------------------------------------------------------------- broken inputs


def _jpeg_bytes() -> bytes:
    buffer = stdio.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"this is not an image\n" * 20)
    data = _jpeg_bytes()
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "no_eoi.jpg").write_bytes(data[:-2])
    png = stdio.BytesIO()
    Image.fromarray(RGB).save(png, "PNG")
    (tmp_path / "cut.png").write_bytes(png.getvalue()[:200])
    (tmp_path / "folder.png").mkdir()
    names = ["missing.jpg", "empty.jpg", "corrupt.png", "half.jpg", "no_eoi.jpg", "cut.png", "folder.png"]
    return {name: tmp_path / name for name in names}


def test_bad_inputs_raise_one_line_errors_naming_the_file(tmp_path: Path) -> None:
    for name, path in _bad_inputs(tmp_path).items():
        with pytest.raises(S2ClipError) as info:
            read_image(path)
        message = str(info.value)
        assert str(path) in message, name
        assert "\n" not in message, name
        assert message.startswith(f"cannot read image {path}: "), name


def test_truncated_jpeg_raises_instead_of_partial_load(tmp_path: Path) -> None:
    path = _bad_inputs(tmp_path)["half.jpg"]
    with pytest.raises(S2ClipError, match="truncated"):
        read_image(path)


# --------------------------------------------------------------------------- collecting inputs


def test_collect_images_expands_sorts_and_deduplicates(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ["b.PNG", "a.jpg", "c.tiff", "notes.txt", ".hidden.jpg"]:
        (folder / name).write_bytes(b"x")
    (folder / "sub").mkdir()
    (folder / "sub" / "deep.jpg").write_bytes(b"x")
    extra = tmp_path / "odd.name"
    extra.write_bytes(b"x")
    found = collect_images([extra, folder, str(folder / "a.jpg"), folder])
    assert [p.name for p in found] == ["odd.name", "a.jpg", "b.PNG", "c.tiff"]
    assert {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"} == set(IMAGE_SUFFIXES)


def test_collect_images_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(S2ClipError, match="contains no images"):
        collect_images([empty])
    with pytest.raises(S2ClipError, match="does not exist"):
        collect_images([tmp_path / "nope.jpg"])
    with pytest.raises(S2ClipError):
        collect_images([])


# --------------------------------------------------------------------------- resizing


def _mmseg_size(h: int, w: int, scale: tuple[int, int] = (2048, 448)) -> tuple[int, int]:
    """mmcv.rescale_size as written in mmcv 1.x / 2.x."""
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


@pytest.mark.parametrize("hw", [(375, 500), (512, 683), (1024, 2048), (448, 448), (100, 3000), (333, 334), (2000, 1000)])
def test_rescale_size_matches_mmseg(hw: tuple[int, int]) -> None:
    assert rescale_size(*hw, 448, 2048) == _mmseg_size(*hw)


def test_long_side_cap_binds() -> None:
    assert rescale_size(100, 3000, 448, 2048) == (68, 2048)  # 448/100 would make it 13440 wide
    assert rescale_size(1, 5000, 448) == (1, 2048)  # never a zero dimension


def test_resize_short_side_uses_bilinear() -> None:
    image = RNG.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    out = resize_short_side(image, 448)
    assert out.shape == (448, 597, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, cv2.resize(image, (597, 448), interpolation=cv2.INTER_LINEAR))
    assert resize_short_side(out, 448) is out


# --------------------------------------------------------------------------- atomic writing


def test_atomic_path_success_and_failure(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".txt"
            tmp.write_text("partial")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.txt"]


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_mask_png(tmp_path / "m.png", np.zeros((4, 4), np.float32), make_palette(2, False))
    with pytest.raises(S2ClipError, match="cannot write"):
        write_json(tmp_path / "missing_dir" / "a.json", {})
    assert list(tmp_path.iterdir()) == []


def test_write_json_nan_to_null(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_json(path, {"a": float("nan"), "b": [np.float32(1.5), np.int64(3), float("inf")], "p": Path("x")})
    text = path.read_text()
    assert json.loads(text) == {"a": None, "b": [1.5, 3, None], "p": "x"}
    assert text.startswith('{\n  "a": null')


def test_prepare_output_dir(tmp_path: Path) -> None:
    out = prepare_output_dir(tmp_path / "a" / "b")
    assert out.is_dir()
    assert prepare_output_dir(out) == out
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(S2ClipError, match=f"output path {afile} is a file, not a directory"):
        prepare_output_dir(afile)


def test_durable_atomic_write(tmp_path: Path) -> None:
    path = tmp_path / "r.bin"
    assert atomic_write_bytes(path, b"abc", durable=True) == path
    assert path.read_bytes() == b"abc" and [p.name for p in tmp_path.iterdir()] == ["r.bin"]
    with pytest.raises(S2ClipError, match="cannot write"):
        atomic_write_bytes(tmp_path / "missing" / "r.bin", b"x", durable=True)


def test_hash_file_matches_hashlib_across_blocks(tmp_path: Path) -> None:
    import hashlib

    data = RNG.integers(0, 256, (1 << 20) + 12345, dtype=np.uint8).tobytes()  # two 1 MiB blocks
    (tmp_path / "f").write_bytes(data)
    size, digests = hash_file(tmp_path / "f", "sha256", "md5")
    assert size == len(data)
    assert digests == {"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()}


def _busy(pid: str) -> str:
    return f"busy (pid {pid})"


def test_exclusive_lock_refuses_a_live_holder_and_takes_over_a_stale_file(tmp_path: Path) -> None:
    import fcntl
    import os

    lock = tmp_path / "sub" / ".lock"
    with exclusive_lock(lock, _busy):  # creates the folder
        assert lock.read_text() == f"{os.getpid()}\n"
        with pytest.raises(S2ClipError, match=rf"^busy \(pid {os.getpid()}\)$"):
            with exclusive_lock(lock, _busy):  # a second open file description: flock conflicts
                pass
    assert lock.exists()  # kept without remove=True; nobody holds it now
    lock.write_text("99999\n")  # as a killed run leaves it
    with exclusive_lock(lock, _busy, remove=True):
        assert lock.read_text().strip() == str(os.getpid())
        held = os.open(lock, os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(held)
    assert not lock.exists()


def test_exclusive_lock_never_follows_a_planted_link_or_opens_a_fifo(tmp_path: Path) -> None:
    import os

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    link = tmp_path / "work" / ".lock"
    link.parent.mkdir()
    link.symlink_to(victim)
    with pytest.raises(S2ClipError, match=r"lock file .*\.lock: it is a symbolic link$"):
        with exclusive_lock(link, _busy):
            pass
    assert victim.read_text() == "keep me\n"  # not truncated, no pid written into it
    fifo = tmp_path / "fifo" / ".lock"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    with pytest.raises(S2ClipError, match=r"lock file .*\.lock: it is not a regular file$"):
        with exclusive_lock(fifo, _busy):
            pass


def test_exclusive_lock_retries_when_the_holder_removed_the_file(tmp_path: Path, monkeypatch) -> None:
    """A process that opened the file just before its holder removed it must not lock the orphan."""
    import s2clip_cli.io.files as files

    lock = tmp_path / ".lock"
    calls = []
    real = files._names_file

    def first_orphaned(path: Path, fd: int) -> bool:
        calls.append(fd)
        if len(calls) == 1:
            path.unlink()  # the previous holder finishes between our open() and flock()
        return real(path, fd)

    monkeypatch.setattr(files, "_names_file", first_orphaned)
    with exclusive_lock(lock, _busy, remove=True):
        assert lock.exists() and len(calls) == 2
    assert not lock.exists()


# --------------------------------------------------------------------------- palettes, masks, overlays


def test_palette_is_deterministic_and_distinct() -> None:
    palette = make_palette(300, True)
    assert palette.shape == (300, 3) and palette.dtype == np.uint8
    assert (palette[0] == 0).all()
    assert len({tuple(c) for c in palette}) == 300
    np.testing.assert_array_equal(palette, make_palette(300, True))
    no_bg = make_palette(5, False)
    assert not (no_bg == 0).all(axis=1).any()
    np.testing.assert_array_equal(no_bg[1:], make_palette(6, True)[2:])
    assert make_palette(0, True).shape == (0, 3)


@pytest.mark.parametrize("num_classes", [3, 21, 256])
def test_mask_png_round_trips_labels(tmp_path: Path, num_classes: int) -> None:
    labels = RNG.integers(0, num_classes, (37, 53)).astype(np.int64)
    palette = make_palette(num_classes, True)
    path = tmp_path / "mask.png"
    save_mask_png(path, labels, palette)
    with Image.open(path) as image:
        assert image.mode == "P"
        np.testing.assert_array_equal(np.array(image), labels)
        rgb = np.array(image.convert("RGB"))
    np.testing.assert_array_equal(rgb, palette[labels])


def test_mask_png_palette_shorter_than_labels(tmp_path: Path) -> None:
    labels = np.array([[0, 200], [17, 3]])
    save_mask_png(tmp_path / "m.png", labels, make_palette(4, False))
    np.testing.assert_array_equal(np.array(Image.open(tmp_path / "m.png")), labels)


@pytest.mark.parametrize("num_classes", [257, 600, 65536])
def test_mask_png_is_16_bit_above_256_classes(tmp_path: Path, num_classes: int) -> None:
    """More than 256 classes (labels above 255): a 16-bit greyscale PNG that gives the labels back."""
    labels = RNG.integers(0, num_classes, (23, 31)).astype(np.int64)
    labels[0, 0] = num_classes - 1
    path = tmp_path / "m.png"
    save_mask_png(path, labels, make_palette(num_classes, True))
    with Image.open(path) as image:
        assert image.mode == "I;16"
        np.testing.assert_array_equal(np.array(image), labels)
    np.testing.assert_array_equal(read_mask_png(path, num_classes), labels)
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]


def test_mask_png_kind_is_decided_by_the_number_of_classes(tmp_path: Path) -> None:
    assert mask_png_kind(1) == mask_png_kind(256) == "palette"
    assert mask_png_kind(257) == mask_png_kind(65536) == "16-bit"
    with pytest.raises(S2ClipError, match="at most 65536"):
        mask_png_kind(65537)
    # a run with 300 classes writes 16-bit masks even when an image only holds small labels
    save_mask_png(tmp_path / "few.png", np.array([[0, 3]]), make_palette(300, False))
    assert Image.open(tmp_path / "few.png").mode == "I;16"
    with pytest.raises(S2ClipError, match="m.png"):
        save_mask_png(tmp_path / "m.png", np.array([[0, 65536]]), make_palette(3, False))
    assert not (tmp_path / "m.png").exists()


def test_read_mask_png_checks_the_file_and_the_labels(tmp_path: Path) -> None:
    labels = np.array([[0, 1], [2, 2]])
    save_mask_png(tmp_path / "m.png", labels, make_palette(3, False))
    np.testing.assert_array_equal(read_mask_png(tmp_path / "m.png", 3), labels)
    with pytest.raises(S2ClipError, match="label 2, not one of the 2 classes"):
        read_mask_png(tmp_path / "m.png", 2)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(S2ClipError, match="not a label PNG"):
        read_mask_png(tmp_path / "rgb.png", 3)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    with pytest.raises(S2ClipError, match="bad.png"):
        read_mask_png(tmp_path / "bad.png", 3)
    with pytest.raises(S2ClipError, match="not a regular file"):
        read_mask_png(tmp_path, 3)


# --------------------------------------------------------------------------- output sets


def _set_paths(folder: Path) -> tuple[list[Path], Path]:
    return [folder / "x_mask.png", folder / "x_overlay.png", folder / "x.json"], folder / "x.json"


def test_output_set_renames_everything_marker_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    targets, marker = _set_paths(tmp_path / "sub")
    order: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (order.append(Path(b).name), real_replace(a, b)))
    with OutputSet(targets, marker) as staged:
        for target in reversed(targets):  # written in any order
            staged.tmp(target).write_text(target.name)
            assert not target.exists()
    assert order == ["x_mask.png", "x_overlay.png", "x.json"]
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["x.json", "x_mask.png", "x_overlay.png"]
    assert (tmp_path / "sub" / "x.json").read_text() == "x.json"
    with pytest.raises(ValueError, match="not one of"):
        OutputSet(targets, marker).tmp(tmp_path / "other.png")


def test_output_set_failure_leaves_nothing(tmp_path: Path) -> None:
    targets, marker = _set_paths(tmp_path)
    adopted = tmp_path / "x_polygons.json"
    with pytest.raises(S2ClipError) as error, OutputSet(targets, marker) as staged:
        staged.tmp(targets[0]).write_text("mask")
        adopted.write_text("written in place")
        staged.adopt([adopted])
        raise S2ClipError(f"cannot write {staged.tmp(targets[1])}: disk full")
    assert list(tmp_path.iterdir()) == []
    assert str(error.value) == f"cannot write {targets[1]}: disk full"  # the real name, not the temporary one


def test_output_set_failed_rename_removes_what_was_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    targets, marker = _set_paths(tmp_path)
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        if Path(dst).name == "x.json":
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(S2ClipError, match="cannot write .*x.json: No space left"), OutputSet(targets, marker) as staged:
        for target in targets:
            staged.tmp(target).write_text("data")
    assert list(tmp_path.iterdir()) == []


def test_output_set_replace_drops_the_old_set_on_failure(tmp_path: Path) -> None:
    targets, marker = _set_paths(tmp_path)
    for target in targets:
        target.write_text("old")
    with OutputSet(targets, marker, replace=True) as staged:
        assert not marker.exists()  # the old set stops counting as complete at once
        for target in targets:
            staged.tmp(target).write_text("new")
    assert [t.read_text() for t in targets] == ["new"] * 3
    with pytest.raises(RuntimeError), OutputSet(targets, marker, replace=True) as staged:
        staged.tmp(targets[0]).write_text("newer")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []  # no mix of old and new


def test_output_set_folder_target(tmp_path: Path) -> None:
    frames, marker = tmp_path / "v_frames", tmp_path / "v.json"
    frames.mkdir()
    (frames / "old_mask.png").write_text("old")
    with OutputSet([frames, marker], marker, replace=True) as staged:
        staged.tmp(frames).mkdir()
        (staged.tmp(frames) / "v_000000_mask.png").write_text("new")
        staged.tmp(marker).write_text("{}")
    assert [p.name for p in frames.iterdir()] == ["v_000000_mask.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json", "v_frames"]


def test_class_shares() -> None:
    labels = np.array([[0, 0, 2, 2], [2, 2, 2, 2]])
    assert class_shares(labels, 4) == [0.25, 0.0, 0.75, 0.0]
    with pytest.raises(ValueError):
        class_shares(labels, 2)


def _scene(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((h, w, 3), 120, np.uint8)
    labels = np.zeros((h, w), np.int64)
    labels[:, w // 2 :] = 2
    labels[: h // 3, : w // 3] = 1
    return image, labels


def test_overlay_has_legend_on_the_right(tmp_path: Path) -> None:
    image, labels = _scene(300, 400)
    palette = make_palette(4, True)
    path = tmp_path / "overlay.png"
    save_overlay(path, image, labels, ["background", "cat", "dog", "absent"], palette)
    with Image.open(path) as overlay:
        assert overlay.mode == "RGB" and overlay.height == 300 and overlay.width > 400
        out = np.array(overlay)
    picture, legend = out[:, :400], out[:, 400:]
    # class 2 (right half) is blended with its colour, away from boundaries
    expected = np.rint(0.5 * 120 + 0.5 * palette[2].astype(float)).astype(np.uint8)
    np.testing.assert_array_equal(picture[200, 300], expected)
    assert (picture[:, 200] == 255).all()  # boundary between classes 0 and 2
    # the legend has text and swatches in the colours of the classes present, not of the absent one
    legend_colours = {tuple(c) for c in legend.reshape(-1, 3)}
    assert tuple(palette[1]) in legend_colours and tuple(palette[2]) in legend_colours
    assert tuple(palette[3]) not in legend_colours
    assert (legend < 100).all(axis=2).sum() > 50


@pytest.mark.parametrize("shape", [(20, 3000), (20, 20), (3000, 40)])
def test_overlay_extreme_shapes(tmp_path: Path, shape: tuple[int, int]) -> None:
    image, labels = _scene(*shape)
    path = tmp_path / "o.png"
    save_overlay(path, image, labels, ["background", "a rather long class name", "dog"], make_palette(3, True))
    with Image.open(path) as overlay:
        assert overlay.width >= shape[1] and overlay.height >= shape[0]
        assert overlay.width * overlay.height > shape[0] * shape[1]
        out = np.array(overlay)
    assert out[: shape[0], : shape[1]].std() > 0
    assert [p.name for p in tmp_path.iterdir()] == ["o.png"]


def test_output_set_removes_the_folders_it_created(tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    targets = [tmp_path / "new" / "deep" / "x_mask.png", tmp_path / "shared" / "x.txt", tmp_path / "x.json"]
    with pytest.raises(S2ClipError), OutputSet(targets, targets[-1]) as staged:
        staged.tmp(targets[0]).write_text("mask")
        targets[1].write_text("written in place")
        staged.adopt([targets[1]])
        raise S2ClipError("disk full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared"] and not any((tmp_path / "shared").iterdir())
