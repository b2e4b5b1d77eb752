"""Runs that survive clusters: one run per work dir, a failing rank stops every rank (launched as
plain processes, as srun/mpirun would, without torchrun's agent), and weights fetched once."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eval_helpers import CONFIG, colour_predict

from s2clip_cli.data.datasets import open_dataset
from s2clip_cli.data.synthetic import write_synthetic_dataset
from s2clip_cli.distributed import collective_timeout
from s2clip_cli.errors import S2ClipError
from s2clip_cli.evaluation.records import records_dir
from s2clip_cli.evaluation.runner import LOCK_NAME, evaluate

WORKER = Path(__file__).with_name("dist_eval_worker.py")
N_IMAGES = 40


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_dataset("voc21", tmp_path_factory.mktemp("data") / "VOC2012", n_images=N_IMAGES,
                                   size=(16, 24), seed=5)


# ------------------------------------------------------------------------------------ one run per work dir


def test_a_held_work_dir_is_refused_at_once(voc_root: Path, tmp_path: Path) -> None:
    ds = open_dataset("voc21", voc_root)
    work = tmp_path / "run"
    work.mkdir()
    other_run = os.open(work / LOCK_NAME, os.O_RDWR | os.O_CREAT)  # a live run holds the lock
    try:
        fcntl.flock(other_run, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(other_run, b"4242\n")
        t0 = time.perf_counter()
        with pytest.raises(S2ClipError, match=r"work dir .*run is in use by another s2clip eval \(pid 4242\)") as err:
            evaluate(ds, colour_predict, work_dir=work, config=CONFIG, limit=2, num_workers=0)
        assert time.perf_counter() - t0 < 2.0 and "\n" not in str(err.value)
        assert not records_dir(work).exists()  # refused before touching anything
    finally:
        os.close(other_run)
    res = evaluate(ds, colour_predict, work_dir=work, config=CONFIG, limit=2, num_workers=0)
    assert res["timings"]["images_this_run"] == 2


def test_a_stale_lock_file_does_not_block(voc_root: Path, tmp_path: Path) -> None:
    ds = open_dataset("voc21", voc_root)
    work = tmp_path / "run"
    work.mkdir()
    (work / LOCK_NAME).write_text("99999\n")  # left by a killed run: nobody holds the lock
    res = evaluate(ds, colour_predict, work_dir=work, config=CONFIG, limit=2, num_workers=0)
    assert res["num_images"] == 2
    assert (work / LOCK_NAME).read_text().strip() == str(os.getpid())


def test_collective_timeout_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("S2CLIP_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout().total_seconds() == 1800
    monkeypatch.setenv("S2CLIP_COLLECTIVE_TIMEOUT", "90")
    assert collective_timeout().total_seconds() == 90
    monkeypatch.setenv("S2CLIP_COLLECTIVE_TIMEOUT", "soon")
    with pytest.raises(S2ClipError, match="positive number of seconds"):
        collective_timeout()


# ------------------------------------------------------------------------------------ two plain processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch(args: list[str], extra_env: dict[str, str] | None = None,
            timeout: float = 60) -> tuple[list[int], list[str], float]:
    """Start 2 ranks as srun would (no torchrun agent); (exit codes, outputs, seconds until both exited)."""
    port = str(_free_port())
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    base |= {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
             **(extra_env or {})}
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(WORKER), *args], env=base | {"RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t0)))[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return [p.returncode for p in procs], outputs, time.perf_counter() - t0


def test_a_rank_that_raises_stops_every_rank_promptly(voc_root: Path, tmp_path: Path) -> None:
    codes, (out0, out1), _ = _launch(["--fail", "raise", str(voc_root), str(tmp_path / "w")])
    assert codes[0] != 0 and codes[1] != 0, (out0, out1)
    assert "rank 1 fails on" in out1 and "RuntimeError" in out1
    # first run: the work dir was held by another run; rank 0 was refused and rank 1 stopped with it
    assert "rank 0 while held: work dir" in out0 and "is in use by another s2clip eval" in out0, out0
    assert "rank 1 while held: stopped because rank 0 failed" in out1, out1
    assert ("rank 0 error: stopped because rank 1 failed (its error is in its own output); finished images are "
            "kept: rerun with the same --work-dir to resume") in out0, out0
    # rank 0 (0.3 s per image) stopped within two checks of 2 images, not after its 20 images
    predicted = int(out0.split("rank 0 predicted ")[1].split()[0])
    assert predicted <= 6, out0
    assert "Traceback" not in out0


def test_a_rank_that_dies_stops_every_rank_promptly(voc_root: Path, tmp_path: Path) -> None:
    codes, (out0, out1), _ = _launch(["--fail", "exit", str(voc_root), str(tmp_path / "w")])
    assert codes[1] == 3 and codes[0] != 0, (out0, out1)
    assert "rank 0 error: lost contact with rank 1 (pid " in out0, out0  # on this machine: named
    assert int(out0.split("rank 0 predicted ")[1].split()[0]) <= 6, out0


def test_weights_are_downloaded_once_while_the_other_rank_waits(tmp_path: Path) -> None:
    counter = tmp_path / "downloads.txt"
    env = {"S2CLIP_WEIGHTS_DIR": str(tmp_path / "weights"), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "TORCH_HOME": str(tmp_path / "torch"), "S2CLIP_OFFLINE": "", "HF_HUB_OFFLINE": ""}
    codes, outs, _ = _launch(["--prefetch", str(counter)], env)
    assert codes == [0, 0], outs
    assert sorted(counter.read_text().splitlines()) == ["0 ViT-B/16", "0 dino_vits16"]  # rank 0, once each
    ids = [out.split("identities ")[1].split() for out in outs]
    assert ids[0] == ids[1] and all(i.startswith("sha256:") for i in ids[0]), outs
    failed_codes, (out0, out1), _ = _launch(["--prefetch", str(tmp_path / "none.txt"), "--fail-download"],
                                            env | {"S2CLIP_WEIGHTS_DIR": str(tmp_path / "empty")})
    assert failed_codes == [2, 2], (out0, out1)
    assert "rank 0 error: missing weights for ViT-B/16, dino_vits16" in out0
    assert "`s2clip models download ViT-B/16 dino_vits16`" in out0
    assert "rank 1 error: weights could not be resolved on rank 0" in out1
