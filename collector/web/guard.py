"""uvicorn's HTTP/1.1 protocol with the two bounds it leaves out: connections and time per request.

uvicorn reads every connection on one event loop, so a client that connects
and sends nothing costs a socket, not a worker; but it never closes such a
connection (its keep-alive timer starts only after a first response, and
every byte received resets it), and it accepts connections without a limit.
This subclass of its ``H11Protocol`` (the ``http`` class uvicorn takes) adds:

- a deadline from connect to a complete request (headers and body): a
  client that says nothing, or trickles its request a byte at a time, is
  answered 408 and closed when it passes;
- a lifetime for the whole connection, so a client that stops reading its
  response cannot hold the connection either;
- at most ``max_connections`` open at once; one more is answered 503 and
  closed at once, before a byte of it is read.

Only ``connection_made``, ``data_received`` and ``connection_lost`` are
extended, with uvicorn's own ``connections``, ``cycle``, ``loop`` and
``transport``; ``tests/test_web.py`` holds idle and trickling connections
against a real server so an upgrade that breaks this fails there.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

REQUEST_SECONDS = 10.0
CONNECTION_SECONDS = 120.0
MAX_CONNECTIONS = 256
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\n"
         b"Content-Length: 28\r\nConnection: close\r\n\r\ntoo many connections: retry\n")
_TOO_SLOW = (b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\nContent-Length: 34\r\n"
             b"Connection: close\r\n\r\nthe request took too long to send\n")


class GuardedH11Protocol(H11Protocol):
    request_seconds = REQUEST_SECONDS
    connection_seconds = CONNECTION_SECONDS
    max_connections = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._request_timer: asyncio.TimerHandle | None = None
        self._life_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            log.warning("web page: %d connections open, refusing one more from %s", len(self.connections) - 1,
                        self.client[0] if self.client else "?")
            transport.write(_BUSY)
            transport.close()
            return
        self._request_timer = self.loop.call_later(self.request_seconds, self._too_slow)
        self._life_timer = self.loop.call_later(self.connection_seconds, self._too_long)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        cycle = self.cycle
        if self._request_timer is not None and cycle is not None and not cycle.more_body:
            self._request_timer.cancel()  # complete: the page may take its time now
            self._request_timer = None

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._request_timer, self._life_timer):
            if timer is not None:
                timer.cancel()
        super().connection_lost(exc)

    def _too_slow(self) -> None:
        self._request_timer = None
        if not self.transport.is_closing():
            log.info("web page: closed a connection from %s that sent no complete request in %.0f s",
                     self.client[0] if self.client else "?", self.request_seconds)
            self.transport.write(_TOO_SLOW)
            self.transport.close()

    def _too_long(self) -> None:
        self._life_timer = None
        if not self.transport.is_closing() or self.transport.get_write_buffer_size():
            log.info("web page: closed a connection from %s open for %.0f s", self.client[0] if self.client else "?",
                     self.connection_seconds)
            self.transport.abort()  # close() would wait for a reader that stopped reading


def guarded(**bounds: Any) -> type[GuardedH11Protocol]:
    """The protocol class with other bounds (tests use short ones)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), bounds)
