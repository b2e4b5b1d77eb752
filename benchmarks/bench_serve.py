"""What `s2clip serve` adds over `segment`'s compute, per request, on --models tiny (CPU).

For each image size and answer format, every request's wall time at the client minus what `segment`
also computes per image on that same request (decoding the image with `io.images.read_image`, the
segmenter call `Segmenter.__call__`) is the serving overhead: upload, multipart parsing, the
temporary file and header check before decoding, the queue, the answer (COCO RLE per class + JSON,
or the mask PNG — `segment` writes that PNG too, counted here as overhead all the same). Measured in-process (FastAPI's TestClient) and through
a real uvicorn server on 127.0.0.1 (sockets, HTTP). The target is under 50 ms.

Then what a refused upload costs the server (the same uvicorn server `s2clip serve` runs): a body
declaring 10 GB, and a chunked body pushed past --max-upload-mb, from a raw socket that keeps sending
until the server closes the connection — the bytes the server read from the socket (beyond the limit,
for the chunked body: up to the limit is what the server accepts), the bytes the client got into it,
and how long the connection stayed open. The target: a few MB at most.

    python benchmarks/bench_serve.py [--repeats 5] [--json bench-results/serve.json]
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import statistics
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
from fastapi.testclient import TestClient
from PIL import Image
from rich.console import Console
from rich.table import Table

from s2clip_cli.commands import serve_service
from s2clip_cli.commands.serve import build_app
from s2clip_cli.commands.serve_http import make_server
from s2clip_cli.commands.serve_service import SegmentService, ServeLimits, ServeSettings
from s2clip_cli.pipeline.segmenter import Segmenter, SegmenterConfig

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cat.jpg"
SIZES = ((320, 240), (1280, 960))
FIELDS = {"classes": "cat,floor; carpet,wall,sofa", "no_background": "true", "sam": "false"}
TARGET_MS = 50.0
TARGET_REFUSED_MB = 4.0  # what a refused upload may make the server read beyond the limit
PUSH_CAP = 2**30  # a client gives up after this much (the server read it all: the bug)


class ComputeClock:
    """Records, per request, how long the work `segment` also does per image takes: decoding the
    image (`io.images.read_image`, as the server calls it) and the segmenter call (worker thread)."""

    def __init__(self) -> None:
        self.decode = 0.0
        self.segment = 0.0
        segment_call, read_image = Segmenter.__call__, serve_service.read_image

        def timed_segment(seg: Segmenter, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return segment_call(seg, *args, **kwargs)
            finally:
                self.segment = time.perf_counter() - start

        def timed_read(path: Any) -> Any:
            start = time.perf_counter()
            try:
                return read_image(path)
            finally:
                self.decode = time.perf_counter() - start

        Segmenter.__call__ = timed_segment  # type: ignore[method-assign]
        serve_service.read_image = timed_read

    @property
    def last(self) -> float:
        return self.decode + self.segment


def photo(size: tuple[int, int]) -> bytes:
    with Image.open(EXAMPLE) as image:
        resized = image.convert("RGB").resize(size)
    buf = io.BytesIO()
    resized.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(post: Any, clock: ComputeClock, image: bytes, fmt: str, repeats: int) -> dict[str, float]:
    overheads, computes = [], []
    post(image, fmt)  # warm: the class set's segmenter and text embedding
    for _ in range(repeats):
        start = time.perf_counter()
        response = post(image, fmt)
        wall = time.perf_counter() - start
        assert response.status_code == 200, response.text
        computes.append(clock.last)
        overheads.append(wall - clock.last)
    return {"compute_ms": 1e3 * statistics.median(computes), "overhead_ms": 1e3 * statistics.median(overheads),
            "overhead_max_ms": 1e3 * max(overheads)}


class ReadCounter:
    """Counts the bytes the server's connections read from their sockets (`data_received`)."""

    def __init__(self, server: Any) -> None:
        self.bytes = 0
        counter, protocol = self, server.config.http

        class Counting(protocol):  # type: ignore[misc, valid-type]
            def data_received(self, data: bytes) -> None:
                counter.bytes += len(data)
                super().data_received(data)

        server.config.http = Counting


def refused_upload(port: int, counter: ReadCounter, head: bytes, frame: bytes) -> dict[str, Any]:
    """Send `head`, then `frame` until the server closes the connection (or PUSH_CAP, or 20 s of a
    server that neither reads nor closes)."""
    counter.bytes = 0
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 2**10)
    start = time.perf_counter()
    pushed, closed = 0, False
    try:
        sock.sendall(head)
        while pushed < PUSH_CAP:
            sock.sendall(frame)
            pushed += len(frame)
    except (BrokenPipeError, ConnectionResetError):
        closed = True
    except TimeoutError:
        pass
    held = time.perf_counter() - start
    sock.close()
    time.sleep(0.2)  # what the server still had in flight
    return {"server_read_mb": counter.bytes / 2**20, "client_pushed_mb": pushed / 2**20, "closed": closed,
            "open_ms": 1e3 * held}


def hostile_rows(port: int, counter: ReadCounter, limit_mb: float) -> list[dict[str, Any]]:
    form = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    start = b"POST /segment HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
    declared = refused_upload(port, counter, start + b"Content-Length: %d\r\n\r\n" % (10 * 2**30) + form,
                              b"\0" * 65536)
    chunked = refused_upload(port, counter, start + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(form), form),
                             b"%x\r\n%s\r\n" % (65536, b"\0" * 65536))
    return [{"upload": "Content-Length: 10 GB", "read_past_limit_mb": declared["server_read_mb"], **declared},
            {"upload": f"chunked, past {limit_mb:g} MB",
             "read_past_limit_mb": max(0.0, chunked["server_read_mb"] - limit_mb), **chunked}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--short-side", type=int, default=448, help="the method's default for segment")
    parser.add_argument("--json", type=Path, default=Path("bench-results/serve.json"))
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    base = SegmenterConfig(models="tiny", device="cpu", work_resolution="resized", timing=True, prob_thd=0.2)
    service = SegmentService(ServeSettings(base=base, explicit={"short_side": args.short_side},
                                           methods=["s2clip"], limits=ServeLimits(max_upload_bytes=20 * 2**20)))
    clock = ComputeClock()
    app = build_app(service, page=False)
    port = free_port()
    server = make_server(app, host="127.0.0.1", port=port, header_timeout_s=service.limits.read_timeout_s,
                         grace_s=service.limits.grace_s)
    counter = ReadCounter(server)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):  # bounded wait for the socket
        if server.started:
            break
        time.sleep(0.05)
    rows = []
    with TestClient(app) as in_process, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as http:
        clients = {"in-process": in_process, "uvicorn 127.0.0.1": http}
        for size in SIZES:
            image = photo(size)
            for fmt in ("json", "png"):
                for name, client in clients.items():
                    def post(data: bytes, fmt: str, client: Any = client) -> Any:
                        return client.post(f"/segment?format={fmt}", files={"image": ("cat.jpg", data, "image/jpeg")},
                                           data=FIELDS)
                    result = measure(post, clock, image, fmt, args.repeats)
                    rows.append({"size": f"{size[0]}x{size[1]}", "format": fmt, "client": name, **result})
    limit_mb = service.limits.max_upload_bytes / 2**20
    hostile = hostile_rows(port, counter, limit_mb)
    server.should_exit = True
    thread.join(timeout=10)
    service.close()

    table = Table(title=f"s2clip serve: time added over segment's decode + segmenter call, --models tiny, CPU, no SAM, "
                        f"median of {args.repeats}")
    for col in ("image", "answer", "client", "segment compute ms", "serving overhead ms", "worst ms", "< 50 ms"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["size"], r["format"], r["client"], f"{r['compute_ms']:.0f}", f"{r['overhead_ms']:.1f}",
                      f"{r['overhead_max_ms']:.1f}", "yes" if r["overhead_ms"] < TARGET_MS else "NO")
    console = Console()
    console.print(table)
    refused = Table(title=f"s2clip serve: a refused upload (--max-upload-mb {limit_mb:g}), raw socket on 127.0.0.1")
    for col in ("upload", "server read MB", "past the limit MB", "client pushed MB", "closed by server", "open ms",
                f"< {TARGET_REFUSED_MB:g} MB past"):
        refused.add_column(col, justify="right")
    for r in hostile:
        refused.add_row(r["upload"], f"{r['server_read_mb']:.2f}", f"{r['read_past_limit_mb']:.2f}",
                        f"{r['client_pushed_mb']:.2f}", "yes" if r["closed"] else "NO", f"{r['open_ms']:.0f}",
                        "yes" if r["read_past_limit_mb"] < TARGET_REFUSED_MB else "NO")
    console.print(refused)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"target_ms": TARGET_MS, "repeats": args.repeats, "short_side": args.short_side,
                                     "classes": FIELDS["classes"], "rows": rows,
                                     "refused_upload": {"target_mb": TARGET_REFUSED_MB, "max_upload_mb": limit_mb,
                                                        "rows": hostile}}, indent=2))
    console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
