"""Reading OIP REST calls off a copy of an HTTP/1.1 connection's bytes: ``agent.h2tap``'s twin for the relay.

The relay (``agent.proxy_relay``) feeds each direction's chunks in order; httptools (llhttp, the C
parser uvicorn uses) follows them, and each request is paired with the next response, in order, as
HTTP/1.1 answers them. A call comes back when its response is complete: method, path, the request's
and the reply's ``Inference-Header-Content-Length`` and bodies, the status, and the time between the
request's first bytes and the response's last.

What the tap cannot follow it stops on (``broken``; the relay counts the connection as unobserved and
still relays it): bytes that are not HTTP/1.1, an upgrade (h2c, websockets), a HEAD request (its
response may state a length it does not send). A body over ``max_message_bytes`` is not kept: its
call comes back without it and is counted, not summarised.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import httptools

from agent.h2tap import TapError

LENGTH_HEADER = b"inference-header-content-length"


@dataclass
class RestCall:
    """One HTTP/1.1 exchange as it crossed the connection."""

    method: str                 # GET, POST, ...
    path: str                   # the request target, query included
    request: bytes | None       # the request's body (None: over the bound)
    request_length: str | None  # its Inference-Header-Content-Length
    status: int
    reply: bytes | None         # the response's body (None: over the bound)
    reply_length: str | None
    latency_ns: int


@dataclass
class _Message:
    started_ns: int = 0
    target: bytearray = field(default_factory=bytearray)
    length: str | None = None
    body: bytearray = field(default_factory=bytearray)
    too_big: bool = False
    method: str = ""


class _Side:
    """httptools' callbacks for one direction."""

    def __init__(self, tap: Http1Tap, requests: bool) -> None:
        self.tap, self.requests = tap, requests
        self.message = _Message()

    def on_message_begin(self) -> None:
        self.message = _Message(started_ns=self.tap.now_ns)

    def on_url(self, url: bytes) -> None:
        self.message.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == LENGTH_HEADER:
            self.message.length = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        message = self.message
        if message.too_big:
            return
        if len(message.body) + len(body) > self.tap.max_message_bytes:
            message.too_big = True
            message.body.clear()
        else:
            message.body += body

    def on_message_complete(self) -> None:
        self.tap.complete(self, self.message)


class Http1Tap:
    """One connection, both directions; feed each chunk in order, get the exchanges that completed."""

    def __init__(self, *, max_message_bytes: int = 64 << 20) -> None:
        self.max_message_bytes = max_message_bytes
        self.broken = False
        self.why = ""     # why the tap stopped
        self.skipped = 0  # exchanges whose request or reply was over the bound
        self.now_ns = 0
        self._waiting: deque[_Message] = deque()  # requests sent, not yet answered, oldest first
        self._done: list[RestCall] = []
        self._request_side, self._response_side = _Side(self, True), _Side(self, False)
        self._requests = httptools.HttpRequestParser(self._request_side)
        self._responses = httptools.HttpResponseParser(self._response_side)

    def client(self, chunk: bytes, now_ns: int) -> list[RestCall]:
        return self._feed(self._requests, chunk, now_ns)

    def server(self, chunk: bytes, now_ns: int) -> list[RestCall]:
        return self._feed(self._responses, chunk, now_ns)

    def pending(self) -> list[tuple[int, str, int]]:
        """(0, path, started_ns) of the requests sent and not yet answered."""
        return [(0, m.target.decode("latin-1"), m.started_ns) for m in list(self._waiting)]

    def abandon(self, now_ns: int) -> list[RestCall]:
        """The requests sent and never answered (the connection ended first), as calls answered 503."""
        calls = [RestCall(m.method, m.target.decode("latin-1"), None if m.too_big else bytes(m.body), m.length, 503,
                          None, None, now_ns - m.started_ns) for m in self._waiting]
        self._waiting.clear()
        return calls

    def _feed(self, parser: httptools.HttpRequestParser | httptools.HttpResponseParser, chunk: bytes,
              now_ns: int) -> list[RestCall]:
        if self.broken:
            return []
        self.now_ns = now_ns
        self._done = []
        try:
            parser.feed_data(chunk)
        except httptools.HttpParserUpgrade:
            self._stop("the connection was upgraded to another protocol")
        except (httptools.HttpParserError, ValueError) as exc:  # a callback's TapError comes back wrapped so
            self._stop(self.why or f"not HTTP/1.1 as the tap can follow it ({exc})")
        return self._done

    def _stop(self, why: str) -> None:
        self.broken, self.why = True, why
        self._waiting.clear()
        raise TapError(why)

    def complete(self, side: _Side, message: _Message) -> None:
        if side.requests:
            message.method = self._requests.get_method().decode("latin-1")
            if message.method == "HEAD":
                self._stop("a HEAD request: its response's length cannot be read from its headers")
            self._waiting.append(message)
            return
        status = self._responses.get_status_code()
        if 100 <= status < 200:  # an interim answer (100 Continue): the request's real answer follows
            return
        if not self._waiting:
            self._stop("a response to no request")
        request = self._waiting.popleft()
        if request.too_big or message.too_big:
            self.skipped += 1
        self._done.append(RestCall(request.method, request.target.decode("latin-1"),
                                   None if request.too_big else bytes(request.body), request.length, status,
                                   None if message.too_big else bytes(message.body), message.length,
                                   self.now_ns - request.started_ns))
