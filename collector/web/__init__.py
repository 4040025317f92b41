"""The collector's read-only web page (``outrider collector serve --http HOST:PORT``)."""
from __future__ import annotations

from typing import Any

from collector.base.auth import AuthConfig, AuthInterceptor, TLSFiles
from collector.store.store import Store
from collector.web.access import WebAccess
from collector.web.server import WebServer, serve_web

__all__ = ["WebAccess", "WebServer", "serve_web", "start_web"]


def start_web(listen: str, store: Store, auth: AuthConfig | None, interceptor: AuthInterceptor, agents: Any,
              tls: TLSFiles | None = None) -> WebServer:
    """The page of a running collector: its tokens (refusals counted by ``interceptor``), its TLS
    certificate, and the counters and live streams of its ``agents`` servicer."""

    def counters() -> dict[str, int]:  # what `outrider status` shows, read the same way
        return {**store.counters, "windows_rejected": agents.windows_rejected, "auth_failures": interceptor.failures,
                "write_queue_depth": store.queue_depth()}

    return serve_web(listen, store, WebAccess(auth, interceptor), counters=counters, connected=agents.live.connected,
                     members=agents.fleet.members, tls=tls)
