"""Who may read the web page: the collector's operator tokens (viewer or above), checked by
``collector.auth``; a login form trades a token for a session cookie.

A bearer header works for scripts; browsers log in once and carry an HttpOnly,
SameSite=Strict cookie naming a random session kept here in memory (the token
itself never sits in the browser). Refusals are counted and audited like the
gRPC port's (``AuthInterceptor.count_refusal``), except a
request that brings no credentials at all: that is a browser's first visit,
answered with the login page.
"""
from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import NamedTuple

from collector.auth import LOCAL, AuthConfig, AuthInterceptor, Identity, role_at_least

log = logging.getLogger(__name__)

COOKIE = "outrider_session"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 1000  # oldest sessions are forgotten past this (bounded memory)
NEEDED_ROLE = "viewer"


class Refusal(NamedTuple):
    status: int  # 401: log in (again); 403: a valid token that may not read the page
    message: str


class WebAccess:
    def __init__(self, config: AuthConfig | None, interceptor: AuthInterceptor | None = None) -> None:
        self.config = config
        self.interceptor = interceptor
        self._sessions: OrderedDict[str, tuple[Identity, float]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        """No auth file: every (loopback) caller is ``LOCAL``."""
        return self.config is None

    def check(self, headers: Mapping[str, str], cookies: Mapping[str, str], path: str) -> Identity | Refusal:
        if self.config is None:
            return LOCAL
        header = headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                return self.refuse(None, path, 401, "malformed Authorization header: expected 'Bearer <token>'")
            return self.identify(token.strip(), path)
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

    def identify(self, token: str, path: str) -> Identity | Refusal:
        """The operator a token names, or a counted refusal."""
        assert self.config is not None
        identity = self.config.authenticate(token)
        if identity is None:
            return self.refuse(None, path, 401, "unknown token: it is not in the collector's auth file")
        if identity.kind != "operator":
            return self.refuse(identity, path, 403, f"{identity.kind} {identity.name!r} cannot read the web page: "
                                                    f"it needs an operator token ({NEEDED_ROLE} or above)")
        if not role_at_least(identity.role, NEEDED_ROLE):
            return self.refuse(identity, path, 403, f"operator {identity.name!r} has role {identity.role!r}; "
                                                    f"the web page needs {NEEDED_ROLE} or above")
        return identity

    def login(self, token: str, path: str = "/login") -> tuple[Identity | Refusal, str]:
        """(identity, new session id) for a good token; (refusal, "") otherwise."""
        identity = self.identify(token, path)
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

    def refuse(self, identity: Identity | None, path: str, status: int, message: str) -> Refusal:
        log.warning("web page refused %s: %s", path, message)
        if self.interceptor is not None:  # one counter and one audit path for both ports
            self.interceptor.count_refusal(identity.name if identity else "anonymous", f"http{path[:200]}", message)
        return Refusal(status, message)
