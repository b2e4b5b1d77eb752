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

With ``--burst``, instead: 1 vs 2 model workers under a burst. Two real servers (`s2clip serve
--no-page --devices cpu` and `--devices cpu,cpu`, one torch thread per worker: OMP_NUM_THREADS=1)
run side by side; in each round both get the same burst of ``--burst-size`` requests sent at once
(the order of the two alternates between rounds, so a change in the machine's load hits both), and
each burst's requests/s and every request's latency (at the client) are recorded. The ratio of the
two servers' requests/s is taken per round (paired), then the median; the machine's load average is
printed before and after. Each round also measures what this machine gives two threads over one right
now (`CEILING`: 1 vs 2 threads of 512x512 matmuls, GIL released, in a session of its own as each server
is): on a machine shared with other sessions the scheduler splits the CPU per session (autogroup), so
the servers' ratio cannot exceed that ceiling however well they scale. ``--models tiny`` (default) or ``random`` (full-size random weights: seconds
to minutes per request on a CPU).

    python benchmarks/bench_serve.py --burst [--burst-size 8] [--rounds 3] [--models tiny]
                                     [--json bench-results/serve_burst.json]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
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


# ------------------------------------------------------------------------------ --burst: 1 vs 2 workers
BURST_FIELDS = {"classes": "cat,floor; carpet,wall,sofa"}  # the method's defaults: background, SAM on
BURST_SIZE = (640, 480)
START_TIMEOUT_S = 600


def multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="cat.jpg"\r\n'
                 "Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class ServerProcess:
    """`s2clip serve --no-page` on a free port in a process of its own (stopped with SIGTERM)."""

    def __init__(self, devices: str, models: str, short_side: int, log_dir: Path) -> None:
        self.devices = devices
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = log_dir / f"serve-{devices.replace(',', '-')}-{len(devices.split(','))}.log"
        with self.log.open("w") as sink:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "s2clip_cli", "serve", "--no-page", "--port", str(self.port), "--models", models,
                 "--devices", devices, "--short-side", str(short_side), "--max-queue", "64"],
                stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def health(self) -> dict[str, Any] | None:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            connection.request("GET", "/health")
            return json.loads(connection.getresponse().read())
        except (OSError, ValueError):
            return None

    def wait_ready(self) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (health := self.health()) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server ({self.devices}) did not start:\n{self.log.read_text()}")
            time.sleep(0.3)
        return health

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def burst(port: int, body: bytes, kind: str, size: int) -> dict[str, Any]:
    """`size` requests sent at once (one connection each); the burst's wall time and each latency."""
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    go = threading.Barrier(size + 1)

    def one() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
        go.wait()
        start = time.perf_counter()
        try:
            connection.request("POST", "/segment", body=body, headers={"Content-Type": kind})
            answer = connection.getresponse()
            text = answer.read()
            with lock:
                if answer.status == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures.append(f"{answer.status} {text[:200]!r}")
        finally:
            connection.close()

    threads = [threading.Thread(target=one) for _ in range(size)]
    for thread in threads:
        thread.start()
    go.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    if failures:
        raise SystemExit(f"a burst request failed: {failures[0]}")
    return {"wall_s": wall, "requests_per_s": size / wall, "latencies_s": sorted(latencies)}


CEILING = """
import threading, time, torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
def run(n):
    torch.set_num_threads(1)
    for _ in range(n):
        a @ a
run(20)
t = time.perf_counter(); run(300); one = time.perf_counter() - t
threads = [threading.Thread(target=run, args=(300,)) for _ in range(2)]
t = time.perf_counter(); [x.start() for x in threads]; [x.join() for x in threads]; two = time.perf_counter() - t
print(2 * one / two)
"""


def thread_ceiling() -> float:
    """Throughput of 2 compute threads over 1 in a fresh session (as a server runs): what this
    machine allows a 2-worker server at best, now."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CEILING], capture_output=True, text=True, env=env, timeout=600,
                          start_new_session=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted `values`."""
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]


def run_burst(args: argparse.Namespace) -> None:
    console = Console()
    body, kind = multipart(BURST_FIELDS, photo(BURST_SIZE))
    load_before = os.getloadavg()
    configs = {1: "cpu", 2: "cpu,cpu"}
    with tempfile.TemporaryDirectory(prefix="s2clip-bench-serve-") as logs:
        servers = {n: ServerProcess(devices, args.models, args.short_side, Path(logs)) for n, devices in configs.items()}
        try:
            for n, server in servers.items():
                health = server.wait_ready()
                assert len(health["workers"]) == n, health
            for server in servers.values():  # warm: every worker builds the class set's segmenter
                burst(server.port, body, kind, 2)
            rounds: list[dict[int, dict[str, Any]]] = []
            for index in range(args.rounds):
                order = [1, 2] if index % 2 == 0 else [2, 1]
                result: dict[Any, Any] = {n: burst(servers[n].port, body, kind, args.burst_size) for n in order}
                result["ceiling"] = thread_ceiling()
                rounds.append(result)
                console.print(f"round {index + 1}/{args.rounds}: " + ", ".join(
                    f"{n} worker{'s' if n > 1 else ''} {result[n]['requests_per_s']:.3f} req/s" for n in (1, 2))
                    + f"; 2 threads / 1 thread on this machine now: {result['ceiling']:.2f}x", highlight=False)
            done = {n: [w["done"] for w in (server.health() or {}).get("workers", [])] for n, server in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
    load_after = os.getloadavg()
    rows = []
    for n in (1, 2):
        latencies = sorted(lat for r in rounds for lat in r[n]["latencies_s"])
        rows.append({"workers": n, "devices": configs[n], "threads_per_worker": 1,
                     "requests_per_s": statistics.median(r[n]["requests_per_s"] for r in rounds),
                     "requests_per_s_rounds": [r[n]["requests_per_s"] for r in rounds],
                     "latency_p50_s": percentile(latencies, 50), "latency_p90_s": percentile(latencies, 90),
                     "latency_max_s": latencies[-1], "requests_done_per_worker": done[n]})
    ratios = [r[2]["requests_per_s"] / r[1]["requests_per_s"] for r in rounds]
    ceilings = [r["ceiling"] for r in rounds]
    table = Table(title=f"s2clip serve: 1 vs 2 workers, bursts of {args.burst_size} requests ({BURST_SIZE[0]}x"
                        f"{BURST_SIZE[1]} JPEG, --models {args.models}, short side {args.short_side}, SAM on), "
                        f"{args.rounds} rounds, one torch thread per worker, CPU")
    for col in ("workers", "req/s (median)", "req/s per round", "latency p50 s", "p90 s", "max s", "done per worker"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["workers"]), f"{r['requests_per_s']:.3f}",
                      " ".join(f"{v:.3f}" for v in r["requests_per_s_rounds"]), f"{r['latency_p50_s']:.2f}",
                      f"{r['latency_p90_s']:.2f}", f"{r['latency_max_s']:.2f}", str(r["requests_done_per_worker"]))
    console.print(table)
    cores = os.cpu_count()
    console.print(f"2 workers / 1 worker, requests/s: median {statistics.median(ratios):.2f}x (per round: "
                  f"{', '.join(f'{x:.2f}' for x in ratios)}); 2 matmul threads / 1 in a session of their own "
                  f"(this machine's ceiling for it): median {statistics.median(ceilings):.2f}x (per round: "
                  f"{', '.join(f'{x:.2f}' for x in ceilings)}); load average before {load_before[0]:.1f}, after "
                  f"{load_after[0]:.1f}, on {cores} cores", highlight=False)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"burst_size": args.burst_size, "rounds": args.rounds, "models": args.models,
                                     "short_side": args.short_side, "image": list(BURST_SIZE),
                                     "fields": BURST_FIELDS, "cores": cores, "load_before": load_before,
                                     "load_after": load_after, "rows": rows, "ratio_rounds": ratios,
                                     "ratio_median": statistics.median(ratios), "thread_ceiling_rounds": ceilings,
                                     "thread_ceiling_median": statistics.median(ceilings)}, indent=2))
    console.print(f"wrote {args.json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--short-side", type=int, default=448, help="the method's default for segment")
    parser.add_argument("--json", type=Path, default=None,
                        help="default: bench-results/serve.json (bench-results/serve_burst.json with --burst)")
    parser.add_argument("--burst", action="store_true", help="1 vs 2 model workers under bursts of requests")
    parser.add_argument("--burst-size", type=int, default=8, help="requests sent at once (--burst)")
    parser.add_argument("--rounds", type=int, default=3, help="bursts per server (--burst)")
    parser.add_argument("--models", choices=("tiny", "random"), default="tiny", help="(--burst)")
    args = parser.parse_args()
    if args.burst:
        args.json = args.json or Path("bench-results/serve_burst.json")
        run_burst(args)
        return
    args.json = args.json or Path("bench-results/serve.json")
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
