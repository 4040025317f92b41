"""The REST front of ``outrider agent proxy``: OIP over HTTP forwarded to the upstream's REST endpoint.

Every ``/v2/...`` request (health, metadata, infer, and whatever extensions the upstream has) is
sent on with its method, path, query, body and end-to-end headers; the upstream's status,
headers and body bytes come back unchanged. It runs on ``agent.rest``'s server (uvicorn,
httptools) with its body budgets and tokens (``RestApp``); the upstream is reached through one
pooled keep-alive ``aiohttp`` session on the server's event loop: asyncio-native, so a forwarded
call costs no thread hop, with llhttp (C) parsing the replies.

``POST /v2/models/{name}[/versions/{v}]/infer`` of the monitored model is also handed to the
``ProxyMonitor`` (``agent.proxy``) as a decoder over the request's and reply's bytes: the request
path only appends it; the JSON and binary tensors are parsed on the monitor's thread with
``agent.rest.codec``. Request ids as on the gRPC side: a body with a top-level ``id`` is kept
under it; one without is forwarded unchanged, and the proxy's own id comes back in the
``outrider-request-id`` response header. (Whether a body has an id is read without parsing when
``"id"`` does not occur in its JSON part, the common case; else its JSON part is parsed once.)

A managed proxy (``agent.proxy_rollout``) pins ``POST /v2/models/{name}/infer`` of the monitored model
to the version the registry named (``ProxyMonitor.pin``): forwarded as ``/v2/models/{name}/versions/{v}/infer``,
the body and headers unchanged.

An upstream that cannot be reached, or does not answer within ``upstream_timeout``, is a 503
``{"error": ...}`` naming it; every other answer is the upstream's, counted in
``outrider_proxy_calls{method, code}`` with the HTTP status as the code (gRPC's are names).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import time
import urllib.error
import urllib.request
import uuid
from urllib.parse import quote, unquote
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
from yarl import URL

from agent import tensors
from agent.dataplane import ModelMetadata
from agent.errors import NotFound, OutriderError, Unavailable
from agent.exporter import TLSConfig
from agent.proxy import CallCounts, ObservedCall, ProxyMonitor
from agent.rest import codec
from agent.rest.app import RestApp, _error
from agent.rest.server import RestServer
from agent.tokens import ClientAuth, TLSFiles

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "outrider-request-id"
# RFC 9110 7.6.1: headers of one hop, never forwarded (nor any the Connection header names)
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                        b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade"})
# aiohttp adds these when a request lacks them; a forwarded request carries only what its client sent
NOT_ADDED = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})
MAX_UPSTREAM_CONNECTIONS = 256
# The OIP call each REST route is, as outrider_proxy_calls{method} names it on both fronts.
ROUTES = {("", "live"): "ServerLive", ("", "ready"): "ServerReady", ("model", ""): "ModelMetadata",
          ("model", "ready"): "ModelReady", ("model", "infer"): "ModelInfer"}


def route(parts: list[str]) -> tuple[str, str, str]:
    """(OIP method, model name, action) of a /v2 path's parts; method "other" for paths OIP does not define."""
    if parts == ["v2"]:
        return "ServerMetadata", "", ""
    if len(parts) == 3 and parts[1] == "health" and parts[2] in ("live", "ready"):
        return ROUTES["", parts[2]], "", ""
    if len(parts) >= 3 and parts[1] == "models" and parts[2]:
        rest = parts[5:] if len(parts) >= 5 and parts[3] == "versions" else parts[3:]
        if len(rest) <= 1 and (not rest or rest[0] in ("ready", "infer")):
            action = rest[0] if rest else ""
            return ROUTES["model", action], unquote(parts[2]), action
    return "other", "", ""


def _has_id(head: bytes) -> bool:
    """Whether a request's JSON part has a top-level ``id``: read without parsing when it cannot have one."""
    if b'"id"' not in head:
        return False
    try:
        doc = orjson.loads(head)
    except orjson.JSONDecodeError:
        return True  # the upstream refuses it; nothing to keep under an id of ours
    return isinstance(doc, dict) and "id" in doc


def rest_decoder(name: str, body: bytes, header_length: str | None, status: int, reply: bytes | None,
             reply_length: str | None, latency_ns: int, assigned: str, monitored: bool) -> Callable[[], ObservedCall]:
    """Parses the request and reply (bytes the request path only holds on to) on the monitor's thread."""

    def decode() -> ObservedCall:
        if not monitored:  # another model's call: counted, never parsed
            return ObservedCall(name, "", "", [], None, latency_ns)
        if status != 200:  # the upstream's error: counted in the windows whatever the request held
            try:
                request = codec.parse_infer(body, header_length)
                return ObservedCall(name, "", request.request_id or assigned, request.inputs, None, latency_ns)
            except OutriderError:
                return ObservedCall(name, "", assigned, [], None, latency_ns)
        request = codec.parse_infer(body, header_length)
        if reply is None:
            raise OutriderError("a reply of no stated length, or over --max-message-mb, passed through unsummarised")
        _, version, outputs = codec.parse_reply(reply, reply_length)
        return ObservedCall(name, version, request.request_id or assigned, request.inputs, outputs, latency_ns)

    return decode


class ProxyRestApp(RestApp):
    """The ASGI app: ``RestApp``'s budgets and tokens, every /v2 call forwarded to ``upstream`` (HOST:PORT)."""

    def __init__(self, upstream: str, monitor: ProxyMonitor, calls: Any, pool: concurrent.futures.Executor, *,
                 timeout: float, max_body_bytes: int, auth: ClientAuth | None = None,
                 upstream_tls: TLSConfig | None = None) -> None:
        super().__init__(None, pool, max_body_bytes=max_body_bytes, auth=auth)  # type: ignore[arg-type]
        self.upstream, self.monitor, self.timeout = upstream, monitor, timeout
        # read now: a CA or key file that does not load fails the start, not every call
        self._ssl = upstream_tls.ssl_context() if upstream_tls is not None else None
        self._base = f"{'https' if upstream_tls is not None else 'http'}://{upstream}"
        self._counts = CallCounts(calls)
        # host and length are the new hop's; Expect: 100-continue was answered on the client's hop (the whole
        # body is here before it is sent on)
        self._drop = HOP_BY_HOP | {b"host", b"content-length", b"expect"} | \
            ({b"authorization"} if auth is not None else set())
        self._session: aiohttp.ClientSession | None = None
        self._ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:12]

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        raw_path = scope.get("raw_path") or scope["path"].encode()
        parts = raw_path.decode("latin-1").strip("/").split("/")
        method, model, action = route(parts)
        try:
            if parts[0] != "v2":
                raise NotFound(f"no endpoint {scope['path']}; this proxy forwards /v2/... to {self.upstream}")
            if parts[:2] != ["v2", "health"]:  # probes stay open, as on agent serve
                self._check_access(scope["headers"])
            await self._forward(scope, raw_path, method, model if action == "infer" else "", receive, send)
        except Exception as exc:
            await _error(send, exc)

    async def _lifespan(self, receive: Callable, send: Callable) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=MAX_UPSTREAM_CONNECTIONS, ttl_dns_cache=60,
                                                   ssl=self._ssl if self._ssl is not None else True),
                    auto_decompress=False,  # bytes as the upstream sent them
                    skip_auto_headers=NOT_ADDED,
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._session is not None:
                    await self._session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _forward(self, scope: dict[str, Any], raw_path: bytes, method: str, infer_model: str,
                       receive: Callable, send: Callable) -> None:
        headers = scope["headers"]
        named = dict(headers)
        # compressed bodies pass through as they are (RestApp refuses them: it must decode every one)
        body, held = await self._read_body({k: v for k, v in named.items() if k != b"content-encoding"}, receive)
        try:
            await self._exchange(scope, raw_path, method, infer_model, headers, named, body, send)
        finally:
            self._pending -= held

    async def _exchange(self, scope: dict[str, Any], raw_path: bytes, method: str, infer_model: str,
                        headers: list[tuple[bytes, bytes]], named: dict[bytes, bytes], body: bytes,
                        send: Callable) -> None:
        infer = bool(infer_model) and scope["method"] == "POST"
        monitored = infer and infer_model == self.monitor.model_name
        length = named.get(b"inference-header-content-length")
        header_length = length.decode("latin-1") if length is not None else None
        assigned = ""
        if monitored:
            head = body[:int(length)] if length is not None and length.isdigit() else body
            if not _has_id(head):
                assigned = f"{self._id_prefix}-{next(self._ids)}"
        path = raw_path.decode("latin-1")
        pin = self.monitor.pin if monitored else ""
        if pin and len(raw_path.strip(b"/").split(b"/")) == 4:  # /v2/models/{name}/infer names no version:
            # managed, so the registry's version, not the upstream's default
            path = f"{path.rstrip('/').rsplit('/', 1)[0]}/versions/{quote(pin, safe='')}/infer"
        url = self._base + path
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        connection = {t.strip().lower() for t in named.get(b"connection", b"").split(b",")}
        out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers
               if k not in self._drop and k not in connection]
        assert self._session is not None  # opened at lifespan startup, before the first request
        started = time.perf_counter_ns()
        replying = False  # the reply's status line is sent: an upstream failure now can only cut it short
        try:
            async with self._session.request(scope["method"], URL(url, encoded=True), data=body or None,
                                             headers=out, allow_redirects=False) as reply:
                status = reply.status
                drop = HOP_BY_HOP | {t.strip().lower() for t in reply.headers.get("connection", "").encode(
                    "latin-1").split(b",")}
                back = [(k, v) for k, v in reply.raw_headers if k.lower() not in drop]
                size = reply.content_length
                whole = size is not None and size <= self.max_body_bytes
                data = await reply.read() if whole else None
                self._count(method, str(status))
                if infer:  # before the reply goes: a client may send labels as soon as it has it
                    if assigned and status == 200:
                        back.append((REQUEST_ID_HEADER.encode(), assigned.encode()))
                    reply_length = next((v.decode("latin-1") for k, v in back
                                         if k.lower() == b"inference-header-content-length"), None)
                    self.monitor.offer(rest_decoder(infer_model, body, header_length, status, data, reply_length,
                                                time.perf_counter_ns() - started, assigned if status == 200 else "",
                                                monitored))
                replying = True
                await send({"type": "http.response.start", "status": status, "headers": back})
                if data is not None:
                    await send({"type": "http.response.body", "body": data})
                else:  # too large to hold (or of no stated length): streamed on as it comes, not summarised
                    async for chunk in reply.content.iter_any():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    await send({"type": "http.response.body", "body": b""})
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError) as exc:
            self._count(method, "UNREACHABLE")
            if replying:  # uvicorn closes the connection: the client sees a reply cut short, never a wrong one
                log.warning("upstream %s failed in the middle of a reply to %s (%s); the reply was cut short",
                            self.upstream, scope["path"], exc)
                return
            if isinstance(exc, asyncio.TimeoutError):
                why = f"did not answer within {self.timeout:g} s (--upstream-timeout-seconds)"
            else:
                why = f"is unreachable ({exc}); check --upstream-http and that the inference server is running"
            if infer:
                self.monitor.offer(rest_decoder(infer_model, body, header_length, 503, None, None,
                                            time.perf_counter_ns() - started, "", monitored))
            raise Unavailable(f"upstream {self.upstream} {why}") from None

    def _count(self, method: str, code: str) -> None:
        self._counts.count(method, code)


class RestUpstream:
    """The upstream's REST endpoint as ``agent.proxy_grpc._Watch`` reads it: readiness and metadata (stdlib,
    once a second on the watch's thread)."""

    def __init__(self, address: str, timeout: float, tls: TLSConfig | None = None) -> None:
        self.address = address
        self.timeout = min(timeout, 5.0)
        self._ssl = tls.ssl_context() if tls is not None else None
        self._base = f"{'https' if tls is not None else 'http'}://{address}"

    def _get(self, path: str) -> tuple[int, bytes]:
        return self.request("GET", path)

    def request(self, method: str, path: str, body: bytes | None = None,
                timeout: float | None = None) -> tuple[int, bytes]:
        """One call to the upstream: its status and body (an HTTP error is an answer too); OSError when
        it cannot be reached or does not answer within ``timeout`` (default: the metadata's bound)."""
        request = urllib.request.Request(self._base + path, data=body, method=method,
                                         headers={"Content-Type": "application/json"} if body is not None else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout or self.timeout, context=self._ssl) as reply:
                return reply.status, reply.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()

    def model_ready(self, name: str) -> bool:
        try:
            return self._get(f"/v2/models/{urllib.request.quote(name, safe='')}/ready")[0] == 200
        except OSError:
            return False

    def metadata(self, name: str, version: str = "") -> ModelMetadata:
        path = f"/v2/models/{urllib.request.quote(name, safe='')}"
        if version:
            path += f"/versions/{urllib.request.quote(version, safe='')}"
        try:
            status, body = self._get(path)
            doc = json.loads(body) if status == 200 else None
        except (OSError, ValueError) as exc:
            raise OutriderError(f"upstream {self.address} gave no metadata for model '{name}': {exc}") from None
        if not isinstance(doc, dict):
            raise OutriderError(f"upstream {self.address} gave no metadata for model '{name}': HTTP {status} "
                                f"{body[:200].decode('utf-8', 'replace')}")
        try:
            def specs(side: Any) -> list[tensors.TensorSpec]:
                return [tensors.TensorSpec(t["name"], t["datatype"], tuple(int(d) for d in t["shape"]))
                        for t in side or ()]

            return ModelMetadata(doc.get("name") or name, [str(v) for v in doc.get("versions") or ()],
                                 doc.get("platform", ""), specs(doc.get("inputs")), specs(doc.get("outputs")))
        except (KeyError, TypeError, ValueError) as exc:
            raise OutriderError(f"upstream {self.address}'s metadata for model '{name}' is malformed ({exc!r})") \
                from None

    def close(self) -> None:
        pass


def serve_proxy_rest(upstream: str, monitor: ProxyMonitor, calls: Any, listen: str, *,
                     upstream_timeout: float = 30.0, workers: int = 8, max_body_bytes: int = 64 * 1024 * 1024,
                     auth: ClientAuth | None = None, tls: TLSFiles | None = None,
                     upstream_tls: TLSConfig | None = None) -> RestServer:
    """Forward REST on ``listen`` to the upstream's REST at ``upstream`` (HOST:PORT), offering the calls of
    ``monitor``'s model to it and counting every call in ``calls`` (the ``outrider_proxy_calls`` counter).
    Raises ``OSError`` when it cannot listen; ``upstream_tls``: https to the upstream (else plain http)."""
    return RestServer(None, listen, workers=workers, max_body_bytes=max_body_bytes, tls=tls,  # type: ignore[arg-type]
                      app=lambda pool: ProxyRestApp(upstream, monitor, calls, pool, timeout=upstream_timeout,
                                                    max_body_bytes=max_body_bytes, auth=auth,
                                                    upstream_tls=upstream_tls))
