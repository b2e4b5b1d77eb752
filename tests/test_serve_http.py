"""`s2clip serve` against hostile clients, through a real uvicorn server on 127.0.0.1 (the one
`run_serve` starts, run on a thread here) and raw sockets: a declared 10 GB body and a chunked body
over the limit are cut off after a bounded number of bytes and the connection closed; half-sent
headers and stalled bodies are closed after the read timeout; a client gone mid-upload is one line
in the log; keep-alive still works for well-behaved clients. And the model worker's stop: new and
queued requests get 503, the running one finishes within the grace time or is cancelled."""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 's2clip[serve]')")
pytest.importorskip("gradio", reason="the serve extra is not installed (pip install 's2clip[serve]')")

from test_serve import MODEL_OPTIONS, settings_from_cli  # noqa: E402

from s2clip_cli.commands.serve import build_app  # noqa: E402
from s2clip_cli.commands.serve_http import make_server  # noqa: E402
from s2clip_cli.commands.serve_service import RequestError, SegmentService  # noqa: E402

LIMIT_MB = 0.25
LIMIT = int(LIMIT_MB * 2**20)
READ_TIMEOUT_S = 1.0
CLOSE_WITHIN_S = 15.0  # generous: the timeouts here are 1 s
BOUNDARY = "s2clipboundary"
FORM_HEAD = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"x.png\"\r\n"
             "Content-Type: image/png\r\n\r\n").encode()


class LogLines(logging.Handler):
    """uvicorn's log (`uvicorn` and below: where the server's warnings and tracebacks go)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def tracebacks(self) -> list[str]:
        return [r.getMessage() for r in self.records if r.exc_info or "Exception in ASGI" in r.getMessage()]


@pytest.fixture(scope="module")
def service() -> Iterator[SegmentService]:
    settings = settings_from_cli(*MODEL_OPTIONS, "--no-sam", "--max-upload-mb", str(LIMIT_MB),
                                 "--read-timeout-s", str(READ_TIMEOUT_S))
    svc = SegmentService(settings)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def server(service: SegmentService) -> Iterator[int]:
    """The server `run_serve` builds (page included), on a free port; yields the port."""
    app = build_app(service, page=True)
    srv = make_server(app, host="127.0.0.1", port=0, header_timeout_s=service.limits.read_timeout_s,
                      grace_s=service.limits.grace_s)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    yield srv.servers[0].sockets[0].getsockname()[1]
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def log() -> Iterator[LogLines]:
    handler = LogLines()
    logger = logging.getLogger("uvicorn")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=CLOSE_WITHIN_S)
    # A small send buffer: what `send` accepts is close to what reached the server.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 2**10)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one response (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of a response body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def push_until_closed(sock: socket.socket, frame: bytes, cap: int) -> tuple[int, bool]:
    """Send `frame` over and over until the server closes the connection or `cap` bytes went out;
    (bytes the socket accepted, whether the server closed). A server that neither reads nor closes
    makes `send` time out: a failure."""
    sent = 0
    try:
        while sent < cap:
            sock.sendall(frame)
            sent += len(frame)
    except (BrokenPipeError, ConnectionResetError):
        return sent, True
    return sent, False


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or reset), within CLOSE_WITHIN_S."""
    try:
        while True:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# ------------------------------------------------------------------------------ oversized bodies
def test_declared_10gb_body_is_refused_and_the_connection_closed(server: int) -> None:
    with connect(server) as sock:
        sock.sendall((f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
                      f"\r\nContent-Length: {10 * 2**30}\r\n\r\n").encode())
        status, headers, body = read_response(sock)  # answered from the header alone
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(body) == {"error": f"upload too large: at most {LIMIT_MB:g} MB"}
        sent, closed = push_until_closed(sock, b"\0" * 65536, cap=256 * 2**20)
    # Before: the server read on (2 GiB in 5 s). Now it reads nothing more and closes: what the client
    # could still push is what the two sockets' buffers held.
    assert closed, f"the server accepted {sent / 2**20:.0f} MB of a refused body without closing"
    assert sent < 8 * 2**20, f"{sent / 2**20:.1f} MB accepted after the 413"


def test_chunked_body_over_the_limit_is_cut_off(server: int) -> None:
    with connect(server) as sock:
        sock.sendall((f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
                      "\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
        sock.sendall(b"%x\r\n%s\r\n" % (len(FORM_HEAD), FORM_HEAD))
        frame = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536)
        sent, closed = 0, False
        response = None
        while sent < 256 * 2**20:
            if select.select([sock], [], [], 0)[0]:  # the server answered: read it, then stop
                response = read_response(sock)
                break
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            sent += 65536
        if response is None and closed:
            response = read_response(sock)  # already received before the reset
        assert response is not None, f"{sent / 2**20:.0f} MB of a chunked body read past the limit"
        status, headers, body = response
        assert status == 413 and headers["connection"] == "close"
        assert json.loads(body) == {"error": f"upload too large: at most {LIMIT_MB:g} MB"}
        assert closed or closed_by_server(sock)
    assert sent < LIMIT + 8 * 2**20


def test_early_answer_closes_instead_of_reading_the_body(server: int) -> None:
    """A form that is bad from its first bytes is answered at once; the rest is not read."""
    size = LIMIT - 1000
    with connect(server) as sock:
        sock.sendall((f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
                      f"\r\nContent-Length: {size}\r\n\r\n").encode() + b"garbage" * 10)
        status, headers, body = read_response(sock)
        assert status == 400 and headers["connection"] == "close" and "malformed form" in json.loads(body)["error"]
        assert closed_by_server(sock)


def test_page_upload_route_has_the_same_limit(server: int) -> None:
    with connect(server) as sock:
        sock.sendall((f"POST /gradio_api/upload HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                      f"boundary={BOUNDARY}\r\nContent-Length: {10 * 2**30}\r\n\r\n").encode())
        status, headers, _ = read_response(sock)
        assert status == 413 and headers["connection"] == "close"
        assert closed_by_server(sock)


def test_keep_alive_still_serves_several_requests(server: int) -> None:
    with connect(server) as sock:
        for _ in range(3):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_response(sock)
            assert status == 200 and "connection" not in headers and json.loads(body)["status"] == "ok"


# ------------------------------------------------------------------------------ stalled clients
def test_half_sent_headers_are_closed_after_the_timeout(server: int, log: LogLines) -> None:
    with connect(server) as sock:
        sock.sendall(b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Le")
        assert closed_by_server(sock), f"half-sent headers held open over {CLOSE_WITHIN_S} s"
    lines = [line for line in log.lines() if "request headers were incomplete" in line]
    assert len(lines) == 1 and f"after {READ_TIMEOUT_S:g} s" in lines[0], log.lines()


def test_headers_sent_byte_by_byte_do_not_extend_the_deadline(server: int) -> None:
    """Slowloris: a byte every 0.2 s keeps the connection busy but not open past the deadline."""
    header = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
    with connect(server) as sock:
        started = time.monotonic()
        try:
            for byte in header:
                sock.sendall(bytes([byte]))
                time.sleep(0.2)
                assert time.monotonic() - started < CLOSE_WITHIN_S, "still open"
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed_by_server(sock)
        assert time.monotonic() - started < CLOSE_WITHIN_S  # far less than the 40 s the bytes would take


def test_a_silent_connection_is_closed_without_a_log_line(server: int, log: LogLines) -> None:
    with connect(server) as sock:
        assert closed_by_server(sock)
    assert not log.records, log.lines()


def test_stalled_body_gets_408_and_is_closed(server: int, log: LogLines) -> None:
    with connect(server) as sock:
        sock.sendall((f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
                      f"\r\nContent-Length: 50000\r\n\r\n").encode() + FORM_HEAD + b"\0" * 1000)
        status, headers, body = read_response(sock)
        assert status == 408 and headers["connection"] == "close"
        assert json.loads(body) == {"error": f"request body stalled for {READ_TIMEOUT_S:g} s"}
        assert closed_by_server(sock)
    assert [line for line in log.lines() if "body stalled" in line], log.lines()
    assert not log.tracebacks()


# ------------------------------------------------------------------------------ disconnects
def test_client_gone_mid_upload_is_one_log_line(server: int, log: LogLines) -> None:
    with connect(server) as sock:
        sock.sendall((f"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={BOUNDARY}"
                      f"\r\nContent-Length: 200000\r\n\r\n").encode() + FORM_HEAD + b"\0" * 30000)
        time.sleep(0.3)
    deadline = time.monotonic() + CLOSE_WITHIN_S
    while not log.records and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # anything else it would log
    assert len(log.records) == 1, log.lines()
    line = log.lines()[0]
    assert "disconnected during POST /segment" in line and "\n" not in line
    assert not log.tracebacks()


# ------------------------------------------------------------------------------ stopping the worker
def spin_modules(seconds: float) -> str:
    """A run that calls torch modules for `seconds` (a long segmentation, as the worker sees it)."""
    import torch

    layer, x = torch.nn.Identity(), torch.zeros(1)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        layer(x)
    return "done"


def test_stop_lets_the_running_request_finish_within_the_grace_time(service: SegmentService) -> None:
    stoppable = SegmentService(service.settings)  # its own worker: stopping is for good
    try:
        running = stoppable._submit(spin_modules, 0.5)
        time.sleep(0.1)
        stoppable.stop(grace_s=30)
        with pytest.raises(RequestError, match="the server is stopping") as refused:
            stoppable._submit(spin_modules, 0.1)
        assert refused.value.status == 503
        assert running.result(timeout=60) == "done"
    finally:
        assert stoppable.close()


def test_stop_cancels_the_running_request_after_the_grace_time(service: SegmentService) -> None:
    stoppable = SegmentService(service.settings)
    try:
        running = stoppable._submit(spin_modules, 120)
        queued = stoppable._submit(spin_modules, 0.1)
        time.sleep(0.1)
        stopped = time.monotonic()
        stoppable.stop(grace_s=0.5)
        with pytest.raises(RequestError, match="this request was cancelled") as cancelled:
            running.result(timeout=60)
        assert cancelled.value.status == 503
        assert time.monotonic() - stopped < 10  # 0.5 s of grace, then the next module call
        with pytest.raises(RequestError, match="the server is stopping"):
            queued.result(timeout=10)
    finally:
        assert stoppable.close()


def test_timeouts_reach_the_service_from_the_command_line() -> None:
    defaults = settings_from_cli("--models", "tiny").limits
    assert (defaults.read_timeout_s, defaults.grace_s, defaults.keep_downloads_s) == (20.0, 1.0, 600.0)
    given = settings_from_cli("--models", "tiny", "--read-timeout-s", "3", "--grace-s", "0",
                              "--keep-downloads-s", "60").limits
    assert (given.read_timeout_s, given.grace_s, given.keep_downloads_s) == (3.0, 0.0, 60.0)
