"""`s2clip serve` as a service is stopped: SIGTERM (systemd, Docker, Kubernetes) or SIGINT (Ctrl+C)
sent to a real server process, with a request running. The process exits 0 within the grace time
plus 2 s, the running request is answered (200) or cancelled (503), and nothing s2clip made is left
in the temp dir (TMPDIR points at a test folder): no uploads, no Gradio cache, no page downloads."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 's2clip[serve]')")
pytest.importorskip("gradio", reason="the serve extra is not installed (pip install 's2clip[serve]')")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
GRACE_S = 1.0
START_TIMEOUT_S = 240  # model building and the Gradio import on a loaded machine


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def health(port: int) -> dict[str, Any] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            return json.load(answer)
    except OSError:
        return None


def multipart(fields: dict[str, str], files: dict[str, tuple[str, bytes]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
              f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n"
              for name, (filename, data) in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(port: int, path: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        connection.request("POST", path, body=body, headers={"Content-Type": content_type})
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def leftovers(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith(("s2clip", "gradio")))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_server_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        # The default short side (448): a request takes long enough on tiny models to be running at the signal.
        proc = subprocess.Popen(
            [sys.executable, "-m", "s2clip_cli", "serve", "--port", str(port), "--models", "tiny", "--device", "cpu",
             "--grace-s", str(GRACE_S)],
            stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while health(port) is None:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        # Something of a user's in the temp dir: an upload through the page's route (Gradio's cache).
        body, kind = multipart({}, {"files": ("private.png", b"a user's file")})
        status, answer = post(port, "/gradio_api/upload", body, kind)
        assert status == 200, answer
        uploaded = Path(json.loads(answer)[0])
        assert uploaded.is_file() and tmp in uploaded.parents
        assert [name.split("-")[:2] for name in leftovers(tmp)] == [["s2clip", "serve"]]

        outcome: dict[str, Any] = {}

        def segment() -> None:
            body, kind = multipart({"classes": "cat,floor,wall"},
                                   {"image": ("cat.jpg", (EXAMPLES / "cat.jpg").read_bytes())})
            try:
                outcome["status"], outcome["body"] = post(port, "/segment", body, kind)
            except OSError as exc:
                outcome["error"] = exc

        client = threading.Thread(target=segment)
        client.start()
        while (health(port) or {}).get("queued", 0) < 1 and client.is_alive():  # bounded: the client's timeout
            time.sleep(0.05)
        stopped = time.monotonic()
        os.killpg(proc.pid, sig)
        returncode = proc.wait(timeout=60)
        took = time.monotonic() - stopped
        client.join(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    output = log.read_text()
    assert returncode == 0, output
    assert took < GRACE_S + 2, f"{took:.1f} s from {sig.name} to exit"
    assert f"stopped ({sig.name})" in output and "Traceback" not in output, output
    # The running request was answered or cancelled, never left without an answer.
    assert "error" not in outcome, outcome
    assert outcome["status"] in (200, 503), outcome
    if outcome["status"] == 503:
        assert "the server is stopping" in json.loads(outcome["body"])["error"]
    assert leftovers(tmp) == [], leftovers(tmp)
    assert not uploaded.exists()
