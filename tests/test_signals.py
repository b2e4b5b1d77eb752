"""Ctrl-C and SIGTERM stop every command (but `serve`, tested with it) within 2 s: exit 130 / 143,
`error: interrupted` (with where the command stopped), no traceback, no partial output, nothing of the
process group left, and a rerun resumes. Each command runs as a real process in its own session with
SIGINT at its default (`signal_helpers`); the signal goes to the whole group, as a terminal sends it,
once the command has visibly started its work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from signal_helpers import ENV, SlowFile, alive, assert_clean_interruption, children_of, download_code, start

from s2clip_cli.cli.interrupts import FORCE_EXIT_S, REACT_S

TINY = ["--models", "tiny", "--device", "cpu"]

# ------------------------------------------------------------------------------ the mechanism itself
# A stand-in command (no torch: quick): the real handlers, `user_errors`, and a clean-up that takes
# `argv[2]` seconds and then leaves a mark.
_COMMAND = textwrap.dedent("""
    import sys, time, pathlib
    import typer
    from s2clip_cli.cli import interrupts
    from s2clip_cli.cli.common import user_errors

    mark = pathlib.Path(sys.argv[1])

    @user_errors
    def work(cleanup_s):
        try:
            print("working", flush=True)
            time.sleep(120)
        finally:
            time.sleep(cleanup_s)
            mark.write_text("cleaned")

    interrupts.install()
    try:
        work(float(sys.argv[2]))
    except typer.Exit as exc:
        interrupts.exit_now(exc.exit_code)
        sys.exit(exc.exit_code)
""")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_take_one_path(tmp_path: Path, sig: int, code: int) -> None:
    run = start([str(tmp_path / "mark"), "0.2"], python_code=_COMMAND)
    run.wait_for_output("working")
    status, seconds = run.signal_group(sig)
    assert_clean_interruption(run, status, seconds, code)
    assert (tmp_path / "mark").read_text() == "cleaned"  # the clean-up ran


def test_a_second_signal_does_not_break_the_clean_up(tmp_path: Path) -> None:
    run = start([str(tmp_path / "mark"), "1.0"], python_code=_COMMAND)
    run.wait_for_output("working")
    threading.Timer(0.3, lambda: os.killpg(run.proc.pid, signal.SIGINT)).start()  # a second Ctrl-C...
    threading.Timer(0.5, lambda: os.killpg(run.proc.pid, signal.SIGTERM)).start()  # ...and a SIGTERM
    status, seconds = run.signal_group(signal.SIGINT)
    assert_clean_interruption(run, status, seconds, 130, limit_s=3.0)
    assert (tmp_path / "mark").read_text() == "cleaned"
    assert run.output.count("error: interrupted") == 1


def test_a_clean_up_that_hangs_is_cut_short(tmp_path: Path) -> None:
    run = start([str(tmp_path / "mark"), "600"], python_code=_COMMAND)
    run.wait_for_output("working")
    status, seconds = run.signal_group(signal.SIGTERM)
    assert status == 143 and FORCE_EXIT_S - 0.5 < seconds < FORCE_EXIT_S + 3
    assert "clean-up was still running" in run.output and "Traceback" not in run.output


_BUSY_IN_C = textwrap.dedent("""
    import ctypes, os, signal
    from s2clip_cli.cli import interrupts
    interrupts.install()
    signal.siginterrupt(signal.SIGINT, False)  # the read below restarts after the signal: it stays in C
    r, w = os.pipe()
    print("computing", flush=True)
    ctypes.CDLL(None).read(r, ctypes.create_string_buffer(1), 1)  # as one long matrix product would
    print("never", flush=True)
""")


def test_a_main_thread_busy_in_c_is_stopped_within_the_reaction_time() -> None:
    run = start([], python_code=_BUSY_IN_C)
    run.wait_for_output("computing")
    status, seconds = run.signal_group(signal.SIGINT)
    assert status == 130 and seconds < REACT_S + 1.0, (status, seconds, run.output)
    assert "busy in one computation" in run.output and "never" not in run.output


_FINISHED_THEN_TEARDOWN = textwrap.dedent("""
    import atexit, sys, time
    atexit.register(lambda: (print("tearing down", flush=True), time.sleep(60)))  # a slow library finalizer
    from s2clip_cli.cli import main
    sys.argv = ["s2clip", "models", "list"]
    main()
""")


def test_a_signal_during_the_teardown_after_the_command_ends_is_one_line() -> None:
    """A command that has finished (exit 0) and is in the interpreter's teardown: a SIGTERM (a rank's
    watchdog, a supervisor) ends it at once in one line, not a traceback from inside a finalizer."""
    run = start([], python_code=_FINISHED_THEN_TEARDOWN)
    run.wait_for_output("tearing down")
    status, seconds = run.signal_group(signal.SIGTERM)
    assert status == 143 and seconds < 2.0, (status, seconds, run.output[-2000:])
    assert "Traceback" not in run.output and "error: interrupted after the command had finished" in run.output


def test_sigint_ignored_at_start_stays_ignored(tmp_path: Path) -> None:
    """`nohup` or a background job of a script: Ctrl-C was not meant for it; SIGTERM still stops it."""
    proc = subprocess.Popen([sys.executable, "-c", _COMMAND, str(tmp_path / "mark"), "0"], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.stdout is not None and proc.stdout.readline().strip() == "working"
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(1.0)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(10) == 143


def test_install_and_uninstall_put_back_what_was_there() -> None:
    """What `serve` relies on to run its own shutdown, then hand back."""
    from s2clip_cli.cli import interrupts

    before = interrupts.installed_handlers()
    try:
        interrupts.install()
        assert all(h is interrupts._on_signal for h in interrupts.installed_handlers().values())
        interrupts.uninstall()
        assert interrupts.installed_handlers() == before
    finally:
        interrupts.restore(before)


_OWN_HANDLER = textwrap.dedent("""
    import signal, sys, time
    from s2clip_cli.cli import interrupts
    interrupts.install()
    stopping = []
    signal.signal(signal.SIGTERM, lambda signum, frame: stopping.append(signum))  # as `serve` does
    print("serving", flush=True)
    while not stopping:
        time.sleep(0.05)
    time.sleep(REACT + 1.0)  # a graceful shutdown longer than the watcher's bound
    print("shut down", flush=True)
""")


def test_a_signal_another_handler_took_is_not_cut_short() -> None:
    run = start([], python_code=f"REACT = {REACT_S}\n" + _OWN_HANDLER)
    run.wait_for_output("serving")
    status, seconds = run.signal_group(signal.SIGTERM)
    assert status == 0 and seconds > REACT_S + 1.0 and "shut down" in run.output, (status, seconds, run.output)


# ------------------------------------------------------------------------------ decode workers
def _slow_reader(path: Path) -> np.ndarray:
    if not path.name.startswith("2008_000000"):
        time.sleep(30)  # a decode still under way when the run stops
    return np.asarray(Image.open(path).convert("RGB"))


def test_decode_workers_stop_at_once_after_an_interruption(tmp_path: Path) -> None:
    from s2clip_cli.data.datasets import open_dataset
    from s2clip_cli.data.synthetic import write_synthetic_dataset
    from s2clip_cli.evaluation.decode import decode_loader, decoding

    ds = open_dataset("voc21", write_synthetic_dataset("voc21", tmp_path / "voc", n_images=6))
    loader = decode_loader(ds, list(range(6)), _slow_reader, num_workers=2)
    t0 = None
    workers: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        with decoding(loader) as items:
            first = next(items)
            assert first.error is None and first.image is not None
            workers = [w.pid for w in items._workers]
            assert len(alive(workers)) == 2
            t0 = time.monotonic()
            raise KeyboardInterrupt
    assert t0 is not None and time.monotonic() - t0 < 2.0  # torch alone waits 5 s per busy worker
    assert alive(workers) == []


# ------------------------------------------------------------------------------ commands
def test_models_download_stops_and_leaves_no_partial_file(tmp_path: Path) -> None:
    weights = tmp_path / "weights"
    env = {**ENV, "S2CLIP_WEIGHTS_DIR": str(weights)}
    env.pop("S2CLIP_OFFLINE", None)
    env.pop("HF_HUB_OFFLINE", None)
    with SlowFile() as server:
        run = start(["models", "download", "vit_b"], python_code=download_code(server.url), env=env)
        run.wait_until(lambda: weights.is_dir() and any(weights.iterdir()))  # the download's temporary file
        time.sleep(0.5)
        status, seconds = run.signal_group(signal.SIGINT)
    assert_clean_interruption(run, status, seconds, 130)
    assert list(weights.iterdir()) == []


def _voc_raw(raw: Path, n: int) -> None:
    from raw_samples import jpeg, png

    voc = raw / "VOCdevkit" / "VOC2012"
    for sub in ("ImageSets/Segmentation", "JPEGImages", "SegmentationClass"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"2007_{i:06d}" for i in range(n)]
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    for k, sid in enumerate(ids):
        (voc / f"JPEGImages/{sid}.jpg").write_bytes(jpeg(200, 150, k))
        (voc / f"SegmentationClass/{sid}.png").write_bytes(
            png(rng.choice(np.array([0, 3, 7, 20, 255], np.uint8), size=(150, 200)), palette=True))


def _hidden_temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp-" in p.name]


def test_data_prepare_stops_keeps_what_is_done_and_resumes(tmp_path: Path) -> None:
    _voc_raw(tmp_path / "raw", 400)
    out = tmp_path / "out"
    args = ["data", "prepare", "voc21", "--from", str(tmp_path / "raw"), "-o", str(out), "--workers", "2"]
    run = start(args)
    run.wait_until(lambda: (out / "SegmentationClass").is_dir() and any((out / "SegmentationClass").iterdir()))
    status, seconds = run.signal_group(signal.SIGINT)
    assert_clean_interruption(run, status, seconds, 130)
    assert "samples are done" in run.output and "rerun the same command" in run.output
    assert not (out / "s2clip-data.json").exists()  # no manifest: not a prepared folder yet
    assert _hidden_temporaries(out) == []
    again = subprocess.run([sys.executable, "-m", "s2clip_cli", *args], env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    printed = again.stdout + again.stderr
    done = int(printed.split(" written, ")[1].split(" already done")[0])
    assert done > 0  # resumed, not redone


def _images(folder: Path, n: int, size: tuple[int, int] = (64, 80)) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"im{i:02d}.png")
    return folder


def test_segment_folder_stops_between_complete_sets_and_resumes(tmp_path: Path) -> None:
    images = _images(tmp_path / "in", 6)
    out = tmp_path / "out"
    args = ["segment", str(images), "--classes", "cat,dog", "-o", str(out), "--short-side", "224", *TINY]
    run = start(args)
    run.wait_for_output("→")  # one image written
    status, seconds = run.signal_group(signal.SIGINT)
    assert_clean_interruption(run, status, seconds, 130)
    assert "rerun the same command to continue" in run.output
    records = sorted(p.stem for p in out.glob("*.json"))
    assert records  # what finished is kept, each a complete set...
    for stem in records:
        assert (out / f"{stem}_mask.png").is_file() and (out / f"{stem}_overlay.png").is_file()
    masks = sorted(p.name.removesuffix("_mask.png") for p in out.glob("*_mask.png"))
    assert masks == records  # ...and nothing of an unfinished one
    assert _hidden_temporaries(out) == []
    again = subprocess.run([sys.executable, "-m", "s2clip_cli", *args], env=ENV, capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"done {6 - len(records)}, skipped {len(records)}" in again.stderr


def test_segment_video_stops_on_sigterm_without_a_partial_set(tmp_path: Path) -> None:
    import cv2

    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (80, 64))
    rng = np.random.default_rng(2)
    for _ in range(60):
        writer.write(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    writer.release()
    out = tmp_path / "out"
    run = start(["segment", str(video), "--classes", "cat,dog", "-o", str(out), "--no-sam", "--short-side", "224",
                 *TINY])
    run.wait_until(lambda: any(p.is_dir() and any(p.iterdir()) for p in out.glob(".clip_frames.tmp-*")))
    status, seconds = run.signal_group(signal.SIGTERM)
    assert_clean_interruption(run, status, seconds, 143)
    assert sorted(out.iterdir()) == []  # no frames folder, no video, no record, no temporary


def _eval_args(data: Path, work: Path) -> list[str]:
    return ["eval", "--dataset", "voc21", "--data-root", str(data), "--work-dir", str(work), "--no-sam",
            "--short-side", "112", "--num-workers", "2", *TINY]


def _records(work: Path, rank: int = 0) -> int:
    path = work / "records" / f"rank-{rank:05d}.jsonl"
    return max(0, path.read_text().count("\n") - 1) if path.exists() else 0


def test_eval_stops_at_once_and_resumes(tmp_path: Path) -> None:
    from s2clip_cli.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset("voc21", tmp_path / "voc", n_images=8)
    work = tmp_path / "run"
    run = start(_eval_args(data, work))
    run.wait_until(lambda: _records(work) >= 1)
    workers = children_of(run.proc.pid)
    threading.Timer(0.05, lambda: os.killpg(run.proc.pid, signal.SIGINT)).start()  # Ctrl-C pressed twice
    status, seconds = run.signal_group(signal.SIGINT)
    assert_clean_interruption(run, status, seconds, 130)
    assert "images are recorded in" in run.output and "rerun the same command to resume" in run.output
    assert alive(workers) == []
    assert not (work / "results.json").exists()
    again = subprocess.run([sys.executable, "-m", "s2clip_cli", *_eval_args(data, work)], env=ENV,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]
    results = json.loads((work / "results.json").read_text())
    assert results["num_images"] == 8 and results["timings"]["images_resumed"] >= 1


def test_eval_under_torchrun_stops_every_rank_at_once(tmp_path: Path) -> None:
    from s2clip_cli.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset("voc21", tmp_path / "voc", n_images=12)
    work = tmp_path / "run"
    run = start(["--standalone", "--nproc-per-node", "2", "-m", "s2clip_cli", *_eval_args(data, work)],
                python_code="import sys; from torch.distributed.run import main; sys.argv[0] = 'torchrun'; main()")
    run.wait_until(lambda: _records(work, 0) >= 1 and _records(work, 1) >= 1, timeout=600)
    ranks = children_of(run.proc.pid)
    assert len(ranks) == 2
    t0 = time.monotonic()
    os.killpg(run.proc.pid, signal.SIGINT)
    while alive(ranks) and time.monotonic() - t0 < 30:
        time.sleep(0.02)
    ranks_s = time.monotonic() - t0
    run.proc.wait(60)
    assert ranks_s < 2.0, f"the ranks took {ranks_s:.2f} s to stop:\n{run.output[-3000:]}"
    assert run.output.count("error: interrupted; rank ") == 2  # each rank: where it stopped
    assert "rerun the same command to resume" in run.output
    assert not (work / "results.json").exists()
    again = subprocess.run([sys.executable, "-m", "s2clip_cli", *_eval_args(data, work)], env=ENV,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-2000:]  # one process resumes what two ranks recorded
    assert json.loads((work / "results.json").read_text())["timings"]["images_resumed"] >= 2


def _started_then(run, delay: float) -> None:  # noqa: ANN001
    run.wait_for_output("randomly initialised")
    time.sleep(delay)


def test_bench_sam_stops(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    run = start(["bench-sam", "--synthetic", "3", "--json", str(out), *TINY])
    _started_then(run, 3.0)
    status, seconds = run.signal_group(signal.SIGINT)
    assert_clean_interruption(run, status, seconds, 130)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("command", "sig", "code"), [
    (["entropy", "--images", "{images}"], signal.SIGTERM, 143),
    (["ap", "--dataset", "voc21", "--data-root", "{voc}"], signal.SIGINT, 130),
    (["visualize", "{images}"], signal.SIGINT, 130),
])
def test_analyses_stop_without_writing_anything(tmp_path: Path, command: list[str], sig: int, code: int) -> None:
    from s2clip_cli.data.synthetic import write_synthetic_dataset

    images = _images(tmp_path / "in", 200)  # far more than can be done before the signal
    voc = write_synthetic_dataset("voc21", tmp_path / "voc", n_images=200) if "ap" in command else None
    out = tmp_path / "out"
    args = [part.format(images=images, voc=voc) for part in command]
    if "visualize" in command:
        args = ["visualize", *(str(p) for p in sorted(images.iterdir()))]
    run = start([*args, "-o", str(out), *TINY])
    _started_then(run, 3.0)
    status, seconds = run.signal_group(sig)
    assert_clean_interruption(run, status, seconds, code)
    assert "wrote" not in run.output  # (stopped while working)
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []
    if "visualize" in command:  # a complete figure per image done, no record of the run
        assert all(name.endswith("_features.png") for name in written), written
    else:  # entropy and ap write their results at the end
        assert written == []
    assert _hidden_temporaries(tmp_path) == []
