"""The gRPC front of ``outrider agent proxy``: OIP calls forwarded byte for byte to the upstream.

Every method the proxy does not serve itself goes to the upstream through a generic handler with
identity (de)serializers: the request's bytes are sent as they came, the reply's bytes (or its
status code, message and trailing metadata) are returned as they came, initial metadata too.
ModelInfer calls are also handed to the ``ProxyMonitor`` (``agent.proxy``), which parses a copy
on its own thread. The proxy serves only the agent's FeedbackService (labels by request id) and
the standard health service, whose status follows the upstream's readiness of the model.

Request ids: a request with an ``id`` is kept under it (the upstream echoes it in the reply). A
request without one is forwarded without one, so the reply stays what the upstream sent; the
proxy keeps the prediction under an id of its own, sent in the reply's initial metadata
``outrider-request-id``: the one place a client that wants to send labels can read it without
the reply changing.

A managed proxy (``agent.proxy_rollout``) pins a ModelInfer call of the monitored model that names
no version to the version the registry named (``ProxyMonitor.pin``): the request's bytes are
forwarded with ``model_version`` appended (protobuf's last-field-wins; nothing else changes).

Failures of the upstream are the upstream's answer, passed on and counted
(``outrider_proxy_calls{code}``). An upstream that cannot be reached is UNAVAILABLE naming it, at
once when the connection is refused and after ``upstream_timeout`` at most otherwise (the client's
own deadline, when shorter, wins); the proxy never waits for it without a bound.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import Counter
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from agent import tensors
from agent.dataplane import ModelMetadata
from agent.errors import OutriderError
from agent.exporter import TLSConfig
from agent.guard import DecodeGuard
from agent.proxy import CallCounts, ObservedCall, ProxyMonitor
from agent.server import FEEDBACK_METHOD, MAX_FEEDBACK_BYTES, SERVICE_NAME, FeedbackServicer, _credentials
from agent.tokens import AccessInterceptor, ClientAuth, TLSFiles
from protos import agent_pb2_grpc
from protos import open_inference_pb2 as pb
from protos import open_inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

INFER_METHOD = f"/{SERVICE_NAME}/ModelInfer"
STREAM_METHODS = frozenset({f"/{SERVICE_NAME}/ModelStreamInfer"})  # Triton's streaming extension: passed through
REQUEST_ID_HEADER = "outrider-request-id"
DEFAULT_UPSTREAM_TIMEOUT = 30.0
WATCH_SECONDS = 1.0  # how often the upstream's readiness (health) and metadata are read
MAX_CACHED_METHODS = 64  # handlers kept per method name; clients choose the names, so the cache is bounded


def _passable(metadata: Any, drop: frozenset[str] = frozenset()) -> tuple[tuple[str, Any], ...]:
    """Metadata a hop may carry on: gRPC's own keys (``grpc-*``, pseudo-headers, user-agent) are the transport's."""
    return tuple((m.key, m.value) for m in metadata or ()
                 if not m.key.startswith(("grpc-", ":")) and m.key not in ("user-agent", "content-type")
                 and m.key not in drop)


class Upstream:
    """The channel to the upstream OIP server and the calls the proxy makes on its own behalf."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_UPSTREAM_TIMEOUT,
                 max_message_bytes: int = -1, tls: TLSConfig | None = None) -> None:
        self.address = address
        self.timeout = timeout
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # a restarted upstream is found again within a second, not after gRPC's default back-off of minutes
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.min_reconnect_backoff_ms", 200),
        ]
        self.channel = (grpc.secure_channel(address, tls.credentials(), options) if tls is not None
                        else grpc.insecure_channel(address, options))
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def model_ready(self, name: str) -> bool:
        try:
            return self.stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=min(self.timeout, 5.0)).ready
        except grpc.RpcError:
            return False

    def metadata(self, name: str, version: str = "") -> ModelMetadata:
        """The model's schema as the upstream states it; raises ``OutriderError`` saying why not."""
        try:
            reply = self.stub.ModelMetadata(pb.ModelMetadataRequest(name=name, version=version),
                                            timeout=min(self.timeout, 5.0))
        except grpc.RpcError as err:
            raise OutriderError(f"upstream {self.address} gave no metadata for model '{name}': "
                                f"{err.code().name} {err.details()}") from None

        def specs(side: Any) -> list[tensors.TensorSpec]:
            return [tensors.TensorSpec(t.name, t.datatype, tuple(t.shape)) for t in side]

        return ModelMetadata(reply.name or name, list(reply.versions), reply.platform, specs(reply.inputs),
                             specs(reply.outputs))

    def close(self) -> None:
        self.channel.close()


def _with_version(request: bytes, version: str) -> bytes:
    """``request`` (a ModelInferRequest naming no version) naming ``version``: field 2 appended, as a parse,
    set and serialise would give it, without either."""
    value = version.encode()
    size, length = len(value), bytearray()
    while True:  # varint
        byte, size = size & 0x7F, size >> 7
        length.append(byte | (0x80 if size else 0))
        if not size:
            break
    return request + b"\x12" + bytes(length) + value


def infer_decoder(request: pb.ModelInferRequest, reply: bytes | None, latency_ns: int,
             request_id: str) -> Callable[[], ObservedCall]:
    """Parses the reply (a copy of its bytes) on the monitor's thread, not the request's."""

    def decode() -> ObservedCall:
        inputs = tensors.wire_inputs(request.inputs, request.raw_input_contents)
        if reply is None:
            return ObservedCall(request.model_name, "", request_id, inputs, None, latency_ns)
        answer = pb.ModelInferResponse.FromString(reply)
        outputs = tensors.wire_inputs(answer.outputs, answer.raw_output_contents)
        return ObservedCall(request.model_name, answer.model_version, request_id, inputs, outputs, latency_ns)

    return decode


class Forwarder(grpc.GenericRpcHandler):
    """Every method the proxy does not serve itself, forwarded to ``upstream``."""

    def __init__(self, upstream: Upstream, monitor: ProxyMonitor, calls: Counter, *, strip_auth: bool) -> None:
        self.upstream = upstream
        self.monitor = monitor
        self._counts = CallCounts(calls)
        self._drop = frozenset({"authorization"}) if strip_auth else frozenset()  # the proxy's token, not theirs
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:12]

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method
        handler = self._handlers.get(method)
        if handler is None:
            if method in STREAM_METHODS:
                handler = grpc.stream_stream_rpc_method_handler(self._stream(method))
            else:
                handler = grpc.unary_unary_rpc_method_handler(self._unary(method))
            if len(self._handlers) < MAX_CACHED_METHODS:
                self._handlers[method] = handler
        return handler

    # --- forwarding -----------------------------------------------------------------
    def _timeout(self, context: grpc.ServicerContext) -> tuple[float, bool]:
        """The upstream call's timeout, and whether it is the proxy's bound rather than the client's deadline."""
        remaining = context.time_remaining()
        if remaining is None or remaining > self.upstream.timeout:
            return self.upstream.timeout, True
        return max(remaining, 0.0), False

    def _unary(self, method: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        call_upstream = self.upstream.channel.unary_unary(method)  # no serializers: bytes in, bytes out
        infer = method == INFER_METHOD
        monitor = self.monitor

        def forward(request: bytes, context: grpc.ServicerContext) -> bytes:
            parsed, assigned = None, ""
            if infer:
                try:
                    parsed = pb.ModelInferRequest.FromString(request)
                except Exception:  # the upstream says what is wrong with it; nothing to summarise
                    parsed = None
                if parsed is not None and parsed.model_name == monitor.model_name:
                    if not parsed.id:
                        assigned = f"{self._id_prefix}-{next(self._ids)}"
                    pin = monitor.pin
                    if pin and not parsed.model_version:  # managed: the registry's version, not the upstream's default
                        request = _with_version(request, pin)
            timeout, ours = self._timeout(context)
            started = time.perf_counter_ns()
            try:
                reply, call = call_upstream.with_call(request, timeout=timeout,
                                                      metadata=_passable(context.invocation_metadata(), self._drop))
            except grpc.RpcError as err:
                if parsed is not None:
                    monitor.offer(infer_decoder(parsed, None, time.perf_counter_ns() - started, ""))
                self._pass_error(method, err, context, ours)
                raise  # not reached: _pass_error aborts
            latency = time.perf_counter_ns() - started
            self._count(method, "OK")
            initial = _passable(call.initial_metadata())
            if assigned:
                initial += ((REQUEST_ID_HEADER, assigned),)
            if initial:
                context.send_initial_metadata(initial)
            trailing = _passable(call.trailing_metadata())
            if trailing:
                context.set_trailing_metadata(trailing)
            if parsed is not None:
                monitor.offer(infer_decoder(parsed, reply, latency, parsed.id or assigned))
            return reply

        return forward

    def _stream(self, method: str) -> Callable[[Iterator[bytes], grpc.ServicerContext], Iterator[bytes]]:
        call_upstream = self.upstream.channel.stream_stream(method)

        def forward(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
            timeout = context.time_remaining()  # a stream lives as long as its client wants
            call = call_upstream(requests, timeout=timeout,
                                 metadata=_passable(context.invocation_metadata(), self._drop))
            context.add_callback(call.cancel)
            try:
                yield from call
            except grpc.RpcError as err:
                self._pass_error(method, err, context, False)
            self._count(method, "OK")

        return forward

    def _pass_error(self, method: str, err: grpc.RpcError, context: grpc.ServicerContext, ours: bool) -> None:
        code, details = err.code(), err.details() or ""
        unreachable = code is grpc.StatusCode.UNAVAILABLE and not err.trailing_metadata() and \
            any(s in details for s in ("failed to connect", "Connection refused", "connections to all backends failing",
                                      "Socket closed", "Connection reset"))
        if unreachable:
            self._count(method, "UNREACHABLE")
            context.abort(grpc.StatusCode.UNAVAILABLE, f"upstream {self.upstream.address} is unreachable ({details}); "
                                                       "check --upstream and that the inference server is running")
        if code is grpc.StatusCode.DEADLINE_EXCEEDED and ours:  # our bound, not the client's deadline
            self._count(method, "UNREACHABLE")
            context.abort(grpc.StatusCode.UNAVAILABLE, f"upstream {self.upstream.address} did not answer within "
                                                       f"{self.upstream.timeout:g} s (--upstream-timeout-seconds)")
        self._count(method, code.name)
        trailing = _passable(err.trailing_metadata())
        if trailing:
            context.set_trailing_metadata(trailing)
        context.abort(code, details)

    def _count(self, method: str, code: str) -> None:
        self._counts.count(method.rsplit("/", 1)[-1], code)


class ProxyServer:
    """A running proxy: its ``port``, ``monitor``, and ``stop``."""

    def __init__(self, server: grpc.Server, port: int, host: str, upstream: Upstream, monitor: ProxyMonitor,
                 health_servicer: health.HealthServicer, watch: _Watch) -> None:
        self.server, self.port, self.host = server, port, host
        self.upstream, self.monitor, self.health, self._watch = upstream, monitor, health_servicer, watch
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def refused(self) -> str | None:
        """Why the model's schema, read from the upstream, could not be monitored (None: it is, or not read yet)."""
        return self._watch.refused

    def stop(self, grace: float | None = 5.0) -> None:
        """NOT_SERVING first, finish in-flight calls, then summarise what is queued and flush the last window."""
        if self._stopped:
            return
        self._stopped = True
        self._watch.stop()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.monitor.close()
        self.upstream.close()


class _Watch:
    """The upstream's readiness of the model (the proxy's health) and its metadata (the schema monitored),
    read every ``WATCH_SECONDS`` on a thread of its own. A schema that changes (the model was reloaded
    with other tensors or versions) is monitored afresh."""

    def __init__(self, upstream: Upstream, monitor: ProxyMonitor, health_servicer: health.HealthServicer,
                 version: str = "", *, managed: bool = False) -> None:
        self.upstream, self.monitor, self.health, self.version = upstream, monitor, health_servicer, version
        self.managed = managed  # the collector names the version (agent.proxy_rollout): readiness only here
        self.ready = False
        self.refused: str | None = None  # why the upstream's schema could not be monitored, if it could not
        self._schema: ModelMetadata | None = None
        self._failed: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outrider-proxy-upstream", daemon=True)

    def start(self) -> None:
        self.check()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(WATCH_SECONDS):
            try:
                self.check()
            except Exception:  # a bug here must not end the watch
                log.exception("could not check the upstream")

    def check(self) -> None:
        name = self.monitor.model_name
        ready = self.upstream.model_ready(name)
        if ready != self.ready:
            log.info("upstream %s %s model %s", self.upstream.address, "is ready with" if ready else "is not ready with",
                     name)
        self.ready = ready
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            self.health.set(service, status)
        if not ready or self.managed:
            return
        try:
            schema = self.upstream.metadata(name, self.version)
            if schema != self._schema:
                try:
                    self.monitor.monitor(schema)
                except OutriderError as exc:  # ours to fix (feature names that do not fit, a busy spool)
                    self.refused = str(exc)
                    raise
                self._schema, self.refused = schema, None
            self._failed = None
        except OutriderError as exc:
            if str(exc) != self._failed:  # said once per reason, not every second
                log.error("%s; its calls pass through unmonitored (counted as no_schema)", exc)
            self._failed = str(exc)


class _ProxyCollector:
    """What the monitor counts, read at scrape time."""

    def __init__(self, monitor: ProxyMonitor, watch: _Watch) -> None:
        self.monitor, self.watch = monitor, watch

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        stats = self.monitor.stats()
        family = CounterMetricFamily("outrider_proxy_unmonitored_calls", "ModelInfer calls passed through without "
                                     "being summarised: another model or version, a reply without all the model's "
                                     "outputs, no schema yet, undecodable, the capture queue full",
                                     labels=["reason"])
        for reason, count in sorted(stats["unmonitored"].items()):
            family.add_metric([reason], count)
        yield family
        yield CounterMetricFamily("outrider_proxy_captured_calls", "ModelInfer calls summarised",
                                  value=stats["captured"])
        yield CounterMetricFamily("outrider_proxy_capture_failures", "calls whose summary failed on a bug (the "
                                  "reply was unaffected)", value=stats["capture_failures"])
        yield GaugeMetricFamily("outrider_proxy_upstream_ready", "1 while the upstream says the model is ready",
                                value=int(self.watch.ready))


def proxy_calls_counter(registry: Any) -> Counter:
    return Counter("outrider_proxy_calls", "calls forwarded to the upstream, by OIP method and the status it "
                   "answered: gRPC's code name, REST's HTTP status (UNREACHABLE: it could not be reached or did not "
                   "answer in time)", ["method", "code"], registry=registry)


def serve_proxy(upstream: str, model_name: str, open_session: Callable[..., Any], listen: str = "127.0.0.1:8001",
                *, model_version: str | None = None, workers: int = 16,
                upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT, max_receive_bytes: int = 64 * 1024 * 1024,
                metrics: Any = None, auth: ClientAuth | None = None, tls: TLSFiles | None = None,
                calls: Counter | None = None, watched: Any = None, managed: bool = False,
                upstream_tls: TLSConfig | None = None) -> ProxyServer:
    """Proxy ``listen`` to the OIP server at ``upstream`` (HOST:PORT), summarising ``model_name``'s calls
    through the sessions ``open_session(model, version)`` opens (``agent.proxy.SessionFactory``).

    Starts whether or not the upstream answers yet: until it does, the proxy's health is
    NOT_SERVING and calls get UNAVAILABLE naming it. Raises ``OSError`` when it cannot listen.

    ``watched``: the upstream to read readiness and metadata from instead of a gRPC one (``agent.proxy_rest``'s
    ``RestUpstream``, when only REST is forwarded); the port then forwards nothing, serving feedback and health.
    ``managed``: the schema is not read by the proxy but set by ``agent.proxy_rollout.ProxyRollout`` for each
    version the collector names. ``upstream_tls``: call the upstream over TLS (else plaintext)."""
    from prometheus_client import CollectorRegistry

    link = watched if watched is not None else Upstream(upstream, timeout=upstream_timeout,
                                                        max_message_bytes=max_receive_bytes, tls=upstream_tls)
    monitor = ProxyMonitor(model_name, open_session, model_version=model_version)
    registry = metrics.registry if metrics is not None else CollectorRegistry()
    if calls is None:  # else the REST front's: both count in one family
        calls = proxy_calls_counter(registry)
    health_servicer = health.HealthServicer()
    guard = DecodeGuard({FEEDBACK_METHOD: MAX_FEEDBACK_BYTES})
    access = AccessInterceptor(auth) if auth is not None else None
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="outrider-proxy"),
        interceptors=[i for i in (access, guard) if i is not None],
        options=[("grpc.max_receive_message_length", max_receive_bytes), ("grpc.so_reuseport", 0)],
    )
    # The proxy's own services first: the forwarder takes whatever they do not know.
    agent_pb2_grpc.add_FeedbackServiceServicer_to_server(FeedbackServicer(monitor.switch, monitor.settle), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if watched is None:
        server.add_generic_rpc_handlers((Forwarder(link, monitor, calls, strip_auth=auth is not None),))
    try:
        credentials = _credentials(tls) if tls is not None else None  # InvalidArgument for unreadable files
        port = (server.add_secure_port(listen, credentials) if credentials is not None
                else server.add_insecure_port(listen))
    except OutriderError:
        monitor.close(0)
        link.close()
        raise
    except RuntimeError as exc:
        monitor.close(0)
        link.close()
        raise OSError(f"cannot listen on {listen}: {exc}") from None
    if port == 0:
        monitor.close(0)
        link.close()
        raise OSError(f"cannot listen on {listen}")
    watch = _Watch(link, monitor, health_servicer, model_version or "", managed=managed)
    registry.register(_ProxyCollector(monitor, watch))
    if metrics is not None:
        metrics.bind(lambda: monitor.switch.current.plane if monitor.switch.current is not None else None,
                     access.refusals if access is not None else None)
    server.start()
    watch.start()
    return ProxyServer(server, port, listen.rsplit(":", 1)[0], link, monitor, health_servicer, watch)
