"""The Open Inference Protocol's REST endpoints as a plain ASGI app over a ``Backend``.

    GET  /v2                                        server metadata
    GET  /v2/health/live, /v2/health/ready          probes (open even with an auth file, as gRPC's health service)
    GET  /v2/models/{name}[/versions/{v}]           model metadata
    GET  /v2/models/{name}[/versions/{v}]/ready     200 when ready, else 503 (or 404 for a model not served)
    POST /v2/models/{name}[/versions/{v}]/infer     JSON tensors, or the binary tensor extension

The event loop only reads and writes bytes: decoding, inference and encoding
run in a fixed pool of worker threads (``pool``), so a large JSON body or a slow
model never stalls the probes or other connections. Bodies have a byte budget
each (``max_body_bytes``, refused with 413 before they are read, or as soon as
a chunked one passes it) and together (``max_pending_bytes``: 503 while that
much is held), so memory stays bounded whatever clients send. Errors are
``agent.errors`` answered through its one table with ``{"error": message}``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote

import grpc

from agent.errors import (InvalidArgument, NotFound, OutriderError, PayloadTooLarge, PermissionDenied,
                          Unauthenticated, Unavailable, http_error)
from agent.hello import package_version
from agent.rest import codec
from agent.rest.backend import Backend
from agent.tokens import ClientAuth, bearer_token

SERVER_NAME = "outrider"
EXTENSIONS = ["binary_tensor_data"]
JSON = (b"content-type", b"application/json")
OCTETS = (b"content-type", b"application/octet-stream")
ENDPOINTS = ("GET /v2, /v2/health/live, /v2/health/ready, /v2/models/NAME[/versions/V][/ready], "
             "POST /v2/models/NAME[/versions/V]/infer")


class RestApp:
    """ASGI app serving ``backend``. ``metrics`` (an ``agent.metrics.AgentMetrics``) counts and times infer
    calls as its gRPC interceptor does; ``auth`` asks every call but the health probes for a token."""

    def __init__(self, backend: Backend, pool: concurrent.futures.Executor, *, max_body_bytes: int,
                 max_pending_bytes: int | None = None, metrics: Any = None, auth: ClientAuth | None = None) -> None:
        self.backend, self.pool, self.metrics, self.auth = backend, pool, metrics, auth
        self.max_body_bytes = max_body_bytes
        self.max_pending_bytes = max_pending_bytes if max_pending_bytes is not None else 4 * max_body_bytes
        self._pending = 0  # body bytes held by requests now (touched on the event loop only)
        self._lock = threading.Lock()
        self._refusals = {"too_large": 0, "busy": 0, "unauthenticated": 0, "permission_denied": 0}
        self._server_metadata = codec.dumps({"name": SERVER_NAME, "version": package_version(),
                                             "extensions": EXTENSIONS})

    def refusals(self) -> dict[str, int]:
        """Calls refused before the data plane saw them, by reason (as ``agent.server.InferenceServer``'s)."""
        with self._lock:
            return dict(self._refusals)

    def _refused(self, reason: str) -> None:
        with self._lock:
            self._refusals[reason] += 1

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":  # lifespan is off; websockets are not ours
            return
        method = scope["method"]
        raw_path = scope.get("raw_path") or scope["path"].encode()
        parts = [unquote(p) for p in raw_path.decode("latin-1").split("?", 1)[0].strip("/").split("/")]
        try:
            if parts[:2] == ["v2", "health"] and len(parts) == 3 and parts[2] in ("live", "ready"):
                _require_method(method, "GET")
                await self._health(parts[2], send)
                return
            self._check_access(scope["headers"])
            if parts == ["v2"]:
                _require_method(method, "GET")
                await _reply(send, 200, self._server_metadata)
                return
            name, version, action = _model_route(parts)
            if action == "infer":
                _require_method(method, "POST")
                await self._infer(scope, name, version, receive, send)
            elif action == "ready":
                _require_method(method, "GET")
                await self._model_ready(name, version, send)
            else:
                _require_method(method, "GET")
                await self._metadata(name, version, send)
        except Exception as exc:
            await _error(send, exc)

    # --- endpoints ----------------------------------------------------------------------
    async def _health(self, which: str, send: Callable) -> None:
        if which == "live":
            await _reply(send, 200, b'{"live":true}')
        else:
            ready = self.backend.ready()
            await _reply(send, 200 if ready else 503, b'{"ready":true}' if ready else b'{"ready":false}')

    async def _model_ready(self, name: str, version: str, send: Callable) -> None:
        if self.backend.model_ready(name, version):
            await _reply(send, 200, codec.dumps({"name": name, "ready": True}))
            return
        self.backend.metadata(name, version)  # NotFound / Unavailable say why it is not ready
        await _reply(send, 503, codec.dumps({"name": name, "ready": False}))  # draining

    async def _metadata(self, name: str, version: str, send: Callable) -> None:
        meta = self.backend.metadata(name, version)
        doc = {"name": meta.name, "versions": meta.versions, "platform": meta.platform,
               "inputs": [_spec(s) for s in meta.inputs], "outputs": [_spec(s) for s in meta.outputs]}
        await _reply(send, 200, codec.dumps(doc))

    async def _infer(self, scope: dict[str, Any], name: str, version: str, receive: Callable,
                     send: Callable) -> None:
        headers = dict(scope["headers"])
        body, held = await self._read_body(headers, receive)
        try:
            loop = asyncio.get_running_loop()
            status, reply, extra = await loop.run_in_executor(self.pool, self._run_infer, name, version, body,
                                                              headers.get(b"inference-header-content-length"))
        finally:
            self._pending -= held
        await _reply(send, status, reply, extra)

    def _run_infer(self, name: str, version: str, body: bytes,
                   header_length: bytes | None) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """Decode, infer, encode (a worker thread): (status, body, headers beyond content-type JSON)."""
        started = time.perf_counter()
        code = None
        try:
            request = codec.parse_infer(body, header_length.decode("latin-1") if header_length is not None
                                        else None)
            model, served_version, results = self.backend.infer(name, version, request.inputs, request.outputs,
                                                                 request.request_id)
            reply, json_size = codec.encode_reply(model, served_version, request.request_id, results, request)
        except Exception as exc:
            code = exc.code if isinstance(exc, OutriderError) else grpc.StatusCode.INTERNAL
            status, reply, headers = http_error(exc)
            return status, reply, [(k.encode(), v.encode()) for k, v in headers]
        finally:
            if self.metrics is not None:
                self.metrics.observe(time.perf_counter() - started, code)
        if json_size is None:
            return 200, reply, []
        return 200, reply, [OCTETS, (b"inference-header-content-length", str(json_size).encode())]

    # --- what every request goes through ------------------------------------------------
    async def _read_body(self, headers: dict[bytes, bytes], receive: Callable) -> tuple[bytes, int]:
        """The whole body, within its budgets, and the bytes it holds of ``max_pending_bytes``."""
        if headers.get(b"content-encoding", b"identity").lower() != b"identity":
            raise InvalidArgument("compressed request bodies (Content-Encoding) are not supported; send it "
                                  "uncompressed")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            self._refused("too_large")
            raise _closing(PayloadTooLarge(f"the request body is {int(declared)} bytes; this agent takes at "
                                           f"most {self.max_body_bytes} (--max-message-mb)"))
        chunks, size, held = [], 0, 0
        try:
            while True:
                message = await receive()
                if message["type"] != "http.request":  # the client went away
                    raise _closing(Unavailable("the client disconnected before the body was read"))
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body_bytes:
                    self._refused("too_large")
                    raise _closing(PayloadTooLarge(f"the request body is over {self.max_body_bytes} bytes, the "
                                                   "most this agent takes (--max-message-mb)"))
                if self._pending + len(chunk) > self.max_pending_bytes:
                    self._refused("busy")
                    raise _closing(Unavailable(f"the agent holds {self._pending} bytes of request bodies "
                                               "already, its limit; retry shortly"))
                self._pending += len(chunk)
                held += len(chunk)
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return b"".join(chunks), held
        except BaseException:
            self._pending -= held
            raise

    def _check_access(self, headers: list[tuple[bytes, bytes]]) -> None:
        if self.auth is None:
            return
        pairs = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in headers]
        token, why = bearer_token(pairs, "this agent")
        if token is None:
            self._refused("unauthenticated")
            raise Unauthenticated(why.replace("metadata 'authorization", "the header 'Authorization"))
        client = self.auth.authenticate(token)
        if client is None:
            self._refused("unauthenticated")
            raise Unauthenticated("unknown token: it is not in the agent's auth file")
        if "inference" not in client.calls:
            self._refused("permission_denied")
            raise PermissionDenied(f"client {client.name!r} may call {', '.join(sorted(client.calls))}, not "
                                   "inference; add 'inference' to its calls in the agent's auth file")


def _model_route(parts: list[str]) -> tuple[str, str, str]:
    """/v2/models/NAME[/versions/V][/ready|/infer] -> (name, version, "ready" | "infer" | "")."""
    if len(parts) >= 3 and parts[:2] == ["v2", "models"] and parts[2]:
        rest = parts[3:]
        version = ""
        if len(rest) >= 2 and rest[0] == "versions":
            version, rest = rest[1], rest[2:]
        if not rest:
            return parts[2], version, ""
        if len(rest) == 1 and rest[0] in ("ready", "infer"):
            return parts[2], version, rest[0]
    raise NotFound(f"no endpoint /{'/'.join(parts)}; this server has {ENDPOINTS}")


def _closing(exc: OutriderError) -> OutriderError:
    """``exc``, answered on a connection that then closes: the rest of its body is left unread."""
    exc.close_connection = True  # type: ignore[attr-defined]
    return exc


def _require_method(method: str, wanted: str) -> None:
    if method != wanted:
        raise InvalidArgument(f"{method} is not served here; use {wanted}")


def _spec(spec: Any) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


async def _reply(send: Callable, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    out = list(headers) if headers else []
    if not any(k == b"content-type" for k, _ in out):
        out.append(JSON)
    out.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": body})


async def _error(send: Callable, exc: Exception) -> None:
    status, body, headers = http_error(exc)
    extra = [(k.encode(), v.encode()) for k, v in headers]
    if getattr(exc, "close_connection", False):
        extra.append((b"connection", b"close"))  # the rest of a refused body is not read
    await _reply(send, status, body, extra)
