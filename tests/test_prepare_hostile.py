"""Hostile raw downloads: `s2clip data prepare` (and `data check`) refuse each with one `error:` line
naming the file and the problem, a non-zero exit and no traceback; nothing is written outside the
output folder, nothing hangs (every CLI run has a timeout), and memory stays bounded (the peak RSS
of the CLI process, from ``os.wait4``, is under 1 GiB — and under what the hostile file declares).

Built from synthetic files: archives with ``..``/absolute members and ids, FIFOs, symlinks to
``/dev/zero`` and out of the raw folder, zip and tar.gz bombs, a lying Cityscapes polygons file, a
lying image header, hostile RLE counts and truncated tars.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from raw_samples import (
    SAMPLES,
    RawSample,
    ade20k_sample,
    cityscapes_sample,
    context_sample,
    pack,
    png,
    voc_sample,
)

from s2clip_cli.data.prepare import prepare
from s2clip_cli.data.prepare.runner import output_path
from s2clip_cli.errors import S2ClipError

GIB = 1 << 30
TIMEOUT_S = 120.0  # a regression that hangs fails here instead of blocking the suite
pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/proc/self/status").exists(),
                                reason="POSIX with /proc only")


@dataclass
class CliRun:
    code: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes: the CLI process's VmHWM (its own, not the forked test runner's)


# Runs the CLI and, as it exits, writes its VmHWM (peak resident memory of this program, reset by
# exec, so not the test runner's memory the fork inherited) to the file named by argv[1].
_WRAPPER = """
import atexit, runpy, sys
report = sys.argv.pop(1)
def write_peak():
    with open("/proc/self/status") as fh:
        kib = next(line.split()[1] for line in fh if line.startswith("VmHWM:"))
    with open(report, "w") as fh:
        fh.write(kib)
atexit.register(write_peak)
sys.argv[0] = "s2clip"
runpy.run_module("s2clip_cli", run_name="__main__", alter_sys=True)
"""


def _limit_memory() -> None:
    """A safety net for regressions: the child cannot map more than 4 GiB (it then fails instead of
    taking the machine down); the assertions are on its peak RSS, far below this."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 * GIB, 4 * GIB))


def run_cli(*args: str | Path, timeout: float = TIMEOUT_S) -> CliRun:
    """Run the ``s2clip`` CLI with ``args`` in a fresh process, killed after ``timeout`` seconds."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as report:
        try:
            proc = subprocess.run([sys.executable, "-c", _WRAPPER, report.name, *map(str, args)],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env,
                                  timeout=timeout, preexec_fn=_limit_memory)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`s2clip {' '.join(map(str, args))}` still running after {timeout:.0f} s (hang)")
        peak = report.read().strip()
    assert peak, f"no memory report: {proc.stdout}{proc.stderr}"
    return CliRun(proc.returncode, proc.stdout, proc.stderr, int(peak) * 1024)


@contextmanager
def deadline(seconds: int = 60) -> Iterator[None]:
    """For in-process calls that a regression would block (opening a FIFO): fail after ``seconds``."""

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"still blocked after {seconds} s (a FIFO opened for reading?)")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def one_error_line(run: CliRun, *needles: str) -> str:
    """The run failed with exactly one ``error:`` line (no traceback) containing every needle."""
    assert run.code != 0, run.stdout + run.stderr
    text = (run.stdout + run.stderr).strip()
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, text
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def snapshot(folder: Path, skip: tuple[Path, ...]) -> dict[str, tuple[int, int]]:
    """Every path under ``folder`` (not following links) except the ``skip`` subtrees, with size
    and mtime: to show that nothing outside the output folder was written."""
    seen: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        dirnames[:] = [d for d in dirnames if base / d not in skip]
        for name in [*dirnames, *filenames]:
            st = os.lstat(base / name)
            seen[str((base / name).relative_to(folder))] = (st.st_size, st.st_mtime_ns)
    return seen


def prepare_cli(tmp_path: Path, name: str, raw: Path, *needles: str, workers: int = 0) -> str:
    """`data prepare` fails with one line naming ``needles``; only ``out`` may change under tmp_path,
    and it holds no label or image file."""
    out = tmp_path / "out"
    before = snapshot(tmp_path, (out,))
    run = run_cli("data", "prepare", name, "--from", raw, "-o", out, "-j", str(workers))
    line = one_error_line(run, *needles)
    assert snapshot(tmp_path, (out,)) == before, "something outside the output folder changed"
    written = [p for p in out.rglob("*") if p.suffix in (".png", ".jpg")] if out.exists() else []
    assert written == [], written
    assert run.peak_rss < GIB, run.peak_rss
    return line


# ------------------------------------------------------------------------------ 1. path traversal
def _voc_with_id(hostile: str, *, with_members: bool = True) -> RawSample:
    sample = voc_sample()
    part = sample.parts[0]
    root = "VOCdevkit/VOC2012"
    part.members[f"{root}/ImageSets/Segmentation/val.txt"] += f"{hostile}\n".encode()
    if with_members:
        src = "2007_000032"
        part.members[f"{root}/JPEGImages/{hostile}.jpg"] = part.members[f"{root}/JPEGImages/{src}.jpg"]
        part.members[f"{root}/SegmentationClass/{hostile}.png"] = part.members[f"{root}/SegmentationClass/{src}.png"]
    return sample


def _as_zip(sample: RawSample, raw: Path) -> Path:
    """The VOC members in a zip instead of the tar (zipfile keeps ``..`` and absolute-looking names)."""
    raw.mkdir(parents=True)
    with zipfile.ZipFile(raw / "VOCtrainval_11-May-2012.zip", "w") as zf:
        for name, data in sample.parts[0].members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return raw


@pytest.mark.parametrize("container", ["tar", "zip"])
@pytest.mark.parametrize("hostile", ["../../ESCAPED", "JPEGImages/../../X", "/tmp/s2clip-ABSOLUTE", ".hidden",
                                     "a\tb", "2007_000032/../../../ESCAPED2"])
def test_ids_that_are_not_plain_stems_are_refused(tmp_path: Path, container: str, hostile: str) -> None:
    sample = _voc_with_id(hostile)
    raw = tmp_path / "raw"
    if container == "tar":
        pack(sample, raw, archives=True)
    else:
        _as_zip(sample, raw)
    out = tmp_path / "out"
    with pytest.raises(S2ClipError) as err:
        prepare("voc21", raw, out, workers=0)
    message = str(err.value)
    assert "val.txt" in message and repr(hostile) in message and "not a plain file name" in message
    assert "\n" not in message
    assert not list(tmp_path.rglob("ESCAPED*")) and not Path("/tmp/s2clip-ABSOLUTE.jpg").exists()
    assert not out.exists() or not list(out.rglob("*.jpg"))  # refused before anything was written


def test_traversal_through_the_cli_writes_nothing_outside(tmp_path: Path) -> None:
    raw = pack(_voc_with_id("../../ESCAPED"), tmp_path / "raw", archives=True)
    prepare_cli(tmp_path, "voc21", raw, "val.txt", "'../../ESCAPED'", "not a plain file name")
    assert not list(tmp_path.rglob("ESCAPED*"))


@pytest.mark.parametrize("name", ["context60", "cityscapes", "ade20k"])
def test_every_preparer_refuses_traversing_ids(tmp_path: Path, name: str) -> None:
    if name == "context60":  # a file_name in the JSON
        sample = context_sample()
        part, member = sample.member("trainval_merged.json")
        doc = json.loads(part.members[member])
        doc["images"][0]["file_name"] = "../../ESCAPED.jpg"
        part.members[member] = json.dumps(doc).encode()
        needles = ("trainval_merged.json", "'../../ESCAPED.jpg'")
    elif name == "cityscapes":  # a city folder named '..' inside the zip
        sample = cityscapes_sample()
        left, gt = sample.parts
        left.members["leftImg8bit/val/../x_leftImg8bit.png"] = left.members[
            "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit.png"]
        gt.members["gtFine/val/../x_gtFine_polygons.json"] = gt.members[
            "gtFine/val/lindau/lindau_000000_000019_gtFine_polygons.json"]
        needles = ("x_leftImg8bit.png", "'..'")
    else:  # a hidden stem: '..jpg' and '..png'
        sample = ade20k_sample()
        part = sample.parts[0]
        top = "ADEChallengeData2016"
        part.members[f"{top}/images/validation/..jpg"] = part.members[f"{top}/images/validation/ADE_val_00000001.jpg"]
        part.members[f"{top}/annotations/validation/..png"] = part.members[
            f"{top}/annotations/validation/ADE_val_00000001.png"]
        needles = ("..jpg", "'.'")
    raw = pack(sample, tmp_path / "raw", archives=True)
    with pytest.raises(S2ClipError) as err:
        prepare(name, raw, tmp_path / "out", workers=0)
    for needle in (*needles, "not a plain file name"):
        assert needle in str(err.value), str(err.value)


def test_writer_refuses_paths_outside_the_output_root(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    assert output_path(root, "JPEGImages/a.jpg") == root / "JPEGImages/a.jpg"
    for rel in ("../x.png", "a/../../x.png", "/etc/x.png", "a//b.png", "./a.png", "", "a\\..\\b"):
        with pytest.raises(S2ClipError, match="outside the output folder|not a plain relative path"):
            output_path(root, rel)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "JPEGImages").symlink_to(outside)  # a folder of the output that leads out of it
    with pytest.raises(S2ClipError, match="outside the output folder"):
        output_path(root, "JPEGImages/a.jpg")


# ------------------------------------------------------------------------------ 2. not regular files
def test_fifo_label_in_an_extracted_folder_is_refused_without_hanging(tmp_path: Path) -> None:
    raw = pack(ade20k_sample(), tmp_path / "raw", archives=False)
    label = raw / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png"
    label.unlink()
    os.mkfifo(label)
    prepare_cli(tmp_path, "ade20k", raw, str(label), "FIFO", "not a regular file")


def test_fifo_val_list_and_fifo_archive_do_not_hang(tmp_path: Path) -> None:
    raw = pack(voc_sample(), tmp_path / "raw", archives=False)
    split = raw / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt"
    split.unlink()
    os.mkfifo(split)
    os.mkfifo(raw / "ADEChallengeData2016.zip")  # an archive name that is a FIFO: never opened
    prepare_cli(tmp_path, "voc21", raw, str(split), "FIFO")


def test_fifo_named_like_an_archive_is_skipped_with_a_warning(tmp_path: Path) -> None:
    raw = pack(ade20k_sample(), tmp_path / "raw", archives=True)
    os.mkfifo(raw / "VOCtrainval_11-May-2012.tar")
    with deadline():
        summary = prepare("ade20k", raw, tmp_path / "out", workers=0)
    assert summary.samples == 2
    assert any("VOCtrainval_11-May-2012.tar" in w and "FIFO" in w for w in summary.warnings)


def test_label_linked_to_dev_zero_is_refused(tmp_path: Path) -> None:
    raw = pack(ade20k_sample(), tmp_path / "raw", archives=False)
    label = raw / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png"
    label.unlink()
    label.symlink_to("/dev/zero")
    prepare_cli(tmp_path, "ade20k", raw, str(label), "/dev/zero")


def test_links_out_of_the_raw_folder_are_refused_and_links_inside_are_followed(tmp_path: Path) -> None:
    sample = ade20k_sample()
    raw = pack(sample, tmp_path / "raw", archives=False)
    label = raw / "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png"
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "stolen.png").write_bytes(label.read_bytes())
    label.unlink()
    label.symlink_to(outside / "stolen.png")
    line = prepare_cli(tmp_path, "ade20k", raw, str(label), "outside", str(raw))
    assert "stolen" in line
    # a link that stays inside the raw folder is an ordinary input
    (raw / "spare").mkdir()
    (raw / "spare/copy.png").write_bytes((outside / "stolen.png").read_bytes())
    label.unlink()
    label.symlink_to(raw / "spare/copy.png")
    assert prepare("ade20k", raw, tmp_path / "out2", workers=0).samples == 2


def test_a_linked_folder_out_of_the_raw_folder_is_not_searched(tmp_path: Path) -> None:
    pack(ade20k_sample(), tmp_path / "elsewhere", archives=False)
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ADEChallengeData2016").symlink_to(tmp_path / "elsewhere/ADEChallengeData2016")
    with pytest.raises(S2ClipError) as err:
        prepare("ade20k", raw, tmp_path / "out", workers=0)
    assert "ADEChallengeData2016" in str(err.value) and "outside" in str(err.value)


# ------------------------------------------------------------------------------ bombs and lying sizes
BOMB_BYTES = 256_000_000  # declared (and real) size of the zero member: ~0.25 MB compressed


def _write_zero_member(zf: zipfile.ZipFile, name: str, size: int) -> None:
    chunk = bytes(1 << 20)
    info = zipfile.ZipInfo(name)
    info.compress_type = zipfile.ZIP_DEFLATED
    with zf.open(info, "w", force_zip64=True) as dst:
        left = size
        while left:
            dst.write(chunk[: min(left, len(chunk))])
            left -= min(left, len(chunk))


def test_zip_bomb_member_is_refused_before_it_is_inflated(tmp_path: Path) -> None:
    sample = ade20k_sample()
    member = "ADEChallengeData2016/annotations/validation/ADE_val_00000002.png"
    raw = tmp_path / "raw"
    raw.mkdir()
    with zipfile.ZipFile(raw / "ADEChallengeData2016.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in sample.parts[0].members.items():
            if name != member:
                zf.writestr(name, data)
        _write_zero_member(zf, member, BOMB_BYTES)
    assert (raw / "ADEChallengeData2016.zip").stat().st_size < 2_000_000
    out = tmp_path / "out"
    run = run_cli("data", "prepare", "ade20k", "--from", raw, "-o", out, "-j", "0")
    one_error_line(run, "ADEChallengeData2016.zip:" + member, str(BOMB_BYTES), "bytes")
    assert run.peak_rss < BOMB_BYTES // 2, run.peak_rss  # the member was never inflated


def test_tar_gz_bomb_member_is_refused_before_it_is_spilled(tmp_path: Path) -> None:
    sample = voc_sample()
    raw = tmp_path / "raw"
    raw.mkdir()
    member = "VOCdevkit/VOC2012/SegmentationClass/2007_000033.png"
    with tarfile.open(raw / "VOCtrainval_11-May-2012.tar.gz", "w:gz", compresslevel=1) as tf:
        for name, data in sample.parts[0].members.items():
            info = tarfile.TarInfo(name)
            if name == member:
                info.size = BOMB_BYTES

                class Zeros(io.RawIOBase):
                    left = BOMB_BYTES

                    def readable(self) -> bool:
                        return True

                    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
                        n = min(len(buf), self.left)
                        buf[:n] = bytes(n)
                        self.left -= n
                        return n

                tf.addfile(info, io.BufferedReader(Zeros(), 1 << 20))
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    run = run_cli("data", "prepare", "voc21", "--from", raw, "-o", out, "-j", "0")
    one_error_line(run, member, str(BOMB_BYTES))
    assert run.peak_rss < BOMB_BYTES // 2
    spill = list(out.rglob("*2007_000033*")) if out.exists() else []
    assert spill == []  # not copied to disk either


def test_polygons_declaring_a_huge_canvas_are_refused_before_allocating(tmp_path: Path) -> None:
    sample = cityscapes_sample()
    gt = sample.parts[1]
    lying = json.dumps({"imgHeight": 30000, "imgWidth": 30000, "objects": []}).encode()
    assert len(lying) < 100
    gt.members["gtFine/val/munster/munster_000000_000019_gtFine_polygons.json"] = lying
    raw = pack(sample, tmp_path / "raw", archives=True)
    out = tmp_path / "out"
    run = run_cli("data", "prepare", "cityscapes", "--from", raw, "-o", out, "-j", "0")
    one_error_line(run, "munster_000000_000019_gtFine_polygons.json", "30000x30000",
                   "munster_000000_000019_leftImg8bit.png", "10x6")
    assert run.peak_rss < 400_000_000  # the 900 MB canvas was never made


def _png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` (the data is a 1x1 image's)."""
    data = bytearray(png(np.zeros((1, 1), np.uint8)))
    ihdr = 8 + 8  # signature, chunk length + type
    data[ihdr:ihdr + 8] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    crc = zlib.crc32(bytes(data[12:ihdr + 13]))
    data[ihdr + 13:ihdr + 17] = crc.to_bytes(4, "big")
    return bytes(data)


@pytest.mark.parametrize("side", [7000, 12000], ids=["over-ours", "over-pillows"])
def test_image_header_declaring_a_huge_size_is_refused(tmp_path: Path, side: int) -> None:
    """A Context image whose header claims side x side (7000: over our limit, under Pillow's; 12000:
    over Pillow's warning limit) with a JSON agreeing: the canvas it would need is never allocated."""
    sample = context_sample()
    part, member = sample.member("trainval_merged.json")
    doc = json.loads(part.members[member])
    for img in doc["images"]:
        if img["file_name"] == "2008_000003.jpg":
            img["height"] = img["width"] = side
    part.members[member] = json.dumps(doc).encode()
    images, name = sample.member("JPEGImages/2008_000003.jpg")
    images.members[name] = _png_declaring(side, side)
    raw = pack(sample, tmp_path / "raw", archives=True)
    out = tmp_path / "out"
    run = run_cli("data", "prepare", "context60", "--from", raw, "-o", out, "-j", "0")
    one_error_line(run, "2008_000003.jpg", "pixels", "refusing it")
    assert run.peak_rss < 300_000_000  # an int16 canvas alone would be 98 / 288 MB, the old int64 one 4x


@pytest.mark.parametrize("counts", ["o" * 200_000, "1" * 200_000, [10**30, 1], list(range(50_000)), [-3, 23]],
                         ids=["endless-count", "too-many-runs", "overflow", "too-many-listed-runs", "negative"])
def test_hostile_rle_counts_fail_fast_with_the_annotation_named(tmp_path: Path, counts: object) -> None:
    extra = [{"id": 99, "image_id": 2008000003, "category_id": 360, "iscrowd": 0,
              "segmentation": {"size": [4, 5], "counts": counts}}]
    raw = pack(context_sample(extra), tmp_path / "raw", archives=False)
    started = time.monotonic()
    with pytest.raises(S2ClipError) as err:
        prepare("context60", raw, tmp_path / "out", workers=0)
    assert time.monotonic() - started < 60
    assert "annotation 99" in str(err.value) and "RLE" in str(err.value), str(err.value)


def test_category_far_outside_the_table_is_named(tmp_path: Path) -> None:
    extra = [{"id": 98, "image_id": 2008000003, "category_id": 10**12, "iscrowd": 0,
              "segmentation": {"size": [4, 5], "counts": "0d0"}}]
    raw = pack(context_sample(extra), tmp_path / "raw", archives=False)
    with pytest.raises(S2ClipError, match=r"raw value 1000000000000 cannot occur"):
        prepare("context60", raw, tmp_path / "out", workers=0)


def test_deeply_nested_json_is_one_line(tmp_path: Path) -> None:
    sample = context_sample()
    part, member = sample.member("trainval_merged.json")
    part.members[member] = b"[" * 200_000 + b"]" * 200_000
    raw = pack(sample, tmp_path / "raw", archives=False)
    with pytest.raises(S2ClipError, match="cannot parse .*trainval_merged.json"):
        prepare("context60", raw, tmp_path / "out", workers=0)


def test_label_declaring_many_pixels_in_another_mode_is_not_decoded(tmp_path: Path) -> None:
    sample = ade20k_sample()
    part, member = sample.member("validation/ADE_val_00000002.png")
    rgba = bytearray(_png_declaring(5000, 5000))
    rgba[16 + 9] = 6  # colour type RGBA: 100 MB if decoded
    rgba[16 + 13:16 + 17] = zlib.crc32(bytes(rgba[12:16 + 13])).to_bytes(4, "big")
    part.members[member] = bytes(rgba)
    raw = pack(sample, tmp_path / "raw", archives=True)
    with pytest.raises(S2ClipError) as err:
        prepare("ade20k", raw, tmp_path / "out", workers=0)
    assert "ADE_val_00000002.png" in str(err.value) and "RGBA" in str(err.value)


# ------------------------------------------------------------------------------ 8. truncated tar
@pytest.mark.parametrize("cut", ["inside-data", "at-a-header", "gz"])
def test_truncated_tar_says_truncated_and_names_the_archive(tmp_path: Path, cut: str) -> None:
    sample = voc_sample()
    raw = pack(sample, tmp_path / "raw", archives=True, gz=cut == "gz")
    tar_path = next(raw.glob("VOCtrainval_11-May-2012.tar*"))
    data = tar_path.read_bytes()
    if cut == "at-a-header":  # end exactly before the header of the 2007_000042 image
        with tarfile.open(tar_path) as tf:
            offset = next(m.offset for m in tf.getmembers() if m.name.endswith("JPEGImages/2007_000042.jpg"))
        tar_path.write_bytes(data[:offset])
    else:  # cut inside the data of a val image
        with tarfile.open(tar_path) as tf:
            member = next(m for m in tf.getmembers() if m.name.endswith("JPEGImages/2007_000042.jpg"))
        if cut == "gz":
            tar_path.write_bytes(data[: len(data) // 2])
        else:
            tar_path.write_bytes(data[: member.offset_data + 100])
    out = tmp_path / "out"
    run = run_cli("data", "prepare", "voc21", "--from", raw, "-o", out, "-j", "0")
    line = one_error_line(run, str(tar_path), "truncated")
    assert "download it again" in line


def test_truncated_archive_that_still_holds_every_sample_warns(tmp_path: Path) -> None:
    sample = ade20k_sample()
    part = sample.parts[0]
    part.archive = "ADEChallengeData2016.tar"
    raw = pack(sample, tmp_path / "raw", archives=True)
    tar_path = raw / "ADEChallengeData2016.tar"
    with tarfile.open(tar_path) as tf:  # cut inside the last member (a training image)
        last = tf.getmembers()[-1]
    tar_path.write_bytes(tar_path.read_bytes()[: last.offset_data + 10])
    summary = prepare("ade20k", raw, tmp_path / "out", workers=0)
    assert summary.samples == 2
    assert any(str(tar_path) in w and "truncated" in w for w in summary.warnings), summary.warnings


# ------------------------------------------------------------------------------ data check
def test_data_check_reports_fifos_and_device_links_without_hanging(tmp_path: Path) -> None:
    raw = pack(ade20k_sample(), tmp_path / "raw", archives=True)
    out = tmp_path / "out"
    prepare("ade20k", raw, out, workers=0)
    fifo = out / "annotations/validation/ADE_val_00000001.png"
    fifo.unlink()
    os.mkfifo(fifo)
    zero = out / "annotations/validation/ADE_val_00000002.png"
    zero.unlink()
    zero.symlink_to("/dev/zero")
    run = run_cli("data", "check", "ade20k", "--data-root", out)
    assert run.code == 1 and "Traceback" not in run.stdout + run.stderr
    text = run.stdout + run.stderr
    assert "ADE_val_00000001.png" in text and "ADE_val_00000002.png" in text
    assert run.peak_rss < GIB
    from s2clip_cli.data.check import _read_image  # the reader itself, whatever the layout check lets through

    with deadline():
        for path, kind in ((fifo, r"a FIFO \(named pipe\)"), (zero, "a character device")):
            with pytest.raises(S2ClipError, match=f"{path}: it is {kind}, not a regular file"):
                _read_image(path, header_only=False)


def test_class_name_file_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    from s2clip_cli.data.class_names import read_class_file

    fifo = tmp_path / "classes.txt"
    os.mkfifo(fifo)
    with deadline(), pytest.raises(S2ClipError, match=f"{fifo}.*not a regular file"):
        read_class_file(fifo)
    with deadline(), pytest.raises(S2ClipError, match="/dev/zero.*not a regular file"):
        read_class_file("/dev/zero")


def test_honest_samples_still_prepare_from_every_kind_of_source(tmp_path: Path) -> None:
    """The guards cost nothing to honest downloads: every preset from archives, one via the CLI."""
    for name, build in SAMPLES.items():
        raw = pack(build(), tmp_path / name / "raw", archives=True)
        assert prepare(name, raw, tmp_path / name / "out", workers=0).samples == len(
            {k.rsplit("_", 1)[0] if "coco" in name else k for k in build().labels})
    run = run_cli("data", "prepare", "ade20k", "--from", tmp_path / "ade20k/raw", "-o", tmp_path / "cli", "-j", "0")
    assert run.code == 0, run.stdout + run.stderr
    assert run.peak_rss < GIB



# ------------------------------------------------------------------------------ the output folder itself
def test_planted_links_and_fifos_in_the_output_folder_are_not_followed(tmp_path: Path) -> None:
    """Preparing in place (`-o` = `--from`, a raw folder extracted from someone's archive): a lock
    file planted as a link is refused (it is opened for writing); a FIFO manifest is not read."""
    raw = pack(ade20k_sample(), tmp_path / "raw", archives=False)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (raw / ".s2clip-data.lock").symlink_to(victim)
    with deadline(), pytest.raises(S2ClipError, match=r"\.s2clip-data\.lock: it is a symbolic link"):
        prepare("ade20k", raw, raw, workers=0)
    assert victim.read_text() == "precious\n"
    (raw / ".s2clip-data.lock").unlink()
    os.mkfifo(raw / "s2clip-data.json")  # where the manifest goes: not read, replaced
    with deadline():
        summary = prepare("ade20k", raw, raw, workers=0)
    assert summary.samples == 2 and (raw / "s2clip-data.json").is_file()


def test_label_in_a_format_with_an_external_decoder_is_not_decoded(tmp_path: Path) -> None:
    """A label that is really EPS (Pillow would hand it to Ghostscript to decode): only PNG labels
    are opened."""
    from PIL import Image

    sample = ade20k_sample()
    part, member = sample.member("validation/ADE_val_00000002.png")
    buf = io.BytesIO()
    Image.fromarray(np.zeros((5, 7), np.uint8)).save(buf, format="EPS")
    part.members[member] = buf.getvalue()
    raw = pack(sample, tmp_path / "raw", archives=True)
    with pytest.raises(S2ClipError) as err:
        prepare("ade20k", raw, tmp_path / "out", workers=0)
    assert "ADE_val_00000002.png" in str(err.value) and "cannot identify image file" in str(err.value)
