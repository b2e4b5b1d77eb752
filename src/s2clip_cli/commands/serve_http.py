"""The HTTP server under `s2clip serve` (uvicorn with its h11 protocol), with what uvicorn lacks for
a service facing untrusted clients:

- a header timeout: a connection must send complete request headers within `header_timeout_s` of
  connecting (or of its first byte after a keep-alive pause); uvicorn alone keeps half-sent headers
  open forever. (Request bodies are timed by `serve_api.ClientGuard`, idle keep-alive connections by
  uvicorn's `timeout_keep_alive`.)
- a stop that `run_serve` finishes: SIGINT/SIGTERM call `on_stop` and stop the server, and the signal
  is not raised again afterwards (uvicorn re-raises it once it has shut down, which kills the process
  with -15 before s2clip's own clean-up runs).

Needs the ``serve`` extra.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this (uvicorn's default)

log = logging.getLogger("uvicorn.error")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request headers (`header_timeout_s`)."""

    header_timeout_s: float = 20.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm_header_deadline()  # a fresh connection owes its first request's headers

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._watch_headers()  # a pipelined request's headers may be pending

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        """Armed while part of a request's headers has arrived and the rest has not; the deadline
        counts from the first byte (more bytes do not push it back)."""
        if self.transport.is_closing():
            self._cancel_header_deadline()
        elif self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
            self._arm_header_deadline()
        elif self.conn.their_state is not h11.IDLE:
            self._cancel_header_deadline()

    def _arm_header_deadline(self) -> None:
        if self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_overdue)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_overdue(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        pending = len(self.conn.trailing_data[0])
        if pending:  # a connection that sent nothing (a browser's spare one) is closed silently
            who = f"client {self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.warning("closed the connection of %s: its request headers were incomplete after %g s (%d bytes)",
                        who, self.header_timeout_s, pending)
        with contextlib.suppress(h11.LocalProtocolError):
            self.conn.send(h11.ConnectionClosed())
        self.transport.close()


def guarded_protocol(header_timeout_s: float) -> type[GuardedH11Protocol]:
    """`GuardedH11Protocol` with its header timeout set (uvicorn builds one protocol per connection)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout_s": float(header_timeout_s)})


class StoppableServer(uvicorn.Server):
    """uvicorn's server where SIGINT/SIGTERM start a graceful stop (`on_stop(first)` is called; a second
    signal stops waiting for open connections) and are not raised again once the server has stopped."""

    def __init__(self, config: uvicorn.Config, on_stop: Callable[[bool], None] | None = None) -> None:
        super().__init__(config)
        self.on_stop = on_stop
        self.stop_signal: str | None = None  # the first signal that stopped it

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only (a server run from a thread, as in tests)
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        first = self.stop_signal is None
        if first:
            self.stop_signal = signal.Signals(sig).name
        self.should_exit = True
        self.force_exit = not first  # a second signal: stop waiting for open connections
        if self.on_stop is not None:
            self.on_stop(first)


def make_server(app: Any, *, host: str, port: int, header_timeout_s: float, grace_s: float,
                on_stop: Callable[[bool], None] | None = None) -> StoppableServer:
    """The uvicorn server for `app`: h11 with the header deadline, warnings only in the log, open
    connections given `grace_s` (and half a second for the answers to go out) when it stops."""
    config = uvicorn.Config(app, host=host, port=port, http=guarded_protocol(header_timeout_s),
                            log_level="warning", access_log=False, timeout_keep_alive=KEEP_ALIVE_S,
                            timeout_graceful_shutdown=grace_s + 0.5)  # type: ignore[arg-type]  # a float is fine
    return StoppableServer(config, on_stop)
