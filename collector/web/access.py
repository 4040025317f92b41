"""Who may read the web page: the collector's operator tokens (viewer or above), checked by
``collector.base.auth``; a login form trades a token for a session cookie.

A bearer header works for scripts; browsers log in once and carry an HttpOnly,
SameSite=Strict cookie naming a random session kept here in memory (the token
itself never sits in the browser). Refusals are counted and audited like the
gRPC port's (``AuthInterceptor.count_refusal``, with the client's address), except a
request that brings no credentials at all: that is a browser's first visit,
answered with the login page. Tokens that are not in the auth file, from the
form or a header, count against the client's address (``LoginThrottle``):
past a few a minute it gets 429 without its token being looked at.
"""
from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import NamedTuple

from collector.base.auth import LOCAL, AuthConfig, AuthInterceptor, Identity, role_at_least
from collector.web.throttle import LoginThrottle

log = logging.getLogger(__name__)

COOKIE = "outrider_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000  # oldest sessions are forgotten past this (bounded memory)
NEEDED_ROLE = "viewer"


class Refusal(NamedTuple):
    status: int  # 401: log in (again); 403: a valid token that may not read the page; 429: wait
    message: str
    retry_after: int = 0  # seconds, with 429


class WebAccess:
    def __init__(self, config: AuthConfig | None, interceptor: AuthInterceptor | None = None,
                 throttle: LoginThrottle | None = None) -> None:
        self.config = config
        self.interceptor = interceptor
        self.throttle = throttle if throttle is not None else LoginThrottle()
        self._sessions: OrderedDict[str, tuple[Identity, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        """No auth file: every (loopback) caller is ``LOCAL``."""
        return self.config is None

    def check(self, headers: Mapping[str, str], cookies: Mapping[str, str], path: str,
              client: str = "") -> Identity | Refusal:
        """Who sent a request (``headers`` with lower-case names), from ``client`` (its address)."""
        if self.config is None:
            return LOCAL
        header = headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return self._failed(client, path, "malformed Authorization header: expected 'Bearer <token>'")
            return self.identify(token.strip(), path, client)
        session = cookies.get(COOKIE)
        if session:
            with self._lock:
                found = self._sessions.get(session)
                if found is not None and found[1] < time.monotonic():
                    del self._sessions[session]
                    found = None
            if found is not None:
                return found[0]
            return Refusal(401, "your session has ended: log in again")
        return Refusal(401, "log in with an operator token (viewer or above)")

    def identify(self, token: str, path: str, client: str = "") -> Identity | Refusal:
        """The operator a token names, or a counted refusal; a throttled ``client`` is refused
        before its token is looked at."""
        assert self.config is not None
        wait = self.throttle.wait(client)
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            return self.refuse(None, path, 429, f"too many unknown tokens from your address: try again in "
                                                f"{seconds} s", client=client, retry_after=seconds,
                               audited="too many unknown tokens from this address: throttled")
        identity = self.config.authenticate(token)
        if identity is None:
            return self._failed(client, path, "unknown token: it is not in the collector's auth file")
        if identity.kind != "operator":
            return self.refuse(identity, path, 403, f"{identity.kind} {identity.name!r} cannot read the web page: "
                                                    f"it needs an operator token ({NEEDED_ROLE} or above)",
                               client=client)
        if not role_at_least(identity.role, NEEDED_ROLE):
            return self.refuse(identity, path, 403, f"operator {identity.name!r} has role {identity.role!r}; "
                                                    f"the web page needs {NEEDED_ROLE} or above", client=client)
        return identity

    def _failed(self, client: str, path: str, message: str) -> Refusal:
        """A token that is not in the auth file: counted against the client's address."""
        self.throttle.failed(client)
        return self.refuse(None, path, 401, message, client=client)

    def login(self, token: str, path: str = "/login", client: str = "") -> tuple[Identity | Refusal, str]:
        """(identity, new session id) for a good token; (refusal, "") otherwise."""
        identity = self.identify(token, path, client)
        if isinstance(identity, Refusal):
            return identity, ""
        session = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[session] = (identity, time.monotonic() + SESSION_SECONDS)
            while len(self._sessions) > MAX_SESSIONS:
                self._sessions.popitem(last=False)
        return identity, session

    def logout(self, cookies: Mapping[str, str]) -> None:
        with self._lock:
            self._sessions.pop(cookies.get(COOKIE, ""), None)

    def refuse(self, identity: Identity | None, path: str, status: int, message: str, *, client: str = "",
               retry_after: int = 0, audited: str = "") -> Refusal:
        """A counted and audited refusal (``audited``: the reason recorded, when ``message`` varies)."""
        actor = identity.name if identity else "anonymous"
        if self.interceptor is not None:  # one counter, one audit path and its log lines for both ports
            self.interceptor.count_refusal(actor, f"http{path[:200]}", audited or message, client)
        else:
            log.warning("web page refused %s from %s: %s", path, client or "unknown", message)
        return Refusal(status, message, retry_after)
