"""What the web page answers: one complete request in, one response out, plain Python.

The HTTP server (``collector.web.server``) parses requests and calls
``respond`` on a worker thread only once a request is complete; nothing here
knows about sockets. Every page is drawn on the server (HTML + inline SVG)
with a strict Content Security Policy: no script at all, the one stylesheet
allowed by its hash. A caller's mistake is a 4xx with a sentence; only a bug
is a 500 (logged with its traceback).
"""
from __future__ import annotations

import base64
import hashlib
import http.cookies
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

from agent.errors import InvalidArgument, NotFound, Unavailable
from collector.store.store import Store
from collector.web.access import COOKIE, SESSION_SECONDS, Refusal, WebAccess
from collector.web.html import CSS, Markup, el, layout
from collector.web.model_page import model_page
from collector.web.pages import approvals_page, audit_page, fleet_page, local_path, login_form, retraining_page

log = logging.getLogger(__name__)

MAX_FORM_BYTES = 8192
MAX_ID = 2**63 - 1  # SQLite's INTEGER
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


@dataclass
class Request:
    method: str
    path: str  # as sent, still percent-encoded (a model name may hold an encoded "/")
    query: str
    headers: Mapping[str, str]  # lower-case names
    client: str = ""  # the caller's address
    body: bytes = b""
    body_too_large: bool = False  # the server stopped reading past MAX_FORM_BYTES

    @property
    def target(self) -> str:
        return self.path + ("?" + self.query if self.query else "")


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Site:
    """The page's state: where it reads, who may read it, what it shows besides the store."""

    store: Store
    access: WebAccess
    counters: Callable[[], dict[str, int]] = dict
    connected: Callable[[str, str], bool] | None = None
    refresh: int | None = 10
    secure: bool = False  # served over TLS: cookies get Secure
    members: Callable[[int], list[dict[str, Any]]] | None = None  # the collectors sharing the database

    def cookie(self, session: str, max_age: int) -> str:
        secure = "; Secure" if self.secure else ""
        return f"{COOKIE}={session}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"


def respond(site: Site, request: Request) -> Response:
    """The response to one complete request."""
    try:
        if request.method in ("GET", "HEAD"):  # the server leaves HEAD's body out
            return _get(site, request)
        if request.method == "POST":
            return _post(site, request)
        return _page(site, 405, "Read-only", el("p", "this page only reads; change things with the outrider CLI"),
                     extra={"Allow": "GET, HEAD, POST"})
    except Exception:
        log.exception("web page %s failed", request.path[:200])
        return _page(site, 500, "Error", el("p", "the page failed; the collector's log says why"))


def _send(status: int, body: bytes, content_type: str = "text/html; charset=utf-8",
          extra: dict[str, str] | None = None) -> Response:
    return Response(status, body, {**HEADERS, "Content-Type": content_type, **(extra or {})})


def _page(site: Site, status: int, title: str, body: Any, who: str = "", extra: dict[str, str] | None = None,
          refresh: int | None = None) -> Response:
    return _send(status, layout(title, body, who=who, can_logout=bool(who) and not site.access.open,
                                refresh=refresh), extra=extra)


def _login(site: Site, refusal: Refusal, next_path: str) -> Response:
    extra = {"WWW-Authenticate": 'Bearer realm="outrider"'} if refusal.status == 401 else {}
    if refusal.retry_after:
        extra["Retry-After"] = str(refusal.retry_after)
    return _page(site, refusal.status, "Log in", login_form(refusal.message, next_path), extra=extra)


def _host_allowed(site: Site, request: Request) -> bool:
    """Without tokens the page trusts loopback callers: refuse a Host that is not loopback, so a
    web site rebinding its DNS name to 127.0.0.1 cannot read the page through a browser."""
    if not site.access.open:
        return True
    host = request.headers.get("host", "").strip().lower()
    name = host.rsplit(":", 1)[0] if host.count(":") <= 1 or host.startswith("[") else host
    if name.startswith("[") and "]" in name:
        name = name[1:name.index("]")]
    return name in LOOPBACK_NAMES or name.startswith("127.")


def _cookies(request: Request) -> dict[str, str]:
    jar = http.cookies.SimpleCookie()
    try:
        jar.load(request.headers.get("cookie", ""))
    except http.cookies.CookieError:
        return {}
    return {key: morsel.value for key, morsel in jar.items()}


def _get(site: Site, request: Request) -> Response:
    if request.path == "/healthz":
        return _send(200, b"ok\n", "text/plain; charset=utf-8")
    if not _host_allowed(site, request):
        return _page(site, 403, "Refused", el("p", "this collector serves its page without tokens on loopback only: "
                                                   "open it as http://127.0.0.1:PORT/"))
    query = parse_qs(request.query)
    if request.path == "/login":
        return _page(site, 200, "Log in", login_form("", query.get("next", ["/"])[0]))
    who = site.access.check(request.headers, _cookies(request), request.path, request.client)
    if isinstance(who, Refusal):
        return _login(site, who, request.target)
    try:
        title, body = _route(site, request.path, {k: v[0] for k, v in query.items()})
    except NotFound as exc:
        return _page(site, 404, "Not found", el("p", str(exc)), who=who.name)
    except InvalidArgument as exc:
        return _page(site, 400, "Bad request", el("p", str(exc)), who=who.name)
    except Unavailable as exc:
        return _page(site, 503, "Unavailable", el("p", str(exc)), who=who.name)
    return _page(site, 200, title, body, who=who.name, refresh=site.refresh)


def _route(site: Site, path: str, query: dict[str, str]) -> tuple[str, Markup]:
    now = time.time_ns()
    if path == "/":
        return fleet_page(site.store, now, site.counters(), site.connected,
                          site.members(now) if site.members is not None else [])
    if path.startswith("/models/") and len(path) > len("/models/"):
        return model_page(site.store, unquote(path[len("/models/"):]), query.get("version", ""), now)
    if path == "/approvals":
        return approvals_page(site.store)
    if path == "/retraining":
        return retraining_page(site.store)
    if path == "/audit":
        before = query.get("before", "0")
        if not (before.isascii() and before.isdigit()) or int(before) > MAX_ID:
            raise InvalidArgument(f"before={before[:40]!r} is not an audit entry id (a whole number below 2**63)")
        return audit_page(site.store, query.get("model", ""), int(before))
    raise NotFound(f"there is no page {path[:200]}; start at /")


def _post(site: Site, request: Request) -> Response:
    if not _host_allowed(site, request) or request.path not in ("/login", "/logout"):
        return _page(site, 405, "Read-only", el("p", "this page only reads; change things with the outrider CLI"),
                     extra={"Allow": "GET, HEAD"})
    if request.path == "/logout":
        site.access.logout(_cookies(request))
        return _send(303, b"", extra={"Location": "/login", "Set-Cookie": site.cookie("", 0)})
    if request.body_too_large:
        return _page(site, 413, "Log in", el("p", f"the login form must be under {MAX_FORM_BYTES} bytes"))
    form = parse_qs(request.body.decode("utf-8", "replace"))
    next_path = local_path(form.get("next", ["/"])[0])
    if site.access.open:
        return _send(303, b"", extra={"Location": next_path})
    who, session = site.access.login(form.get("token", [""])[0].strip(), "/login", request.client)
    if isinstance(who, Refusal):
        return _login(site, who, next_path)
    return _send(303, b"", extra={"Location": next_path, "Set-Cookie": site.cookie(session, SESSION_SECONDS)})
