"""The collector's read-only web page: an HTTP server on its own threads.

Stdlib ``http.server`` with a fixed pool of worker threads rather than a
thread per request: each worker keeps its one read connection to the store
(``Store.read()`` is per thread), and a flood of connections gets a quick 503
instead of an unbounded queue. HTTP/1.0, so an idle browser holds no worker.
Every page is drawn on the server (HTML + inline SVG) with a strict Content
Security Policy: no script at all, the one stylesheet allowed by its hash.
"""
from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import http.cookies
import http.server
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from agent.errors import InvalidArgument, NotFound, Unavailable
from collector.auth import TLSFiles, is_loopback
from collector.store import Store
from collector.web.access import COOKIE, SESSION_SECONDS, Refusal, WebAccess
from collector.web.html import CSS, Markup, el, layout
from collector.web.model_page import model_page
from collector.web.pages import approvals_page, audit_page, fleet_page, local_path, login_form, retraining_page

log = logging.getLogger(__name__)

WORKERS = 8
MAX_PENDING = 64  # connections accepted and not yet answered; past it: 503
MAX_FORM_BYTES = 8192
_CSS_HASH = base64.b64encode(hashlib.sha256(CSS.encode("utf-8")).digest()).decode()
HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; img-src data:; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "[::1]"})


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _PooledServer
    timeout = 10  # a client that stops sending (or a browser's idle preconnect) frees its worker
    server_version = "outrider-collector"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002  (the base class's name)
        log.debug("web %s: " + format, self.address_string(), *args)

    # -------------------------------------------------------- responses

    def _send(self, status: int, body: bytes, content_type: str = "text/html; charset=utf-8",
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in {**HEADERS, "Content-Type": content_type, "Content-Length": str(len(body)),
                            **(extra or {})}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _page(self, status: int, title: str, body: Any, who: str = "", extra: dict[str, str] | None = None,
              refresh: int | None = None) -> None:
        web = self.server.web
        self._send(status, layout(title, body, who=who, can_logout=bool(who) and not web.access.open,
                                  refresh=refresh), extra=extra)

    def _login(self, refusal: Refusal, next_path: str) -> None:
        extra = {"WWW-Authenticate": 'Bearer realm="outrider"'} if refusal.status == 401 else None
        self._page(refusal.status, "Log in", login_form(refusal.message, next_path), extra=extra)

    # -------------------------------------------------------- requests

    def _host_allowed(self) -> bool:
        """Without tokens the page trusts loopback callers: refuse a Host that is not loopback, so a
        web site rebinding its DNS name to 127.0.0.1 cannot read the page through a browser."""
        if not self.server.web.access.open:
            return True
        host = (self.headers.get("Host") or "").strip().lower()
        name = host.rsplit(":", 1)[0] if host.count(":") <= 1 or host.startswith("[") else host
        if name.startswith("[") and "]" in name:
            name = name[1:name.index("]")]
        return name in LOOPBACK_NAMES or name.startswith("127.")

    def _cookies(self) -> dict[str, str]:
        jar = http.cookies.SimpleCookie()
        try:
            jar.load(self.headers.get("Cookie") or "")
        except http.cookies.CookieError:
            return {}
        return {key: morsel.value for key, morsel in jar.items()}

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if url.path == "/healthz":
            self._send(200, b"ok\n", "text/plain; charset=utf-8")
            return
        if not self._host_allowed():
            self._page(403, "Refused", el("p", "this collector serves its page without tokens on loopback only: "
                                                "open it as http://127.0.0.1:PORT/"))
            return
        web = self.server.web
        if url.path == "/login":
            self._page(200, "Log in", login_form("", parse_qs(url.query).get("next", ["/"])[0]))
            return
        who = web.access.check(self.headers, self._cookies(), url.path)
        if isinstance(who, Refusal):
            self._login(who, self.path)
            return
        try:
            title, body = self._route(url.path, parse_qs(url.query))
        except NotFound as exc:
            self._page(404, "Not found", el("p", str(exc)), who=who.name)
        except InvalidArgument as exc:
            self._page(400, "Bad request", el("p", str(exc)), who=who.name)
        except Unavailable as exc:
            self._page(503, "Unavailable", el("p", str(exc)), who=who.name)
        except Exception:
            log.exception("web page %s failed", url.path)
            self._page(500, "Error", el("p", "the page failed; the collector's log says why"), who=who.name)
        else:
            self._page(200, title, body, who=who.name, refresh=web.refresh)

    def _route(self, path: str, query: dict[str, list[str]]) -> tuple[str, Markup]:
        web = self.server.web
        now = time.time_ns()
        one = {k: v[0] for k, v in query.items()}
        if path == "/":
            return fleet_page(web.store, now, web.counters(), web.connected)
        if path.startswith("/models/") and len(path) > len("/models/"):
            return model_page(web.store, unquote(path[len("/models/"):]), one.get("version", ""), now)
        if path == "/approvals":
            return approvals_page(web.store)
        if path == "/retraining":
            return retraining_page(web.store)
        if path == "/audit":
            before = one.get("before", "0")
            if not before.isdigit():
                raise InvalidArgument(f"before={before!r} is not an audit entry id")
            return audit_page(web.store, one.get("model", ""), int(before))
        raise NotFound(f"there is no page {path}; start at /")

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        web = self.server.web
        if not self._host_allowed() or url.path not in ("/login", "/logout"):
            self._page(405, "Read-only", el("p", "this page only reads; change things with the outrider CLI"))
            return
        if url.path == "/logout":
            web.access.logout(self._cookies())
            self._send(303, b"", extra={"Location": "/login", "Set-Cookie": web.cookie("", 0)})
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_FORM_BYTES:
            self._page(413, "Log in", el("p", f"the login form must be under {MAX_FORM_BYTES} bytes"))
            return
        form = parse_qs(self.rfile.read(int(length)).decode("utf-8", "replace"))
        next_path = local_path(form.get("next", ["/"])[0])
        if web.access.open:
            self._send(303, b"", extra={"Location": next_path})
            return
        who, session = web.access.login(form.get("token", [""])[0].strip(), "/login")
        if isinstance(who, Refusal):
            self._login(who, next_path)
            return
        self._send(303, b"", extra={"Location": next_path, "Set-Cookie": web.cookie(session, SESSION_SECONDS)})


class _PooledServer(http.server.HTTPServer):
    def __init__(self, host: str, port: int, web: WebServer) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.web = web
        self.pool = concurrent.futures.ThreadPoolExecutor(WORKERS, thread_name_prefix="outrider-web")
        self._lock = threading.Lock()
        self._pending = 0
        self._open: set[Any] = set()  # connections accepted and not yet answered
        super().__init__((host, port), _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._lock:
            busy = self._pending >= MAX_PENDING
            if not busy:
                self._pending += 1
                self._open.add(request)
        if busy:
            try:
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        self.pool.submit(self._work, request, client_address)

    def _work(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self._lock:
                self._pending -= 1
                self._open.discard(request)

    def end_idle(self) -> None:
        """Stop reading every open connection: a handler waiting for a request that will never
        come (a browser's preconnect) returns at once; one already answering finishes."""
        with self._lock:
            connections = list(self._open)
        for connection in connections:
            try:
                socket.socket.shutdown(connection, socket.SHUT_RD)  # the plain socket's, even under TLS
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("web request from %s failed", client_address, exc_info=True)


class WebServer:
    """The running page: ``url``, ``address``, ``stop()``."""

    def __init__(self, listen: str, store: Store, access: WebAccess, *,
                 counters: Callable[[], dict[str, int]] = dict,
                 connected: Callable[[str, str], bool] | None = None, tls: TLSFiles | None = None,
                 refresh: int | None = 10) -> None:
        self.store, self.access, self.counters, self.connected = store, access, counters, connected
        self.tls, self.refresh = tls, refresh
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]")
        try:
            self._server = _PooledServer(self.host, int(port), self)
        except OSError as exc:
            raise OSError(f"cannot serve the web page on {listen}: {exc.strerror or exc}") from None
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(tls.cert, tls.key)
            if tls.client_ca:
                context.load_verify_locations(tls.client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
            # the handshake then happens on a worker, not on the thread that accepts
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True,
                                                      do_handshake_on_connect=False)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="outrider-web", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}/"

    def cookie(self, session: str, max_age: int) -> str:
        secure = "; Secure" if self.tls else ""
        return f"{COOKIE}={session}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"

    def stop(self) -> None:
        """Stop accepting, let the requests in hand finish."""
        self._server.shutdown()
        self._server.server_close()
        self._server.end_idle()
        self._server.pool.shutdown(wait=True)
        self._thread.join()


def serve_web(listen: str, store: Store, access: WebAccess, **kw: Any) -> WebServer:
    """Serve the page on ``listen`` (HOST:PORT, port 0 picks one). Without tokens only a loopback
    address is allowed (InvalidArgument otherwise); OSError when it cannot bind."""
    if access.open and not is_loopback(listen):
        raise InvalidArgument(f"refusing to serve the web page on {listen} without an auth file: pass --auth-file "
                              "or use a loopback address such as 127.0.0.1:8080")
    return WebServer(listen, store, access, **kw)
