"""Commands run as real processes for the interruption tests: each in its own session (process
group), with SIGINT at its default (a background job of a non-interactive shell starts with SIGINT
ignored, so a test that inherited that would prove nothing); a signal sent to the whole group once
the command has visibly started its work; the time it took to exit; the processes left behind."""

from __future__ import annotations

import http.server
import os
import signal
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Running:
    """A command started by `start`: its process and everything it printed so far (stdout+stderr)."""

    proc: subprocess.Popen
    lines: list[str] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_until(self, ready: Callable[[], bool], timeout: float = 240.0) -> None:
        """Wait for ``ready()`` (a progress line, a file); fails when the command ends first."""
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise AssertionError(f"the command ended (exit {self.proc.returncode}) before it was ready:\n"
                                     f"{self.output[-3000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"not ready after {timeout} s:\n{self.output[-3000:]}")
            time.sleep(0.02)

    def wait_for_output(self, text: str, timeout: float = 240.0) -> None:
        self.wait_until(lambda: text in self.output, timeout)

    def signal_group(self, sig: int = signal.SIGINT, timeout: float = 60.0) -> tuple[int | None, float]:
        """Send ``sig`` to the command's process group, as a terminal's Ctrl-C does; returns (exit
        status, seconds from the signal to the exit)."""
        t0 = time.monotonic()
        os.killpg(self.proc.pid, sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.monotonic() - t0
        self._reader.join(5)
        return code, seconds

    def wait(self, timeout: float = 600.0) -> int:
        code = self.proc.wait(timeout=timeout)
        self._reader.join(5)
        return code

    def kill(self) -> None:
        """SIGKILL whatever is left of the group (test clean-up)."""
        for pid in [self.proc.pid, *group_pids(self.proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def start(args: list[str], *, python_code: str | None = None, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Running:
    """``python -m s2clip_cli ARGS`` (or ``python -c CODE ARGS``) in a new session with SIGINT at its
    default, its output collected line by line."""
    head = ["-c", python_code] if python_code is not None else ["-m", "s2clip_cli"]
    proc = subprocess.Popen([sys.executable, *head, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_default_sigint, env=env or ENV, cwd=cwd)
    running = Running(proc)

    def read() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, b""):
            running.lines.append(line.decode("utf-8", "replace"))

    running._reader = threading.Thread(target=read, daemon=True)  # type: ignore[attr-defined]
    running._reader.start()  # type: ignore[attr-defined]
    return running


def _state(pid: int) -> str | None:
    """A process's state letter (None when it does not exist)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(entry.name))
        if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def children_of(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        fields = _stat_fields(int(entry.name))
        if fields and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def alive(pids: list[int]) -> list[int]:
    return [pid for pid in pids if _state(pid) not in (None, "Z", "X")]


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The processes of ``pids`` still alive after up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive(pids)


def assert_clean_interruption(run: Running, code: int | None, seconds: float, expected_code: int,
                              limit_s: float = 2.0) -> None:
    """Exit status, the one `error: interrupted` line, no traceback, within ``limit_s`` seconds,
    nothing of the process group left."""
    out = run.output
    assert code == expected_code, f"exit {code}, expected {expected_code}:\n{out[-3000:]}"
    assert seconds < limit_s, f"took {seconds:.2f} s to stop (limit {limit_s} s):\n{out[-2000:]}"
    assert "error: interrupted" in out, out[-2000:]
    assert "Traceback" not in out and "Exception ignored" not in out, out[-4000:]
    left = wait_gone(group_pids(run.proc.pid), 3.0)
    assert not left, f"processes of the interrupted command still alive: {left}"


class SlowFile(socketserver.ThreadingMixIn, http.server.HTTPServer):
    """A local HTTP server sending a large file slowly (a download that is still running when the
    test interrupts it). ``url`` is its address; use as a context manager."""

    daemon_threads = True

    def __init__(self, size: int = 256 << 20, chunk: int = 64 << 10, pause_s: float = 0.05) -> None:
        self.size, self.chunk, self.pause_s = size, chunk, pause_s
        self.requests = 0
        super().__init__(("127.0.0.1", 0), _SlowHandler)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/sam_vit_b_01ec64.pth"

    def __enter__(self) -> SlowFile:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class _SlowHandler(http.server.BaseHTTPRequestHandler):
    server: SlowFile

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(self.server.size))
        self.end_headers()
        sent = 0
        try:
            while sent < self.server.size:
                self.wfile.write(b"\0" * self.server.chunk)
                sent += self.server.chunk
                time.sleep(self.server.pause_s)
        except OSError:
            pass

    def log_message(self, *args: object) -> None:
        pass


def download_code(url: str) -> str:
    """``python -c`` code: the CLI with SAM ViT-B's download address pointed at ``url``."""
    return ("import dataclasses, sys\n"
            "from s2clip_cli.models import registry\n"
            f"spec = dataclasses.replace(registry.SAM_SPECS['vit_b'], url={url!r})\n"
            "registry.SAM_SPECS['vit_b'] = registry.ALL_SPECS['vit_b'] = spec\n"
            "from s2clip_cli.cli import main\n"
            "sys.argv[0] = 's2clip'\n"
            "main()\n")
