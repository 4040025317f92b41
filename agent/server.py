"""The agent's Open Inference Protocol (KServe V2) gRPC endpoint.

The servicer is thin: it converts messages with ``agent.tensors`` and calls
``agent.dataplane``; ``grpc_errors`` turns their exceptions into statuses.
``serve`` starts it with the standard gRPC health service and the agent's
``FeedbackService`` (ground truth by request id) beside it.
"""
from __future__ import annotations

import importlib.metadata
import logging
import threading
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from agent import tensors
from agent.dataplane import DataPlane, InferenceSessionLike
from agent.errors import Unimplemented, grpc_errors
from protos import agent_pb2, agent_pb2_grpc
from protos import open_inference_pb2 as pb
from protos import open_inference_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVER_NAME = "outrider"
SERVICE_NAME = "inference.GRPCInferenceService"
DEFAULT_MAX_RECEIVE_BYTES = 64 * 1024 * 1024


def package_version() -> str:
    try:
        return importlib.metadata.version("outrider")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout
        return "0.0.0"


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane
        self.shutting_down = threading.Event()
        self._version = package_version()

    @grpc_errors
    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @grpc_errors
    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=not self.shutting_down.is_set())

    @grpc_errors
    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        ready = not self.shutting_down.is_set() and self.plane.ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @grpc_errors
    def ServerMetadata(self, request: pb.ServerMetadataRequest,
                       context: grpc.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=self._version)

    @grpc_errors
    def ModelMetadata(self, request: pb.ModelMetadataRequest,
                      context: grpc.ServicerContext) -> pb.ModelMetadataResponse:
        meta = self.plane.metadata(request.name, request.version)
        return pb.ModelMetadataResponse(
            name=meta.name, versions=meta.versions, platform=meta.platform,
            inputs=[_tensor_metadata(spec) for spec in meta.inputs],
            outputs=[_tensor_metadata(spec) for spec in meta.outputs],
        )

    @grpc_errors
    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        inputs = tensors.wire_inputs(request.inputs, request.raw_input_contents)
        results = self.plane.infer(request.model_name, request.model_version, inputs,
                                   [out.name for out in request.outputs], request.id)
        reply = pb.ModelInferResponse(model_name=self.plane.model_name,
                                      model_version=self.plane.model_version, id=request.id)
        for name, array in results:
            datatype, shape, raw = tensors.to_raw(array)
            reply.outputs.add(name=name, datatype=datatype, shape=shape)
            reply.raw_output_contents.append(raw)
        return reply


class FeedbackServicer(agent_pb2_grpc.FeedbackServiceServicer):
    """Ground truth for earlier ModelInfer requests, by their ``id``."""

    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    @grpc_errors
    def Feedback(self, request: agent_pb2.FeedbackRequest,
                 context: grpc.ServicerContext) -> agent_pb2.FeedbackResponse:
        if not self.plane.joins_labels:
            raise Unimplemented(f"model '{self.plane.model_name}' is served without monitoring, so it keeps "
                                "no predictions to join labels to; serve it with a MonitoredSession")
        labels = []
        for label in request.labels:
            which = label.WhichOneof("value")
            labels.append((label.request_id, getattr(label, which) if which else None, label.row))
        matched, unmatched = self.plane.feedback(labels)
        return agent_pb2.FeedbackResponse(matched=matched, unmatched=unmatched)


def _tensor_metadata(spec: tensors.TensorSpec) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(name=spec.name, datatype=spec.datatype, shape=spec.shape)


class InferenceServer:
    """A running endpoint: its bound ``port``, and ``stop`` for a graceful shutdown."""

    def __init__(self, server: grpc.Server, servicer: InferenceServicer,
                 health_servicer: health.HealthServicer, session: Any, host: str, port: int) -> None:
        self.server = server
        self.servicer = servicer
        self.health = health_servicer
        self.session = session
        self.host = host
        self.port = port
        self._stop_lock = threading.Lock()
        self._stopped = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self, grace: float | None = 5.0) -> None:
        """NOT_SERVING first (so balancers drain us), finish in-flight calls, then close the session."""
        with self._stop_lock:
            if self._stopped:
                return
            self._stopped = True
        self.servicer.shutting_down.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        close = getattr(self.session, "close", None)
        if callable(close):
            close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server has stopped; False if ``timeout`` passed first."""
        return self.server.wait_for_termination(timeout)


def serve(session: InferenceSessionLike, model_name: str, model_version: str,
          listen: str = "127.0.0.1:8001", *, workers: int = 8,
          max_receive_bytes: int = DEFAULT_MAX_RECEIVE_BYTES) -> InferenceServer:
    """Start serving ``session`` on ``listen`` (HOST:PORT; port 0 picks a free one).

    Raises ``OSError`` when the address cannot be bound. Signal handling is
    left to the caller (the CLI installs it): a library must not take over
    the process's signals.
    """
    plane = DataPlane(session, model_name, model_version)
    servicer = InferenceServicer(plane)
    health_servicer = health.HealthServicer()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="outrider-infer"),
        options=[
            # Oversized messages are refused by gRPC itself with RESOURCE_EXHAUSTED.
            ("grpc.max_receive_message_length", max_receive_bytes),
            # Without this a second server on a busy port binds too and steals half the traffic.
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    agent_pb2_grpc.add_FeedbackServiceServicer_to_server(FeedbackServicer(plane), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {listen}: {exc}") from None
    if port == 0:  # older grpcio reports a failed bind as port 0
        raise OSError(f"cannot listen on {listen}")
    host = listen.rsplit(":", 1)[0]
    for service in ("", SERVICE_NAME):  # the model is loaded: SERVING from the first call on
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    server.start()
    log.info("serving %s version %s on %s:%d", model_name, model_version, host, port)
    return InferenceServer(server, servicer, health_servicer, session, host, port)
