"""Driver of `s2clip serve`: load the models once, then serve the web page and the HTTP API from one
process (uvicorn). The pieces: `serve_service` (models, queue, request checks; no web
dependency), `serve_api` (FastAPI routes), `serve_page` (Gradio page). Needs the ``serve`` extra
(`missing_extra` says so in one line without importing anything heavy)."""

from __future__ import annotations

import importlib.util
import ipaddress
import socket
import warnings

from rich.console import Console

from ..errors import S2ClipError
from .serve_service import SegmentService, ServeSettings

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
    """The FastAPI app with the API routes and, unless `page` is False, the Gradio page at ``/``."""
    from .serve_api import create_app

    app = create_app(service)
    if page:
        import gradio as gr

        from .serve_page import CSS, build_page

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = build_page(service)
            app = gr.mount_gradio_app(app, blocks, path="/", max_file_size=service.limits.max_upload_bytes,
                                      footer_links=[], css=CSS, ssr_mode=False, mcp_server=False)
    return app


def run_serve(settings: ServeSettings, *, host: str, port: int, page: bool, console: Console) -> None:
    """Load the models, then serve until interrupted."""
    hint = missing_extra()
    if hint:
        raise S2ClipError(hint)
    import uvicorn

    check_port(host, port)
    with console.status("loading models…"):
        service = SegmentService(settings)
        app = build_app(service, page=page)
    if not is_loopback(host):
        console.print(f"[bold yellow]warning:[/] listening on {host}: anyone who can reach it may use the "
                      "models (there is no authentication)", highlight=False)
    where = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    console.print(f"serving on {where}  ({'page at /, ' if page else ''}API: POST /segment, GET /health, "
                  "GET /methods; Ctrl+C stops)", highlight=False)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5)
    finally:
        service.close()
