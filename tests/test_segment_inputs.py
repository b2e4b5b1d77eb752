"""What `segment` reads: files, folders (--recursive), glob patterns, @lists, videos; --batch; and a bad
input in a run reported on one line while the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from segment_helpers import FAST, reuse_segmenters, save_image, segment  # noqa: F401 - fixture

from s2clip_cli.errors import S2ClipError
from s2clip_cli.io.sources import Source, check_unique_names, collect_sources
from s2clip_cli.io.video import VideoFrames


def _names(sources: list[Source]) -> list[tuple[str, str]]:
    return [(s.name, s.kind) for s in sources]


# ----------------------------------------------------------------------------------- collecting


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    for name in ["b.PNG", "a.jpg", "a_mask.png", "a_overlay.png", "old_overlay.mp4", ".hidden.jpg", "notes.txt",
                 "clip.mp4", "sub/c.png", "sub/deeper/d.webp", ".cache/e.png", "out/a_mask.png", "out/f.png"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    return root


def test_folders_flat_and_recursive(tree: Path) -> None:
    assert _names(collect_sources([tree])) == [("a", "image"), ("b", "image"), ("clip", "video")]
    found = collect_sources([str(tree)], recursive=True, skip_dirs=[tree / "out"])
    # sub-folders mirrored in the names; hidden folders, the output folder and the tool's own files left out
    assert _names(found) == [("a", "image"), ("b", "image"), ("clip", "video"), ("sub/c", "image"),
                             ("sub/deeper/d", "image")]
    assert found[3].path == tree / "sub" / "c.png" and not found[3].named
    with_out = collect_sources([tree], recursive=True)
    assert ("out/f", "image") in _names(with_out) and ("out/a_mask", "image") not in _names(with_out)


def test_named_files_keep_their_stem_and_are_kept_once(tree: Path) -> None:
    found = collect_sources([tree / "sub" / "c.png", tree / "a_mask.png", tree, str(tree / "a.jpg")])
    # a file named on the command line is an input whatever its name; a file found twice counts once
    assert _names(found) == [("c", "image"), ("a_mask", "image"), ("a", "image"), ("b", "image"),
                             ("clip", "video")]
    assert [s.named for s in found] == [True, True, False, False, False]


def test_glob_patterns_are_expanded_by_us(tree: Path) -> None:
    found = collect_sources([str(tree / "**" / "*.png")])
    # *_mask.png and hidden folders left out; case-sensitive as in a shell (b.PNG does not match)
    assert _names(found) == [("out/f", "image"), ("sub/c", "image")]
    assert _names(collect_sources([str(tree / "s?b" / "*.png")])) == [("sub/c", "image")]
    with pytest.raises(S2ClipError, match=r"pattern .*\*\.gif' matches no image or video"):
        collect_sources([str(tree / "*.gif")])


def test_list_files(tree: Path, tmp_path: Path) -> None:
    lists = tmp_path / "lists"
    lists.mkdir()
    listing = lists / "inputs.txt"
    listing.write_text(f"# my photos\n../photos/a.jpg\n\n  ../photos/sub  \n{tree / 'clip.mp4'}\n")
    assert _names(collect_sources([f"@{listing}"])) == [("a", "image"), ("c", "image"), ("clip", "video")]
    listing.write_text("../photos/a.jpg\nmissing.png\n")
    with pytest.raises(S2ClipError, match=r"input .*missing.png \(listed in .*inputs.txt\) does not exist"):
        collect_sources([f"@{listing}"])
    listing.write_text("# nothing\n\n")
    with pytest.raises(S2ClipError, match="names no input"):
        collect_sources([f"@{listing}"])
    with pytest.raises(S2ClipError, match="list file .*nope.txt does not exist"):
        collect_sources([f"@{lists / 'nope.txt'}"])


def test_only_regular_files_are_read(tree: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(S2ClipError, match="pipe.png is not a regular file"):
        collect_sources([fifo])
    (tree / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "elsewhere.png").write_bytes(b"x")
    (tree / "link.png").symlink_to(tmp_path / "elsewhere.png")  # a link to a regular file is read
    (tree / "same.png").symlink_to(tree / "b.PNG")  # the same file twice counts once
    os.mkfifo(tree / "fifo.jpg")
    assert _names(collect_sources([tree])) == [("a", "image"), ("b", "image"), ("clip", "video"), ("link", "image")]
    with pytest.raises(S2ClipError, match="zero.png is not a regular file"):
        collect_sources([tree / "zero.png"])


def test_errors_for_missing_and_empty_inputs(tmp_path: Path) -> None:
    with pytest.raises(S2ClipError, match="nope.jpg does not exist"):
        collect_sources([tmp_path / "nope.jpg"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(S2ClipError, match="contains no images or videos"):
        collect_sources([tmp_path / "empty"], recursive=True)
    with pytest.raises(S2ClipError, match="no input"):
        collect_sources([])


def test_colliding_output_names_are_refused(tree: Path) -> None:
    (tree / "a.png").write_bytes(b"x")
    with pytest.raises(S2ClipError, match=r"a.jpg and .*a.png would write the same outputs \(a\)"):
        check_unique_names(collect_sources([tree]))
    (tree / "a.png").unlink()
    (tree / "sub" / "a.jpg").write_bytes(b"x")
    check_unique_names(collect_sources([tree], recursive=True))  # sub/a and a: different folders under -o
    with pytest.raises(S2ClipError, match="would write the same outputs"):
        check_unique_names(collect_sources([tree / "a.jpg", tree / "sub" / "a.jpg"]))


def test_image_names_are_paths_relative_to_the_input_root(tree: Path, tmp_path: Path) -> None:
    found = collect_sources([tree], recursive=True, skip_dirs=[tree / "out"])
    assert [s.image_name for s in found] == ["a.jpg", "b.PNG", "clip.mp4", "sub/c.png", "sub/deeper/d.webp"]
    assert [s.image_name for s in collect_sources([str(tree / "**" / "*.png")])] == ["out/f.png", "sub/c.png"]
    assert collect_sources([tree / "sub" / "deeper" / "d.webp"])[0].image_name == "d.webp"  # named: its file name


def test_no_name_leads_outside_the_output_folder(tree: Path, tmp_path: Path) -> None:
    # a pattern whose match climbs out of its fixed folders
    with pytest.raises(S2ClipError, match=r"pattern .* matches .*a.jpg, outside its folder"):
        collect_sources([str(tree / "sub" / "*" / ".." / ".." / "*.jpg")])
    found = collect_sources([str(tree / "sub" / "deeper" / ".." / "*.png")])  # climbs, stays inside
    assert [(s.name, s.image_name) for s in found] == [("c", "c.png")]
    # a file whose stem would be '.' or '..' keeps its whole name (Path('..png').stem is '.')
    for file_name in ("..png", ".x.png", "...png"):
        (tmp_path / file_name).write_bytes(b"x")
        (source,) = collect_sources([tmp_path / file_name])
        assert source.name not in (".", "..") and "/" not in source.name
        out = tmp_path / "out"
        assert (out / source.name).parent == out
    assert collect_sources([tmp_path / "..png"])[0].name == "..png"


# ----------------------------------------------------------------------------------- videos


def write_video(path: Path, frames: int, size: tuple[int, int] = (48, 64), fourcc: str = "mp4v") -> list[np.ndarray]:
    """A video whose frame i is a flat colour (RGB) that encodes i; returns the frames (RGB)."""
    h, w = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10.0, (w, h))
    assert writer.isOpened()
    rgb = []
    for i in range(frames):
        frame = np.zeros((h, w, 3), np.uint8)
        frame[..., 0] = 40 * i % 256  # red grows with the index
        frame[: h // 2, :, 2] = 200
        rgb.append(frame)
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return rgb


@pytest.mark.parametrize("suffix,fourcc", [(".mp4", "mp4v"), (".avi", "MJPG")])
def test_video_frames_every_n(tmp_path: Path, suffix: str, fourcc: str) -> None:
    path = tmp_path / f"v{suffix}"
    original = write_video(path, 5, fourcc=fourcc)
    with VideoFrames(path, every=2) as video:
        assert (len(video), video.size, video.fps) == (3, (48, 64), 10.0)
        frames = list(video)
    assert [i for i, _ in frames] == [0, 2, 4]
    for index, frame in frames:
        assert frame.shape == (48, 64, 3) and frame.dtype == np.uint8
        assert np.abs(frame.astype(int) - original[index]).mean() < 8  # RGB order, lossy codec


def test_broken_videos_are_one_line_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 50)
    with pytest.raises(S2ClipError, match="cannot read video .*bad.mp4"):
        with VideoFrames(bad) as video:
            list(video)
    with pytest.raises(S2ClipError, match="not a regular file"):
        VideoFrames(tmp_path)


# ----------------------------------------------------------------------------------- segment runs


def test_segment_lists_patterns_and_recursive_folders(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    save_image(photos / "a.png", seed=1)
    save_image(photos / "trip" / "b.png", seed=2)
    save_image(photos / "trip" / "day2" / "c.jpg", seed=3)
    save_image(tmp_path / "more" / "d.png", seed=4)
    save_image(tmp_path / "more" / "e.bmp", seed=5)
    (tmp_path / "list.txt").write_text("more/d.png\n")
    out = tmp_path / "out"
    code, stdout, stderr = segment(str(photos), "-r", f"@{tmp_path / 'list.txt'}", str(tmp_path / "more" / "*.bmp"),
                                   "-o", str(out))
    assert code == 0, stderr
    for name in ["a", "trip/b", "trip/day2/c", "d", "e"]:
        record = json.loads((out / f"{name}.json").read_text())
        assert Path(record["outputs"]["mask"]) == out / f"{name}_mask.png"
        assert (out / f"{name}_mask.png").is_file() and (out / f"{name}_overlay.png").is_file()
    assert "done 5, skipped 0, failed 0" in stderr
    # without --recursive only the folder's own images
    code, _, stderr = segment(str(photos), "-o", str(tmp_path / "flat"))
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == ["a.json", "a_mask.png", "a_overlay.png"]


def test_segment_video(tmp_path: Path) -> None:
    video = tmp_path / "clip.mp4"
    write_video(video, 5)
    out = tmp_path / "out"
    code, stdout, stderr = segment(str(video), "--every", "2", "--batch", "2", "-o", str(out))
    assert code == 0, stderr
    record = json.loads((out / "clip.json").read_text())
    assert [f["index"] for f in record["frames"]] == [0, 2, 4]
    assert record["fps"] == 10.0 and record["every"] == 2 and record["size"] == [48, 64]
    masks = sorted(p.name for p in (out / "clip_frames").iterdir())
    assert masks == ["clip_000000_mask.png", "clip_000002_mask.png", "clip_000004_mask.png"]
    for frame in record["frames"]:
        labels = np.asarray(Image.open(frame["mask"]))
        assert labels.shape == (48, 64) and labels.max() <= 2
        assert abs(sum(frame["pixel_share"].values()) - 1) < 1e-4
    with VideoFrames(out / "clip_overlay.mp4") as overlay:
        assert overlay.size == (48, 64) and len(list(overlay)) == 3
    assert sorted(p.name for p in out.iterdir()) == ["clip.json", "clip_frames", "clip_overlay.mp4"]
    assert "clip.mp4 → " in stdout and "(3 frames)" in stdout
    # a rerun skips the complete video
    code, _, stderr = segment(str(video), "-o", str(out))
    assert code == 0 and "done 0, skipped 1" in stderr


def test_a_broken_video_fails_alone(tmp_path: Path) -> None:
    save_image(tmp_path / "in" / "photo.png")
    (tmp_path / "in" / "broken.mkv").write_bytes(b"\x1aE\xdf\xa3" + b"\x00" * 64)
    code, stdout, stderr = segment(str(tmp_path / "in"), "-o", str(tmp_path / "out"))
    assert code == 1
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors[0].startswith(f"error: cannot read video {tmp_path / 'in' / 'broken.mkv'}")
    assert "done 1, skipped 0, failed 1" in stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["photo.json", "photo_mask.png",
                                                                     "photo_overlay.png"]


def test_batched_windows_give_the_same_labels() -> None:
    """`--batch`: the windows of several images share forward passes; labels equal one at a time."""
    from s2clip_cli.commands.methods import method_config
    from s2clip_cli.commands.segment_batch import segment_many
    from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, shape, dtype=np.uint8) for shape in [(60, 80, 3), (60, 80, 3), (50, 50, 3),
                                                                        (61, 80, 3), (20, 30, 3)]]
    for method in ["s2clip", "clearclip"]:
        config = method_config(SegmenterConfig(models="tiny", device="cpu", work_resolution="resized", crop=32,
                                               stride=16), method, None, {"short_side": 64, "no_sam": True})
        seg = Segmenter.build(config, [["cat"], ["dog"], ["bird"]], ["sky"])
        one = [seg(image) for image in images]
        many = segment_many(seg, images)
        for a, b in zip(one, many, strict=True):
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_allclose(a.probs.numpy(), b.probs.numpy(), atol=1e-5)
        assert len({tuple(np.unique(r.labels)) for r in one}) > 1 or len(np.unique(one[0].labels)) > 1


def test_segment_batch_cli_writes_the_same_masks(tmp_path: Path) -> None:
    for i, shape in enumerate([(40, 50), (40, 50), (30, 70)]):
        save_image(tmp_path / "in" / f"{i}.png", shape, seed=i)
    code1, _, err1 = segment(str(tmp_path / "in"), "-o", str(tmp_path / "one"))
    code3, _, err3 = segment(str(tmp_path / "in"), "--batch", "3", "-o", str(tmp_path / "three"))
    assert code1 == code3 == 0, err1 + err3
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / "one" / f"{i}_mask.png"))
        b = np.asarray(Image.open(tmp_path / "three" / f"{i}_mask.png"))
        np.testing.assert_array_equal(a, b)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_bad_file_is_one_line_and_the_rest_still_run(tmp_path: Path) -> None:
    folder = tmp_path / ("a-rather-long-folder-name-" * 8) / "in"
    save_image(folder / "good1.png", seed=1)
    save_image(folder / "good2.png", seed=2)
    corrupt = folder / ("corrupt-" + "x" * 120 + ".png")
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    code, stdout, stderr = segment(str(folder), "--batch", "2", "-o", str(tmp_path / "out"))
    assert code == 1
    errors = _error_lines(stderr)
    assert len(errors) == 2, stderr  # the bad file, then the run's verdict
    assert str(corrupt) in errors[0] and "not a supported image" in errors[0]
    assert "1 of 3 inputs could not be segmented" in errors[1]
    assert "done 2, skipped 0, failed 1" in stderr
    assert (tmp_path / "out" / "good1.json").is_file() and (tmp_path / "out" / "good2.json").is_file()
    assert not list((tmp_path / "out").glob("corrupt*"))
    assert "Traceback" not in stdout + stderr


def test_errors_stay_on_one_line_when_stderr_is_a_pipe(tmp_path: Path) -> None:
    """Rich wraps at 80 columns when stderr is not a terminal; error lines must not wrap."""
    folder = tmp_path / ("a-long-folder-name-" * 10)
    bad = [folder / f"broken-{i}-{'y' * 90}.jpg" for i in range(2)]
    for path in bad:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xd8\xff" + b"not a jpeg" * 5)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.run([sys.executable, "-m", "s2clip_cli", "segment", str(folder), "--classes", "cat", *FAST,
                           "-o", str(tmp_path / "out")], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr
    errors = _error_lines(proc.stderr)
    assert len(errors) == 3, proc.stderr
    for path, line in zip(bad, errors, strict=False):
        assert str(path) in line and line.endswith(")")  # the whole message on its line
    assert "done 0, skipped 0, failed 2" in proc.stderr


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_batch_and_video_run_under_low_precision(tmp_path: Path, precision: str) -> None:
    """What CUDA users run (fp16/bf16 autocast), on the CPU: --batch across images and a video."""
    for i in range(2):
        save_image(tmp_path / "in" / f"{i}.png", (40, 50), seed=i)
    write_video(tmp_path / "in" / "clip.mp4", 3)
    out = tmp_path / "out"
    code, _, stderr = segment(str(tmp_path / "in"), "--batch", "2", "--precision", precision, "-o", str(out))
    assert code == 0, stderr
    assert "done 3, skipped 0, failed 0" in stderr
    for name in ("0", "1"):
        record = json.loads((out / f"{name}.json").read_text())
        assert record["run"]["precision"] == precision
        assert np.asarray(Image.open(out / f"{name}_mask.png")).shape == (40, 50)
    frames = json.loads((out / "clip.json").read_text())["frames"]
    assert [f["index"] for f in frames] == [0, 1, 2]
