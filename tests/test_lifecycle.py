"""Children die with their parent, locks die with their holder: worker processes end when the main
process is killed (SIGKILL included), a forked child never holds the main process's lock, a lock whose
recorded holder is dead does not refuse a resume — and a killed `eval` or `data prepare` resumes to
the same result as an uninterrupted run."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from signal_helpers import ENV, alive, children_of, group_pids, start, wait_gone

from s2clip_cli.errors import S2ClipError
from s2clip_cli.io.files import exclusive_lock


def _busy(pid: str) -> str:
    return f"in use by pid {pid}"


def _fds_to(pid: int, path: Path) -> list[str]:
    """The descriptors of process ``pid`` open on ``path``."""
    target = os.stat(path)
    found = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            st = os.stat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            found.append(fd.name)
    return found


def _sleep_forever() -> None:
    time.sleep(60)


def _flock_free(path: Path) -> bool:
    """Whether another process could take the lock on ``path`` now."""
    code = ("import fcntl, os, sys\n"
            "fd = os.open(sys.argv[1], os.O_RDWR)\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(1)\n")
    return subprocess.run([sys.executable, "-c", code, str(path)], timeout=60).returncode == 0


def test_a_child_forked_under_the_lock_does_not_hold_it(tmp_path: Path) -> None:
    lock = tmp_path / "work" / ".lock"
    child = None
    try:
        with exclusive_lock(lock, _busy):
            child = multiprocessing.get_context("fork").Process(target=_sleep_forever, daemon=True)
            child.start()
            assert _fds_to(os.getpid(), lock)  # the holder has it open...
            assert not _flock_free(lock)
        assert child.is_alive()
        assert _fds_to(child.pid, lock) == []  # ...its child does not
        assert _flock_free(lock)  # released with its holder, while the child lives on
    finally:
        if child is not None:
            child.kill()
            child.join(10)


def test_a_lock_held_by_what_a_dead_holder_left_behind_names_those_processes(tmp_path: Path) -> None:
    """The situation before the fix: the recorded pid is gone, a process it left holds the lock."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          timeout=60)
    dead_pid = int(dead.stdout)
    lock = tmp_path / ".lock"
    holder_code = textwrap.dedent("""
        import fcntl, os, sys, time
        fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, (sys.argv[2] + "\\n").encode(), 0)
        print("held", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", holder_code, str(lock), str(dead_pid)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(S2ClipError) as info:
            with exclusive_lock(lock, _busy):
                pass
        message = str(info.value)
        assert f"in use by pid {dead_pid}" in message and f"pid {dead_pid} has exited" in message
        assert str(holder.pid) in message and "left behind" in message
    finally:
        holder.kill()
        holder.wait(10)
    with exclusive_lock(lock, _busy):  # flock alone decides: the holder is gone, the lock is free
        pass


_WORKER_PARENT = textwrap.dedent("""
    import multiprocessing, os, sys, time
    from s2clip_cli import processes

    def work(use_kernel):
        if not use_kernel:  # only the watchdog thread (platforms without PR_SET_PDEATHSIG)
            processes._ask_kernel_to_kill_on_parent_death = lambda: False
        processes.worker_init(int(sys.argv[2]))
        time.sleep(120)

    if __name__ == "__main__":
        ctx = multiprocessing.get_context(sys.argv[1])
        kids = [ctx.Process(target=work, args=(use,)) for use in (True, False)]
        for kid in kids:
            kid.start()
        time.sleep(1.5)  # (spawned children import first)
        print(" ".join(str(k.pid) for k in kids), flush=True)
        time.sleep(120)
""")


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_die_with_a_parent_killed_with_sigkill_and_ignore_ctrl_c(tmp_path: Path, method: str) -> None:
    script = tmp_path / "parent.py"
    script.write_text(_WORKER_PARENT)
    # worker_init gets the parent's pid: the script passes its own through argv[2] below
    parent = subprocess.Popen([sys.executable, "-c", f"import os, sys, runpy; sys.argv = [{str(script)!r}, "
                               f"{method!r}, str(os.getpid())]; runpy.run_path({str(script)!r}, "
                               "run_name='__main__')"], stdout=subprocess.PIPE, text=True, env=ENV,
                              start_new_session=True)
    try:
        assert parent.stdout is not None
        kids = [int(p) for p in parent.stdout.readline().split()]
        assert len(kids) == 2 and alive(kids) == kids
        os.killpg(parent.pid, signal.SIGINT)  # Ctrl-C: the workers leave it to their parent...
        time.sleep(1.0)
        assert alive(kids) == kids
        parent.kill()  # ...and end with it, even when it is killed
        parent.wait(10)
        assert wait_gone(kids, 5.0) == []  # the kernel's signal at once; the watchdog within its period
    finally:
        for pid in alive(kids if "kids" in locals() else []):
            os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()


def _eval_args(data: Path, work: Path) -> list[str]:
    return ["eval", "--dataset", "voc21", "--data-root", str(data), "--work-dir", str(work), "--models", "tiny",
            "--device", "cpu", "--no-sam", "--short-side", "112", "--num-workers", "2"]


def _records(work: Path) -> int:
    path = work / "records" / "rank-00000.jsonl"
    return max(0, path.read_text().count("\n") - 1) if path.exists() else 0


def test_eval_killed_with_sigkill_leaves_no_process_and_resumes_to_the_same_miou(tmp_path: Path) -> None:
    from s2clip_cli.data.synthetic import write_synthetic_dataset

    data = write_synthetic_dataset("voc21", tmp_path / "voc", n_images=6)
    whole = subprocess.run([sys.executable, "-m", "s2clip_cli", *_eval_args(data, tmp_path / "whole")], env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]

    work = tmp_path / "killed"
    run = start(_eval_args(data, work))
    try:
        run.wait_until(lambda: _records(work) >= 2)
        workers = children_of(run.proc.pid)
        assert len(workers) == 2, workers  # the two decode workers
        os.kill(run.proc.pid, signal.SIGKILL)  # what the OOM killer does
        run.proc.wait(10)
        assert wait_gone(workers, 10.0) == [], "decode workers outlived the killed eval"
        assert wait_gone(group_pids(run.proc.pid), 10.0) == []  # nothing else of its process group either
    finally:
        run.kill()
    time.sleep(1.0)
    resumed = subprocess.run([sys.executable, "-m", "s2clip_cli", *_eval_args(data, work)], env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]  # the lock died with its holder
    results = json.loads((work / "results.json").read_text())
    assert results["timings"]["images_resumed"] >= 2
    reference = json.loads((tmp_path / "whole" / "results.json").read_text())
    assert results["summary"]["mIoU"] == reference["summary"]["mIoU"]
    np.testing.assert_array_equal(np.load(work / "confusion.npy"), np.load(tmp_path / "whole" / "confusion.npy"))


def test_data_prepare_killed_with_sigkill_leaves_no_worker_and_resumes_to_the_same_files(tmp_path: Path) -> None:
    from raw_samples import jpeg, png

    voc = tmp_path / "raw" / "VOCdevkit" / "VOC2012"
    for sub in ("ImageSets/Segmentation", "JPEGImages", "SegmentationClass"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = [f"2007_{i:06d}" for i in range(400)]
    (voc / "ImageSets/Segmentation/val.txt").write_text("\n".join(ids) + "\n")
    for k, sid in enumerate(ids):
        (voc / f"JPEGImages/{sid}.jpg").write_bytes(jpeg(200, 150, k))
        (voc / f"SegmentationClass/{sid}.png").write_bytes(
            png(rng.choice(np.array([0, 3, 7, 20, 255], np.uint8), size=(150, 200)), palette=True))
    args = ["data", "prepare", "voc21", "--from", str(tmp_path / "raw"), "--workers", "2"]

    out = tmp_path / "killed"
    run = start([*args, "-o", str(out)])
    try:
        run.wait_until(lambda: (out / "SegmentationClass").is_dir() and any((out / "SegmentationClass").iterdir()))
        workers = [p for p in children_of(run.proc.pid) if "resource_tracker" not in Path(f"/proc/{p}/cmdline")
                   .read_bytes().decode(errors="replace")]
        assert workers
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(10)
        assert wait_gone(workers, 10.0) == [], "conversion workers outlived the killed data prepare"
        assert wait_gone(group_pids(run.proc.pid), 10.0) == []  # the pool's resource tracker included
    finally:
        run.kill()
    time.sleep(1.0)
    resumed = subprocess.run([sys.executable, "-m", "s2clip_cli", *args, "-o", str(out)], env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = subprocess.run([sys.executable, "-m", "s2clip_cli", *args, "-o", str(tmp_path / "whole")], env=ENV,
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    files = json.loads((out / "s2clip-data.json").read_text())["files"]
    assert files == json.loads((tmp_path / "whole" / "s2clip-data.json").read_text())["files"]
    assert not [p for p in out.rglob(".*") if ".tmp-" in p.name]


def test_torchrun_ranks_stop_when_the_agent_is_killed(tmp_path: Path) -> None:
    """The agent killed with SIGKILL cannot stop its ranks: each stops on its own, as on SIGTERM, and
    releases the work dir (rank 0 holds its lock)."""
    from s2clip_cli.data.synthetic import write_synthetic_dataset

    # (enough images that neither rank can finish its share before the kill, even on a loaded machine)
    data = write_synthetic_dataset("voc21", tmp_path / "voc", n_images=160)
    work = tmp_path / "run"
    run = start(["--standalone", "--nproc-per-node", "2", "-m", "s2clip_cli", *_eval_args(data, work)],
                python_code="import sys; from torch.distributed.run import main; sys.argv[0] = 'torchrun'; main()")
    try:
        run.wait_until(lambda: _records(work) >= 1, timeout=600)
        ranks = children_of(run.proc.pid)
        assert len(ranks) == 2
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(10)
        assert wait_gone(ranks, 10.0) == [], "ranks outlived torchrun's agent"
        assert wait_gone(group_pids(run.proc.pid), 10.0) == []
    finally:
        run.kill()
    time.sleep(0.5)
    assert "error: interrupted; rank 0" in run.output, run.output[-6000:]
    resumed = subprocess.run([sys.executable, "-m", "s2clip_cli", *_eval_args(data, work)], env=ENV,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
