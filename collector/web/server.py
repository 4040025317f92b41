"""The collector's read-only web page: uvicorn serving a small ASGI app, on a thread of its own.

uvicorn's event loop reads every connection and parses requests (with
``collector.web.guard``'s bounds: a deadline per request, a lifetime per
connection, a cap on connections), so an idle or slow client costs a socket,
never a worker. Only a complete request reaches the page code, which runs in a
fixed pool of worker threads: ``Store.read()`` is one SQLite connection per
thread, and a pool bounds how many there are. TLS (and mutual TLS) is
uvicorn's, from the collector's certificate files.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
from collections.abc import Callable
from typing import Any

from agent import http_thread
from agent.errors import InvalidArgument
from collector.base.auth import TLSFiles, is_loopback
from collector.store.store import Store
from collector.web.access import WebAccess
from collector.web.guard import GuardedH11Protocol
from collector.web.site import MAX_FORM_BYTES, Request, Response, Site, respond

log = logging.getLogger(__name__)

WORKERS = 8


class WebApp:
    """ASGI: gather one request (its body bounded by MAX_FORM_BYTES), answer it from the pool."""

    def __init__(self, site: Site, pool: concurrent.futures.Executor) -> None:
        self.site, self.pool = site, pool

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            if name == "cookie" and name in headers:
                headers[name] += "; " + value
            else:
                headers.setdefault(name, value)
        client = scope.get("client")
        request = Request(scope["method"], scope.get("raw_path", b"").decode("latin-1") or scope["path"],
                          scope.get("query_string", b"").decode("latin-1"), headers,
                          client=client[0] if client else "")
        if request.method == "POST":
            await self._read_body(request, receive)
        response: Response = await asyncio.get_running_loop().run_in_executor(self.pool, respond, self.site, request)
        out = {**response.headers, "Content-Length": str(len(response.body)), "Connection": "close"}
        await send({"type": "http.response.start", "status": response.status,
                    "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in out.items()]})
        await send({"type": "http.response.body", "body": response.body})

    @staticmethod
    async def _read_body(request: Request, receive: Callable) -> None:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_FORM_BYTES:
            request.body_too_large = True  # answered without reading it; the connection closes after
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > MAX_FORM_BYTES:
                request.body_too_large = True
                return
            if not message.get("more_body", False):
                break
        request.body = b"".join(chunks)


class WebServer:
    """The running page: ``url``, ``address``, ``port``, ``stop()``."""

    def __init__(self, listen: str, store: Store, access: WebAccess, *,
                 counters: Callable[[], dict[str, int]] = dict,
                 connected: Callable[[str, str], bool] | None = None, tls: TLSFiles | None = None,
                 refresh: int | None = 10, protocol: type[GuardedH11Protocol] = GuardedH11Protocol,
                 members: Callable[[int], list[dict[str, Any]]] | None = None) -> None:
        self.site = Site(store, access, counters, connected, refresh, secure=tls is not None, members=members)
        self.tls = tls
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]")
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, int(port)))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot serve the web page on {listen}: {exc.strerror or exc}") from None
        self.port = sock.getsockname()[1]
        self.pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="outrider-web")
        self._server, self._thread = http_thread.start(
            WebApp(self.site, self.pool), sock, self.pool, what=f"the web page on {listen}",
            thread_name="outrider-web", tls=tls, http=protocol, lifespan="off")
        log.info("web page on %s", self.url)

    @property
    def access(self) -> WebAccess:
        return self.site.access

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}/"

    def stop(self) -> None:
        """Stop accepting, let the requests in hand finish (uvicorn gives them a few seconds)."""
        self._server.should_exit = True
        self._thread.join()
        self.pool.shutdown(wait=True)


def serve_web(listen: str, store: Store, access: WebAccess, **kw: Any) -> WebServer:
    """Serve the page on ``listen`` (HOST:PORT, port 0 picks one). Without tokens only a loopback
    address is allowed (InvalidArgument otherwise); OSError when it cannot bind."""
    if access.open and not is_loopback(listen):
        raise InvalidArgument(f"refusing to serve the web page on {listen} without an auth file: pass --auth-file "
                              "or use a loopback address such as 127.0.0.1:8080")
    return WebServer(listen, store, access, **kw)
