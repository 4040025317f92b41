"""The agent's Open Inference Protocol (KServe V2) gRPC endpoint.

The servicer is thin: it converts messages with ``agent.tensors`` and calls
``agent.dataplane``; ``grpc_errors`` turns their exceptions into statuses.
``serve`` starts it with the standard gRPC health service and the agent's
``FeedbackService`` (ground truth by request id) beside it. Optional bearer
tokens (``auth``: an ``agent.tokens.ClientAuth``) and TLS (``tls``: an
``agent.tokens.TLSFiles``, mutual with a client CA) guard both; the health
service stays open. Bodies that cannot be decoded are refused by
``agent.guard.DecodeGuard`` before any servicer runs. Every handler is wrapped
once when it is registered (``agent.handlers``), ModelInfer's in a single
layer with its metrics: the hot path runs no interceptor unless tokens are checked.

Each request takes the model version it runs on from a ``ModelSwitch``
(``agent.rollout``) and keeps it to the end, so a managed agent can swap
versions between requests (``serve_switch``); ``serve`` is the same with one
fixed version.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent import futures
from functools import partial
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent import handlers, tensors
from agent.dataplane import DataPlane, InferenceSessionLike
from agent.errors import InvalidArgument, NotFound, Unavailable, Unimplemented, grpc_errors
from agent.grpc_loop import LoopThread
from agent.guard import DecodeGuard
from agent.hello import package_version
from agent.metrics import INFER_METHOD
from agent.switch import LoadedVersion, ModelSwitch
from agent.tokens import AccessInterceptor, ClientAuth, TLSFiles
from protos import agent_pb2, agent_pb2_grpc
from protos import open_inference_pb2 as pb
from protos import open_inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVER_NAME = "outrider"
SERVICE_NAME = "inference.GRPCInferenceService"
DEFAULT_MAX_RECEIVE_BYTES = 64 * 1024 * 1024
FEEDBACK_METHOD = "/outrider.v1.FeedbackService/Feedback"
# A Feedback call holds at most MAX_LABELS_PER_CALL (10,000) labels: with ids of 256 characters and
# class names of 128 (the longest kept) that is under 5 MB, so a larger body is refused before it is
# parsed into tens of thousands of Python objects.
MAX_FEEDBACK_BYTES = 8 * 1024 * 1024


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, switch: ModelSwitch) -> None:
        self.switch = switch
        self.shutting_down = threading.Event()
        self._version = package_version()

    @property
    def plane(self) -> DataPlane | None:
        """The data plane of the version serving now (None before a managed agent's first load)."""
        current = self.switch.current
        return current.plane if current is not None else None

    @grpc_errors
    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        ready = not self.shutting_down.is_set() and self.switch.current is not None
        return pb.ServerReadyResponse(ready=ready)

    @grpc_errors
    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        current = self.switch.current
        ready = (not self.shutting_down.is_set() and current is not None
                 and current.plane.ready(request.name, request.version))
        return pb.ModelReadyResponse(ready=ready)

    @grpc_errors
    def ServerMetadata(self, request: pb.ServerMetadataRequest,
                       context: grpc.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version)

    @grpc_errors
    def ModelMetadata(self, request: pb.ModelMetadataRequest,
                      context: grpc.ServicerContext) -> pb.ModelMetadataResponse:
        meta = _current(self.switch, request.name).plane.metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=meta.name, versions=meta.versions, platform=meta.platform,
            inputs=[_tensor_metadata(spec) for spec in meta.inputs],
            outputs=[_tensor_metadata(spec) for spec in meta.outputs],
        )

    @grpc_errors
    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        return self.infer(request)  # served by agent.handlers.model_infer, in one layer; this for direct calls

    def infer(self, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
        """ModelInfer without gRPC around it: the reply, or an ``agent.errors`` exception."""
        inputs, raws = request.inputs, request.raw_input_contents
        if len(raws) == 1 and len(inputs) == 1:
            tensor = inputs[0]
            one = not tensor.HasField("contents")
        else:
            one = False
        # One input sent raw and no typed contents: wire_inputs has nothing to refuse, so it is skipped.
        # Anything else is checked by it first, as ever (its errors come before the model name's).
        wire = None if one else tensors.wire_inputs(inputs, raws)
        name, request_id = request.model_name, request.id
        switch = self.switch
        served = switch.acquire(name)
        try:  # the whole call on the version it started on, even if a swap happens meanwhile
            shadow = switch.shadow
            tap = shadow.offer if shadow is not None else None
            asked = request.outputs
            outputs = [out.name for out in asked] if len(asked) else ()
            if one:
                results = served.plane.infer_raw(name, request.model_version, tensor, raws[0], outputs,
                                                 request_id, tap)
            else:
                results = served.plane.infer(name, request.model_version, wire, outputs, request_id, tap=tap)
        finally:
            switch.release(served)
        reply = pb.ModelInferResponse(model_name=served.plane.model_name, model_version=served.version,
                                      id=request_id)
        add, append = reply.outputs.add, reply.raw_output_contents.append
        for output, array in results:
            datatype, raw = tensors.wire_form(array)
            add(name=output, datatype=datatype, shape=array.shape)
            append(raw)
        return reply


class FeedbackServicer(agent_pb2_grpc.FeedbackServiceServicer):
    """Ground truth for earlier ModelInfer requests, by their ``id``."""

    def __init__(self, switch: ModelSwitch, settle: Callable[[], None] | None = None) -> None:
        self.switch = switch
        # agent proxy: summarises its calls off the request path, so labels wait for the calls before them
        self.settle = settle

    @grpc_errors
    def Feedback(self, request: agent_pb2.FeedbackRequest,
                 context: grpc.ServicerContext) -> agent_pb2.FeedbackResponse:
        plane = _current(self.switch, self.switch.model_name).plane  # labels join the version serving now
        if not plane.joins_labels:
            raise Unimplemented(f"model '{plane.model_name}' is served without monitoring, so it keeps "
                                "no predictions to join labels to; serve it with a MonitoredSession")
        labels = []
        for label in request.labels:
            which = label.WhichOneof("value")
            labels.append((label.request_id, getattr(label, which) if which else None, label.row))
        if self.settle is not None:
            self.settle()
        matched, unmatched = plane.feedback(labels)
        return agent_pb2.FeedbackResponse(matched=matched, unmatched=unmatched)


def _current(switch: ModelSwitch, name: str) -> LoadedVersion:
    """The version serving now, for calls that only read it (no request runs on it)."""
    if name != switch.model_name:
        raise NotFound(f"model '{name}' is not served here; this server serves '{switch.model_name}'")
    current = switch.current
    if current is None:
        raise Unavailable(switch.waiting_message())
    return current


def _tensor_metadata(spec: tensors.TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


class InferenceServer:
    """A running endpoint: its bound ``port``, and ``stop`` for a graceful shutdown."""

    def __init__(self, server: Any, loop: LoopThread | None, threads: futures.ThreadPoolExecutor,
                 servicer: InferenceServicer,
                 health_servicer: Any, session: Any, host: str, port: int,
                 guard: DecodeGuard | None = None, access: AccessInterceptor | None = None,
                 interceptors: list[Any] | None = None) -> None:
        # ``session``: what ``stop`` closes last (the served session, or a managed agent's controller)
        self.server = server
        self.interceptors = interceptors or []  # what runs before every call's handler (agent.handlers)
        self.loop = loop  # the thread ``server`` runs on (agent.grpc_loop); None: grpcio's threads server
        self.threads = threads  # where its calls that are plain functions run
        self.servicer = servicer
        self.health = health_servicer
        self.session = session
        self.host = host
        self.port = port
        self.guard = guard
        self.access = access
        self._stop_lock = threading.Lock()
        self._stopped = False
        self._ended = threading.Event()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def refusals(self) -> dict[str, int]:
        """Calls refused before any servicer ran, by reason (undecodable, too_large, unauthenticated,
        permission_denied)."""
        counts = {"undecodable": self.guard.refused if self.guard is not None else 0,
                  "too_large": self.guard.too_large if self.guard is not None else 0}
        if self.access is not None:
            counts.update(self.access.refusals())
        return counts

    def stop(self, grace: float | None = 5.0) -> None:
        """NOT_SERVING first (so balancers drain us), finish in-flight calls, then close the session."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.servicer.shutting_down.set()
        try:
            if self.loop is None:
                self.health.enter_graceful_shutdown()
                self.server.stop(grace).wait()
            else:
                self.loop.run(self.health.enter_graceful_shutdown())
                self.loop.run(self.server.stop(grace))
        finally:
            if self.loop is not None:
                self.loop.close()
            self.threads.shutdown(wait=False)
            self._ended.set()
        close = getattr(self.session, "close", None)
        if callable(close):
            close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; as gRPC's ``wait_for_termination``, True if ``timeout``
        passed first."""
        return not self._ended.wait(timeout)


def serve(session: InferenceSessionLike, model_name: str, model_version: str,
          listen: str = "127.0.0.1:8001", *, workers: int = 8,
          max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES, metrics: Any = None,
          auth: ClientAuth | None = None, tls: TLSFiles | None = None, reuse_port: bool = False,
          threaded_infer: bool = False, asynchronous: bool = True) -> InferenceServer:
    """Start serving ``session`` on ``listen`` (HOST:PORT; port 0 picks a free one).

    ``metrics`` (an ``agent.metrics.AgentMetrics``) counts and times requests and reads the served session.
    ``auth``: callers need a token it names (None: anyone may call); ``tls``: serve TLS, not plaintext.
    ``reuse_port``: share the port with other processes that set it too (``agent serve --processes``).
    ModelInfer calls run one at a time on the server's event loop, or side by side on ``workers`` threads
    with ``threaded_infer`` (for models whose run takes milliseconds); other calls run on those threads.
    ``asynchronous`` False: grpcio's threads server instead, every call on a ``workers`` thread. One process
    serves more on the asyncio server (no hand-off between threads per call); processes sharing two cores
    (``--processes 2``) served more each on the threads server, at less CPU a request (benchmarks/README.md,
    "--processes 2 on grpcio's threads server").

    Raises ``OSError`` when the address cannot be bound. Signal handling is
    left to the caller (the CLI installs it): a library must not take over
    the process's signals.
    """
    switch = ModelSwitch(model_name)
    switch.swap(LoadedVersion(DataPlane(session, model_name, model_version), session, model_version,
                              getattr(session, "model_sha256", "")))
    running = serve_switch(switch, listen, owner=session, workers=workers, max_receive_bytes=max_receive_bytes,
                           metrics=metrics, auth=auth, tls=tls, reuse_port=reuse_port, threaded_infer=threaded_infer,
                           asynchronous=asynchronous)
    log.info("serving %s version %s on %s (%s)", model_name, model_version, running.address,
             "asyncio server" if asynchronous else f"threads server, {workers} workers")
    return running


def serve_switch(switch: ModelSwitch, listen: str = "127.0.0.1:8001", *, owner: Any = None, workers: int = 8,
                 max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES, metrics: Any = None,
                 auth: ClientAuth | None = None, tls: TLSFiles | None = None,
                 reuse_port: bool = False, threaded_infer: bool = False,
                 asynchronous: bool = True) -> InferenceServer:
    """Serve whichever version ``switch`` holds, request by request (``serve`` with a model that can
    change: a managed agent's). Health is NOT_SERVING while the switch holds no version;
    ``owner.close()`` (if any) runs last in ``stop``. Raises ``OSError`` when it cannot listen and
    ``InvalidArgument`` when the TLS files cannot be read.

    ``asynchronous`` False: grpcio's threads server, every call on one of ``workers`` threads (``serve``)."""
    servicer = InferenceServicer(switch)
    # Its calls are coroutines, on the server's loop (asyncio), or plain functions (threads server).
    health_servicer = health.aio.HealthServicer() if asynchronous else health.HealthServicer()
    guard = DecodeGuard({FEEDBACK_METHOD: MAX_FEEDBACK_BYTES})
    access = AccessInterceptor(auth) if auth is not None else None
    credentials = _credentials(tls) if tls is not None else None
    # The calls other than ModelInfer are plain functions: gRPC runs them on this pool (all calls, threads server).
    threads = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="outrider-infer")
    model_infer = partial(handlers.model_infer, method=INFER_METHOD, infer=servicer.infer, switch=switch,
                          guard=guard, metrics=metrics, where="InferenceServicer.ModelInfer",
                          threads=threads if threaded_infer else None, asynchronous=asynchronous)

    # None without tokens: every handler is wrapped once below instead (agent.handlers); with them, a
    # caller the access check refuses never has its body decoded, and the metrics count it.
    interceptors = handlers.interceptors(access, metrics, asynchronous)
    options = [
        # Oversized messages are refused by gRPC itself with RESOURCE_EXHAUSTED.
        ("grpc.max_receive_message_length", max_receive_bytes),
        # Off unless asked for (the processes of one `agent serve --processes N`): otherwise a second
        # server on a busy port binds too and steals half the traffic.
        ("grpc.so_reuseport", int(reuse_port)),
    ]

    def build(server: Any) -> int:
        handlers.register(server, [(pb_grpc.add_GRPCInferenceServiceServicer_to_server, servicer),
                                   (agent_pb2_grpc.add_FeedbackServiceServicer_to_server, FeedbackServicer(switch)),
                                   (health_pb2_grpc.add_HealthServicer_to_server, health_servicer)],
                          guard, own={INFER_METHOD: model_infer})
        try:
            port = (server.add_secure_port(listen, credentials) if credentials is not None
                    else server.add_insecure_port(listen))
        except RuntimeError as exc:
            if credentials is not None:  # gRPC says only "failed to bind" for a key that does not fit its certificate
                raise OSError(f"cannot listen on {listen} with TLS ({exc}): the address is in use, or the TLS "
                              "certificate and key do not match") from None
            raise OSError(f"cannot listen on {listen}: {exc}") from None
        if port == 0:  # older grpcio reports a failed bind as port 0
            raise OSError(f"cannot listen on {listen}")
        return port

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(migration_thread_pool=threads, interceptors=interceptors or None, options=options)
        port = build(server)
        await server.start()
        return server, port

    loop: LoopThread | None = None
    try:
        if asynchronous:
            loop = LoopThread("outrider-grpc")
            server, port = loop.run(start())
        else:
            server = grpc.server(threads, interceptors=interceptors or None, options=options)
            port = build(server)
            server.start()
    except BaseException:
        if loop is not None:
            loop.close()
        threads.shutdown(wait=False)
        raise
    host = listen.rsplit(":", 1)[0]

    def health_of(current: LoadedVersion | None) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if current else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):  # ignored once a graceful shutdown began
            if loop is None:
                health_servicer.set(service, status)
            else:
                loop.call(health_servicer.set(service, status))

    switch.on_change(health_of)  # a loaded model is SERVING from the first call on
    running = InferenceServer(server, loop, threads, servicer, health_servicer, owner, host, port, guard, access,
                              interceptors)
    if metrics is not None:  # whatever plane is served at the time (a rollout swaps it)
        metrics.bind(lambda: servicer.plane, running.refusals)
    return running


def _credentials(tls: TLSFiles) -> grpc.ServerCredentials:
    try:
        return tls.server_credentials()
    except OSError as exc:
        raise InvalidArgument(f"cannot read TLS file {exc.filename}: {exc.strerror or exc}") from None
