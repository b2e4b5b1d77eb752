"""`s2clip serve --devices`: one model worker per device over one shared bounded queue, on the CPU
with two workers (`--devices cpu,cpu`, tiny models). A burst answered concurrently by two workers
equals the answers of a one-worker server given one request at a time, both workers ran (at the
same time, each on its own models) and /health counts them; the queue is full (503) with both
workers busy; stopping lets both running requests finish within the grace time or cancels both
(503), and the cancellation reaches only the workers' threads. `--devices` is checked before any
model loads (one line), and CPU workers split the process's torch threads."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 's2clip[serve]')")
pytest.importorskip("multipart", reason="the serve extra is not installed (pip install 's2clip[serve]')")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import EXAMPLES, png_bytes, post, runner, settings_from_cli  # noqa: E402
from test_serve_http import spin_modules  # noqa: E402

from s2clip_cli.cli import app as cli_app  # noqa: E402
from s2clip_cli.commands import serve as serve_driver  # noqa: E402
from s2clip_cli.commands import serve_workers  # noqa: E402
from s2clip_cli.commands.serve import build_app  # noqa: E402
from s2clip_cli.commands.serve_service import RequestError, SegmentService  # noqa: E402
from s2clip_cli.commands.serve_workers import parse_devices  # noqa: E402
from s2clip_cli.errors import S2ClipError  # noqa: E402

TINY = ["--models", "tiny", "--short-side", "112", "--max-queue", "4"]
WAIT_S = 60  # bounds every wait below (a loaded 2-core machine); the runs themselves take seconds


@pytest.fixture(scope="module")
def two_workers() -> Iterator[SegmentService]:
    svc = SegmentService(settings_from_cli(*TINY, "--devices", "cpu,cpu"))
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(two_workers: SegmentService) -> Iterator[TestClient]:
    with TestClient(build_app(two_workers, page=False)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def photo() -> bytes:
    """The cat example, shrunk (as test_serve's: the tiny models give it several classes)."""
    with Image.open(EXAMPLES / "cat.jpg") as image:
        return png_bytes(np.asarray(image.convert("RGB").resize((150, 100))))


def wait_until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ------------------------------------------------------------------------------ --devices
@pytest.mark.parametrize("spec, devices", [
    ("cpu", ["cpu"]),
    ("cpu,cpu", ["cpu", "cpu"]),
    (" CPU , cpu ", ["cpu", "cpu"]),
])
def test_devices_are_parsed(spec: str, devices: list[str]) -> None:
    assert parse_devices(spec) == devices


@pytest.mark.parametrize("spec, words", [
    ("", "--devices is empty"),
    ("gpu0", "unknown device 'gpu0'; use cpu, cuda, cuda:N or all"),
    ("cpu,,cpu", "unknown device '' (an empty name)"),
    ("cuda:-1", "unknown device 'cuda:-1'"),
    ("cuda:0,cpu", "--devices mixes cpu and cuda"),
])
def test_bad_devices_are_one_line(spec: str, words: str) -> None:
    with pytest.raises(S2ClipError) as refused:
        parse_devices(spec)
    assert words in str(refused.value) and "\n" not in str(refused.value)


def test_cuda_devices_are_checked_against_the_visible_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_workers, "_cuda_count", lambda: 0)
    for spec in ("cuda:0", "cuda", "all"):
        with pytest.raises(S2ClipError, match="no CUDA device is"):
            parse_devices(spec)
    monkeypatch.setattr(serve_workers, "_cuda_count", lambda: 2)
    assert parse_devices("cuda:1,cuda,cuda:1") == ["cuda:1", "cuda:0", "cuda:1"]  # a device may repeat
    assert parse_devices("all") == ["cuda:0", "cuda:1"]
    with pytest.raises(S2ClipError, match=r"--devices cuda:2: only 2 CUDA devices visible \(cuda:0…cuda:1\)"):
        parse_devices("cuda:0,cuda:2")


def test_devices_reach_the_settings_and_are_checked_before_models_load(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_cli("--models", "tiny", "--devices", "cpu,cpu").devices == ["cpu", "cpu"]
    assert settings_from_cli("--models", "tiny").devices is None  # one worker on --device
    started: list[Any] = []
    monkeypatch.setattr(serve_driver, "run_serve", lambda *a, **k: started.append(a))
    monkeypatch.setattr(serve_workers, "_cuda_count", lambda: 0)
    for args, words in [(["--devices", "cuda:0,cuda:1"], "--devices cuda:0: no CUDA device is available"),
                        (["--devices", "tpu"], "unknown device 'tpu'"),
                        (["--device", "cpu", "--devices", "cpu,cpu"], "give --device or --devices, not both")]:
        result = runner.invoke(cli_app, ["serve", "--models", "tiny", *args])
        assert result.exit_code != 0
        assert words in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert started == []  # refused before run_serve: no model was loaded


def test_cpu_workers_split_the_threads() -> None:
    from s2clip_cli.commands.serve_workers import cpu_threads_each

    assert cpu_threads_each(["cpu"], 8) is None  # one worker keeps the process's setting
    assert cpu_threads_each(["cpu", "cpu"], 8) == 4
    assert cpu_threads_each(["cpu"] * 3, 2) == 1
    assert cpu_threads_each(["cuda:0", "cuda:1"], 8) is None


# ------------------------------------------------------------------------------ two workers
def test_each_worker_has_its_own_models_thread_and_threads(two_workers: SegmentService) -> None:
    import torch

    first, second = (w.models["s2clip"] for w in two_workers.pool.workers)
    assert first.clip is not second.clip and first.vfm is not second.vfm and first.sam is not second.sam
    for a, b in zip(first.clip.state_dict().values(), second.clip.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the same weights: a request's answer does not depend on its worker
    meeting = threading.Barrier(2, timeout=WAIT_S)

    def where() -> tuple[int, str, int]:
        meeting.wait()  # both requests at once: each on a worker of its own
        return two_workers.pool.current().index, threading.current_thread().name, torch.get_num_threads()

    futures = [two_workers._submit(where) for _ in range(2)]
    seen = sorted(f.result(timeout=WAIT_S) for f in futures)
    assert [index for index, _, _ in seen] == [0, 1]
    assert seen[0][1] != seen[1][1] and all(name.startswith("s2clip-model") for _, name, _ in seen)
    assert {threads for _, _, threads in seen} == {two_workers.pool.workers[0].cpu_threads}
    assert two_workers.pool.workers[0].cpu_threads is not None


def test_a_burst_on_two_workers_equals_one_worker_one_at_a_time(
        client: TestClient, two_workers: SegmentService, photo: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    from s2clip_cli.pipeline.segmenter import Segmenter

    flipped = png_bytes(np.asarray(Image.open(io.BytesIO(photo)))[::-1].copy())
    jobs = [(photo, {"classes": "cat,wall", "sam": "false", "no_background": "true"}),
            (flipped, {"classes": "dog,grass; lawn", "sam": "false", "no_background": "true", "precision": "bf16"}),
            (photo, {"classes": "cat,wall", "sam": "false", "no_background": "true"}),
            (flipped, {"classes": "sky,tree,road", "sam": "true"})]
    one = SegmentService(settings_from_cli(*TINY, "--device", "cpu"))
    try:
        with TestClient(build_app(one, page=False)) as one_client:
            sequential = [post(one_client, image, **fields).json() for image, fields in jobs]
        assert one.health()["workers"] == [{"worker": 0, "device": "cpu", "busy": False, "done": 4, "failed": 0}]
    finally:
        one.close()
    before = [w["done"] for w in client.get("/health").json()["workers"]]

    # The first two calls wait for each other: both workers run at once, each on its own models.
    active: list[Any] = []
    most = [0]
    lock = threading.Condition()
    original = Segmenter.__call__

    def meeting_call(self: Segmenter, *args: Any, **kwargs: Any) -> Any:
        with lock:
            assert all(seg.models.clip is not self.models.clip for seg in active), "two runs on one worker's models"
            active.append(self)
            most[0] = max(most[0], len(active))
            lock.notify_all()
            lock.wait_for(lambda: most[0] >= 2, timeout=WAIT_S)
        try:
            return original(self, *args, **kwargs)
        finally:
            with lock:
                active.remove(self)

    monkeypatch.setattr(Segmenter, "__call__", meeting_call)
    answers: list[Any] = [None] * len(jobs)

    def send(i: int) -> None:
        answers[i] = post(client, jobs[i][0], **jobs[i][1])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(not t.is_alive() for t in threads)
    assert most[0] == 2  # two at once, never more: one request per worker
    for answer, expected in zip(answers, sequential, strict=True):
        assert answer.status_code == 200, answer.text
        record = answer.json()
        assert record["classes"] == expected["classes"] and record["class_names"] == expected["class_names"]
        assert record["masks"] == expected["masks"] and record["pixel_share"] == expected["pixel_share"]
        assert {k: v for k, v in record["run"].items() if k != "worker"} == \
            {k: v for k, v in expected["run"].items() if k != "worker"}
    assert {answer.json()["run"]["worker"] for answer in answers} == {0, 1}
    health = client.get("/health").json()
    done = [w["done"] - b for w, b in zip(health["workers"], before, strict=True)]
    assert sum(done) == len(jobs) and min(done) >= 1, health["workers"]
    assert [w["device"] for w in health["workers"]] == ["cpu", "cpu"] and health["device"] == "cpu,cpu"
    assert health["queue"] == {"length": 0, "waiting": 0, "capacity": 4}


def test_full_queue_answers_503_with_both_workers_busy(client: TestClient, two_workers: SegmentService) -> None:
    release = threading.Event()
    blockers = [two_workers._submit(release.wait, WAIT_S) for _ in range(two_workers.limits.max_queue)]
    try:
        wait_until(lambda: all(w["busy"] for w in client.get("/health").json()["workers"]), "both workers busy")
        health = client.get("/health").json()
        assert health["queue"] == {"length": 4, "waiting": 2, "capacity": 4} and health["queued"] == 4
        response = post(client, png_bytes(np.zeros((8, 8, 3), np.uint8)), classes="cat")
        assert response.status_code == 503 and "server busy: 4 requests are queued" in response.json()["error"]
    finally:
        release.set()
        for blocker in blockers:
            assert blocker.result(timeout=WAIT_S) is True
    wait_until(lambda: client.get("/health").json()["queue"]["length"] == 0, "the queue to empty")
    assert not any(w["busy"] for w in client.get("/health").json()["workers"])


# ------------------------------------------------------------------------------ stopping
def running_on_both(service: SegmentService, seconds: float) -> list[Any]:
    futures = [service._submit(spin_modules, seconds) for _ in range(2)]
    wait_until(lambda: all(w.busy for w in service.pool.workers), "a request running on each worker")
    return futures


def test_stop_lets_both_running_requests_finish_within_the_grace_time(two_workers: SegmentService) -> None:
    stoppable = SegmentService(two_workers.settings)  # workers of its own: stopping is for good
    try:
        running = running_on_both(stoppable, 0.5)
        stoppable.stop(grace_s=30)
        with pytest.raises(RequestError, match="the server is stopping"):
            stoppable._submit(spin_modules, 0.1)
        assert [f.result(timeout=WAIT_S) for f in running] == ["done", "done"]
        assert [w["done"] for w in stoppable.health()["workers"]] == [1, 1]
    finally:
        assert stoppable.close()


def test_stop_cancels_both_running_requests_after_the_grace_time(two_workers: SegmentService) -> None:
    import torch

    stoppable = SegmentService(two_workers.settings)
    try:
        running = running_on_both(stoppable, 120)
        queued = stoppable._submit(spin_modules, 0.1)
        stopped = time.monotonic()
        stoppable.stop(grace_s=0.5)
        for future in running:
            with pytest.raises(RequestError, match="this request was cancelled") as cancelled:
                future.result(timeout=WAIT_S)
            assert cancelled.value.status == 503
        assert time.monotonic() - stopped < 10  # 0.5 s of grace, then each worker's next module call
        with pytest.raises(RequestError, match="the server is stopping"):
            queued.result(timeout=10)
        assert [(w["done"], w["failed"], w["busy"]) for w in stoppable.health()["workers"]] == [(0, 1, False)] * 2
        torch.nn.Identity()(torch.zeros(1))  # the cancellation reaches the workers' threads only
        assert two_workers._submit(spin_modules, 0.05).result(timeout=WAIT_S) == "done"  # and this pool's only
    finally:
        assert stoppable.close()


def test_page_runs_as_many_requests_at_once_as_there_are_workers(two_workers: SegmentService) -> None:
    pytest.importorskip("gradio")
    from s2clip_cli.commands.serve_page import Downloads, build_page

    downloads = Downloads(60.0)
    try:
        page = build_page(two_workers, downloads)
        assert page._queue.default_concurrency_limit == 2
        assert page._queue.max_size == two_workers.limits.max_queue
    finally:
        downloads.close()


# ------------------------------------------------------------------------------ a real server
def test_a_signal_stops_two_busy_workers_cleanly(tmp_path: Path) -> None:
    """`s2clip serve --devices cpu,cpu` in a process of its own, a request running on each worker:
    SIGTERM → exit 0 within the grace time plus 2 s, each request answered (200) or cancelled (503),
    and nothing left in the temp dir."""
    from test_serve_process import GRACE_S, START_TIMEOUT_S, free_port, health, leftovers, multipart
    from test_serve_process import post as post_raw

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        # The default short side (448): a request runs long enough on tiny models to be running at the signal.
        proc = subprocess.Popen(
            [sys.executable, "-m", "s2clip_cli", "serve", "--port", str(port), "--models", "tiny", "--devices",
             "cpu,cpu", "--grace-s", str(GRACE_S), "--no-page"],
            stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    outcomes: list[dict[str, Any]] = [{}, {}]

    def segment(outcome: dict[str, Any]) -> None:
        body, kind = multipart({"classes": "cat,floor,wall"}, {"image": ("cat.jpg", (EXAMPLES / "cat.jpg").read_bytes())})
        try:
            outcome["status"], outcome["body"] = post_raw(port, "/segment", body, kind)
        except OSError as exc:
            outcome["error"] = exc

    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while health(port) is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        clients = [threading.Thread(target=segment, args=(outcome,)) for outcome in outcomes]
        for client in clients:
            client.start()
        busy: list[bool] = []
        while not (len(busy) == 2 and all(busy)) and any(c.is_alive() for c in clients):  # bounded: the clients'
            busy = [w["busy"] for w in (health(port) or {}).get("workers", [])]              # timeouts
            time.sleep(0.05)
        assert busy == [True, True], (busy, outcomes)
        stopped = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        returncode = proc.wait(timeout=60)
        took = time.monotonic() - stopped
        for client in clients:
            client.join(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    output = log.read_text()
    assert returncode == 0, output
    assert "2 workers: cpu, cpu" in output, output
    assert took < GRACE_S + 2, f"{took:.1f} s from SIGTERM to exit"
    assert "stopped (SIGTERM)" in output and "Traceback" not in output, output
    for outcome in outcomes:  # answered or cancelled, never left without an answer
        assert "error" not in outcome and outcome["status"] in (200, 503), outcome
        if outcome["status"] == 503:
            assert "the server is stopping" in json.loads(outcome["body"])["error"]
    assert leftovers(tmp) == [], leftovers(tmp)


def test_sigterm_while_the_workers_load_removes_the_temp_folder(tmp_path: Path) -> None:
    """Several workers load for longer: SIGTERM then stops the command as Ctrl+C does (one line,
    exit 130) and the server's temporary folder goes with it."""
    from test_serve_process import START_TIMEOUT_S, free_port, leftovers

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "s2clip_cli", "serve", "--port", str(free_port()), "--models", "tiny", "--devices",
         "cpu,cpu"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not leftovers(tmp):  # the server's folder: made just before the models load
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.3)  # into the loading (models, then the page: seconds)
        stopped = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert "serving on" not in out, out  # it was still loading
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "error: interrupted", (proc.returncode, err)
    assert "Traceback" not in err
    assert took < 5, f"{took:.1f} s from SIGTERM to exit"
    assert leftovers(tmp) == []
