"""Driver of `s2clip serve`: load the models once, then serve the web page and the HTTP API from one
process (uvicorn). The pieces: `serve_service` (models, queue, request checks; no web
dependency), `serve_api` (FastAPI routes), `serve_page` (Gradio page), `serve_http` (the uvicorn
server: header deadline, signals). Needs the ``serve`` extra (`missing_extra` says so in one line
without importing anything heavy).

Workers: one per device of `--devices` (`serve_workers`: each its own models, one shared bounded
queue); one on `--device` without it.

Stopping: SIGINT or SIGTERM stops accepting connections, lets the running requests (one per worker)
finish within `--grace-s` (then cancels them: 503), removes every temporary file the server made (one
folder holds them all: uploads, Gradio's cache, the page's downloads) and exits 0."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from ..errors import S2ClipError
from .serve_service import SegmentService, ServeSettings

if TYPE_CHECKING:
    from .serve_page import Downloads

EXTRA_MODULES = ("fastapi", "uvicorn", "gradio", "multipart")
INSTALL_HINT = "pip install 's2clip[serve]'"


def missing_extra() -> str | None:
    """The one-line install hint when a module of the ``serve`` extra is missing, else None."""
    missing = [name for name in EXTRA_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        return f"s2clip serve needs {', '.join(missing)}: {INSTALL_HINT}"
    return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(host: str, port: int) -> None:
    """One-line error, before the models load, when `host:port` cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise S2ClipError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def build_app(service: SegmentService, *, page: bool = True):  # noqa: ANN201 - fastapi.FastAPI (optional extra)
    """The FastAPI app with the API routes and, unless `page` is False, the Gradio page at ``/``
    (its downloads pruned while the app runs and removed when it stops: the app's lifespan)."""
    from .serve_api import create_app

    app = create_app(service)
    if page:
        import gradio as gr

        from .serve_page import CSS, Downloads, build_page

        downloads = Downloads(service.limits.keep_downloads_s)
        app.router.lifespan_context = _pruning(app.router.lifespan_context, downloads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = build_page(service, downloads)
            app = gr.mount_gradio_app(app, blocks, path="/", max_file_size=service.limits.max_upload_bytes,
                                      footer_links=[], css=CSS, ssr_mode=False, mcp_server=False)
    return app


def _pruning(lifespan: Any, downloads: Downloads) -> Any:
    """`lifespan` with `downloads` pruned every `prune_every_s` while the app runs, closed after."""

    @contextlib.asynccontextmanager
    async def pruned(app: Any) -> AsyncIterator[Any]:
        async def prune_forever() -> None:
            while True:
                await asyncio.sleep(downloads.prune_every_s)
                await asyncio.to_thread(downloads.prune)

        task = asyncio.create_task(prune_forever())
        try:
            async with lifespan(app) as state:
                yield state
        finally:
            task.cancel()
            downloads.close()

    return pruned


@contextlib.contextmanager
def server_temp_dir() -> Iterator[Path]:
    """One temporary folder for everything the server writes while it runs (`tempfile` and Gradio's
    cache, GRADIO_TEMP_DIR, point into it), removed when it stops, whatever the stop."""
    root = Path(tempfile.mkdtemp(prefix="s2clip-serve-"))
    saved_tempdir, saved_gradio = tempfile.tempdir, os.environ.get("GRADIO_TEMP_DIR")
    tempfile.tempdir = str(root)
    os.environ["GRADIO_TEMP_DIR"] = str(root / "gradio")
    try:
        yield root
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_gradio is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = saved_gradio
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """While the models load (before the server's own signal handlers): SIGTERM stops the command as
    Ctrl+C does (`KeyboardInterrupt`), so the temporary folder is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_serve(settings: ServeSettings, *, host: str, port: int, page: bool, console: Console) -> None:
    """Load the models, then serve until SIGINT or SIGTERM; then stop within the grace time, remove
    the server's temporary files and end the process with status 0 (it does not return then)."""
    hint = missing_extra()
    if hint:
        raise S2ClipError(hint)
    from .serve_http import make_server

    check_port(host, port)
    limits = settings.limits
    with server_temp_dir():
        service: SegmentService | None = None
        try:
            devices = settings.devices or []
            loading = f"loading models for {len(devices)} workers ({', '.join(devices)})…" if len(devices) > 1 \
                else "loading models…"
            with console.status(loading), sigterm_interrupts():
                service = SegmentService(settings)
                app = build_app(service, page=page)
            # A malformed form is the client's 400, not a line in the server's log.
            logging.getLogger("python_multipart").setLevel(logging.ERROR)
            stop = service.stop
            server = make_server(app, host=host, port=port, header_timeout_s=limits.read_timeout_s,
                                 grace_s=limits.grace_s, on_stop=lambda _first: stop())
            if not is_loopback(host):
                console.print(f"[bold yellow]warning:[/] listening on {host}: anyone who can reach it may use the "
                              "models (there is no authentication)", highlight=False)
            where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
            workers = service.devices
            on = f"; {len(workers)} workers: {', '.join(workers)}" if len(workers) > 1 else ""
            console.print(f"serving on {where}  ({'page at /, ' if page else ''}API: POST /segment, GET /health, "
                          f"GET /methods{on}; Ctrl+C stops)", highlight=False)
            server.run()
        finally:
            stuck = service is not None and not service.close()
    if stuck:
        console.print("[bold yellow]warning:[/] a running request did not stop; exiting without it",
                      highlight=False)
    console.print(f"stopped ({server.stop_signal or 'shut down'}); temporary files removed", highlight=False)
    # Everything of ours is closed and removed: end here. The interpreter's own teardown of torch, timm,
    # open_clip and Gradio takes seconds on a busy machine (and a stuck run's thread would block it).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
