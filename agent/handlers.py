"""The agent port's gRPC handlers, wrapped once when they are registered instead of on every call.

gRPC Python runs a server's interceptors on every call, in the one thread that takes calls off the
completion queue for all the workers, and each wrapper layer is more Python under the GIL: at a few
thousand small requests a second that is what keeps `agent serve` below a plain grpcio server (issue 12).
So the agent's own port has no interceptor unless tokens are checked:

- every method is guarded against bodies that do not decode (``agent.guard.DecodeGuard.wrap``) once,
  when it is registered;
- ModelInfer is one layer (``model_infer``) that does what three did per call -- the metrics
  interceptor, the decode guard's wrapper and ``agent.errors.grpc_errors`` -- with the same statuses,
  messages, log lines and metrics: a refused body answered INVALID_ARGUMENT or RESOURCE_EXHAUSTED,
  the servicer's errors through the one mapping (``agent.errors.grpc_abort``), every call counted and
  timed with the ``agent.metrics.Recorder`` of the version served when it ends.

The access check (``agent.tokens.AccessInterceptor``) stays an interceptor: it reads each call's
metadata before the body is decoded, so a refused caller's body never is. With it the metrics'
interceptor comes first again, to count and time the calls it refuses; calls the ModelInfer handler
answered it leaves alone (``agent.metrics.RECORDS_ITSELF``).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import grpc

from agent.errors import grpc_abort
from agent.guard import DecodeGuard, Undecodable, message_type
from agent.metrics import RECORDS_ITSELF, AgentMetrics

# A generated ``add_<Service>Servicer_to_server(servicer, server)``.
AddToServer = Callable[[Any, Any], None]
# {full method name "/package.Service/Method": its own handler made from the generated one}
OwnHandlers = Mapping[str, Callable[[grpc.RpcMethodHandler], grpc.RpcMethodHandler]]


class _Registrar:
    """Stands in for a ``grpc.Server`` to a generated ``add_..._to_server``: keeps its method handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, generic_handlers: Iterable[Any]) -> None:
        pass  # the same handlers come by name through add_registered_method_handlers

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self.services[service] = dict(handlers)


def method_handlers(add_to_server: AddToServer, servicer: Any) -> dict[str, dict[str, grpc.RpcMethodHandler]]:
    """{service: {method: handler}} as the generated ``add_to_server`` would register ``servicer``."""
    registrar = _Registrar()
    add_to_server(servicer, registrar)
    if not registrar.services:  # code generated before grpcio-tools 1.62 registers generic handlers only
        raise RuntimeError(f"{add_to_server.__qualname__} registers no method handlers by name: regenerate "
                           "the gRPC code with the pinned grpcio-tools")
    return registrar.services


def register(server: grpc.Server, servicers: Iterable[tuple[AddToServer, Any]], guard: DecodeGuard,
             own: OwnHandlers | None = None) -> None:
    """Register each (generated ``add_to_server``, servicer) on ``server``, every method guarded by
    ``guard`` once; a method in ``own`` gets ``own[method](generated handler)`` instead, which guards itself."""
    own = own or {}
    for add_to_server, servicer in servicers:
        for service, handlers in method_handlers(add_to_server, servicer).items():
            wrapped = {}
            for name, handler in handlers.items():
                method = f"/{service}/{name}"
                make = own.get(method)
                wrapped[name] = make(handler) if make is not None else guard.wrap(method, handler)
            # By name, as generated code does: gRPC's core then matches the method, no lookup in Python.
            server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
            server.add_registered_method_handlers(service, wrapped)


def model_infer(handler: grpc.RpcMethodHandler, method: str, infer: Callable[[Any], Any], switch: Any,
                guard: DecodeGuard, metrics: AgentMetrics | None, where: str) -> grpc.RpcMethodHandler:
    """ModelInfer's handler in one layer around ``infer(request) -> reply`` (the servicer's, raising
    ``agent.errors`` exceptions): ``guard``'s refusal of a body that does not decode or is over its limit,
    the one error mapping (a bug is logged as one in ``where``), and ``metrics`` (None: none) counting and
    timing every call under the version ``switch`` serves when the call ends -- what
    ``metrics.bind(lambda: servicer.plane)`` names, as the metrics interceptor counted it."""
    what = message_type(handler.request_deserializer)
    refusal = guard.refusal
    clock = time.perf_counter
    unknown = grpc.StatusCode.UNKNOWN
    last: tuple[Any, Any] = (None, None)  # (plane, its Recorder): one tuple, read and replaced whole

    def recorder() -> Any:
        nonlocal last
        current = switch.current
        plane = current.plane if current is not None else None
        cached = last
        if cached[1] is None or cached[0] is not plane:  # the first call, or the first after a swap
            cached = last = (plane, metrics.recorder(plane))  # type: ignore[union-attr]
        return cached[1]

    def failed(started: float, context: grpc.ServicerContext) -> None:
        if metrics is not None:
            recorder().record(clock() - started, context.code() or unknown)

    def behavior(request: Any, context: grpc.ServicerContext) -> Any:
        started = clock()
        try:
            if request.__class__ is Undecodable:
                raise refusal(method, what, request, context.peer())
            reply = infer(request)
        except Exception as exc:
            try:
                grpc_abort(context, exc, where)  # raises: the status is on the context
            finally:
                failed(started, context)
        except BaseException:  # not answered by us (e.g. KeyboardInterrupt): counted, and on its way
            failed(started, context)
            raise
        if metrics is not None:  # recorder() inlined: this runs on every answered call
            elapsed = clock() - started
            current = switch.current
            plane = current.plane if current is not None else None
            cached = last
            (cached[1] if cached[0] is plane and cached[1] is not None else recorder()).ok(elapsed)
        return reply

    if metrics is not None:
        setattr(behavior, RECORDS_ITSELF, metrics)
    return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=guard.deserializer(method, handler),
                                               response_serializer=handler.response_serializer)


def interceptors(access: grpc.ServerInterceptor | None, metrics: AgentMetrics | None) -> list[grpc.ServerInterceptor]:
    """The agent port's interceptors: none without tokens; else the metrics' (counting the calls the
    access check refuses, outermost) and the access check."""
    if access is None:
        return []
    return [metrics.interceptor, access] if metrics is not None else [access]
