"""uvicorn serving ``agent.rest.app.RestApp`` on a thread of the agent.

uvicorn parses HTTP with httptools (C, llhttp) when it is installed, h11 (pure
Python) otherwise; its event loop holds every connection, and the app hands
each request to a fixed pool of worker threads. The socket is ours, bound
before uvicorn starts, so a bad address fails in the caller with OSError, port
0 becomes a concrete port, and SO_REUSEPORT lets the processes of
``agent serve --processes N`` share it.
"""
from __future__ import annotations

import concurrent.futures
import logging
import socket
from collections.abc import Callable
from typing import Any

from agent import http_thread
from agent.rest.app import RestApp
from agent.rest.backend import Backend
from agent.tokens import ClientAuth, TLSFiles

log = logging.getLogger(__name__)

BACKLOG = 2048
# A request arriving while this many connections are open (or requests in flight) is answered with
# uvicorn's plain-text 503 instead of being run: with the app's body budgets, a bound on what a crowd
# of clients can make the agent hold (an idle connection costs a socket and its small buffers).
MAX_CONNECTIONS = 1000


class RestServer:
    """The running REST endpoint: ``port``, ``url``, ``refusals()``, ``stop()``."""

    def __init__(self, backend: Backend, listen: str, *, workers: int = 8, max_body_bytes: int = 64 * 1024 * 1024,
                 metrics: Any = None, auth: ClientAuth | None = None, tls: TLSFiles | None = None,
                 reuse_port: bool = False, app: Callable[[concurrent.futures.Executor], Any] | None = None) -> None:
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]")
        self.tls = tls
        sock = _bind(self.host, int(port), reuse_port, listen)
        self.port: int = sock.getsockname()[1]
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="outrider-rest")
        # ``app``: another ASGI app on the same server (agent proxy's); it takes the lifespan events, to open
        # and close what it holds on the event loop
        self.app = (RestApp(backend, self.pool, max_body_bytes=max_body_bytes, metrics=metrics, auth=auth)
                    if app is None else app(self.pool))
        self._server, self._thread = http_thread.start(
            self.app, sock, self.pool, what=f"REST on {listen}", thread_name="outrider-rest", tls=tls, http="auto",
            lifespan="off" if app is None else "on", date_header=False, backlog=BACKLOG,
            limit_concurrency=MAX_CONNECTIONS)
        self._stopped = False
        log.info("Open Inference Protocol over HTTP on %s", self.url)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls is not None else 'http'}://{self.address}"

    def refusals(self) -> dict[str, int]:
        return self.app.refusals()

    def stop(self) -> None:
        """Stop accepting, finish the requests in flight (uvicorn's graceful shutdown), then the pool."""
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        self._server.should_exit = True
        self._thread.join(10)
        self.pool.shutdown(wait=True)


def _bind(host: str, port: int, reuse_port: bool, listen: str) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # only when asked (--processes): else a second agent on a busy port steals half its traffic
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot serve REST on {listen}: {exc.strerror or exc}") from None
    return sock


def serve_rest(backend: Backend, listen: str, **options: Any) -> RestServer:
    """Start the REST endpoint for ``backend`` on ``listen`` (HOST:PORT; port 0 picks one); OSError if it cannot."""
    return RestServer(backend, listen, **options)
