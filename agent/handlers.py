"""The agent port's gRPC handlers, wrapped once when they are registered instead of on every call.

The port is a ``grpc.aio`` server (``agent.grpc_loop``): ModelInfer is a coroutine answered on the
server's event loop, every other method a plain function on its thread pool. The processes of
``agent serve --processes N`` run grpcio's threads server instead (``agent.server``: why), where every
call runs on a pool thread; the handlers are the same, only how a call is aborted differs. Each wrapper layer is more
Python on every call, and at a few thousand small requests a second that is what kept `agent serve` below
a plain grpcio server (issue 12). So the agent's own port has no interceptor unless tokens are checked:

- every method is guarded against bodies that do not decode (``agent.guard.DecodeGuard.wrap``) once,
  when it is registered;
- ModelInfer is one layer (``model_infer``) that does what three did per call -- the metrics
  interceptor, the decode guard's wrapper and ``agent.errors.grpc_errors`` -- with the same statuses,
  messages, log lines and metrics: a refused body answered INVALID_ARGUMENT or RESOURCE_EXHAUSTED,
  the servicer's errors through the one mapping (``agent.errors.grpc_status``), every call counted and
  timed with the ``agent.metrics.Recorder`` of the version served when it ends.

The access check (``agent.tokens.AccessInterceptor.refusal``) stays an interceptor (``_Access``, or
``_ThreadsAccess`` on the threads server): it reads
each call's metadata before the body is decoded, so a refused caller's body never is, and it counts the
ModelInfer calls it refuses in the metrics.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor
from typing import Any

import grpc

from agent.errors import grpc_status
from agent.guard import DecodeGuard, Undecodable, handler_like, message_type
from agent.metrics import INFER_METHOD, AgentMetrics

log = logging.getLogger(__name__)

# A call on the event loop that takes longer holds up every other call, health checks included: said once.
SLOW_ON_LOOP_SECONDS = 0.1
# A generated ``add_<Service>Servicer_to_server(servicer, server)``.
AddToServer = Callable[[Any, Any], None]
# ``AgentMetrics.observe(seconds, code)``: one call counted under its status code.
Observe = Callable[[float, grpc.StatusCode], None]
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


class _Failure:
    """A ModelInfer call answered with an error: what the server-specific wrapper aborts the call with."""

    __slots__ = ("code", "details", "trailing")

    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any) -> None:
        self.code, self.details, self.trailing = code, details, trailing


def model_infer(handler: grpc.RpcMethodHandler, method: str, infer: Callable[[Any], Any], switch: Any,
                guard: DecodeGuard, metrics: AgentMetrics | None, where: str,
                threads: Executor | None = None, asynchronous: bool = True) -> grpc.RpcMethodHandler:
    """ModelInfer's handler in one layer around ``infer(request) -> reply`` (the servicer's, raising
    ``agent.errors`` exceptions): ``guard``'s refusal of a body that does not decode or is over its limit,
    the one error mapping (a bug is logged as one in ``where``), and ``metrics`` (None: none) counting and
    timing every call under the version ``switch`` serves when the call ends -- what
    ``metrics.bind(lambda: servicer.plane)`` names.

    ``asynchronous``: for the asyncio server (``agent.grpc_loop``). With ``threads`` None each call runs on the
    server's event loop as it arrives, no hand-off to a thread (one call at a time: onnxruntime's own threads
    are the only parallelism); with an executor its threads run ``infer`` side by side, for models whose run
    takes long enough that calls should overlap. Not ``asynchronous``: for grpcio's threads server, whose
    pool threads run the calls."""
    what = message_type(handler.request_deserializer)
    refusal = guard.refusal
    clock = time.perf_counter
    last: tuple[Any, Any] = (None, None)  # (plane, its Recorder): one tuple, read and replaced whole
    on_loop = asynchronous and threads is None  # a long call holds up every other
    warned = False  # a call held the loop over SLOW_ON_LOOP_SECONDS, and the log said so

    def slow_on_loop(seconds: float) -> None:
        nonlocal warned
        warned = True
        log.warning("a ModelInfer call took %.0f ms on the server's event loop, where calls run one at a time and "
                    "health checks wait behind them: serve this model with --threaded-infer (calls side by side "
                    "on the --workers threads) or --processes N", seconds * 1e3)

    def recorder() -> Any:
        nonlocal last
        current = switch.current
        plane = current.plane if current is not None else None
        cached = last
        if cached[1] is None or cached[0] is not plane:  # the first call, or the first after a swap
            cached = last = (plane, metrics.recorder(plane))  # type: ignore[union-attr]
        return cached[1]

    def attempt(request: Any, context: Any) -> Any:
        """The reply, or a ``_Failure`` (counted) for the wrapper to answer: aborting is the one thing the
        two servers do differently."""
        started = clock()
        try:
            if request.__class__ is Undecodable:
                raise refusal(method, what, request, context.peer())
            reply = infer(request)
        except Exception as exc:
            code, details, trailing = grpc_status(exc, where)
            if metrics is not None:
                recorder().record(clock() - started, code)
            return _Failure(code, details, trailing)
        elapsed = clock() - started
        if on_loop and elapsed > SLOW_ON_LOOP_SECONDS and not warned:
            slow_on_loop(elapsed)
        if metrics is not None:  # recorder() inlined: this runs on every answered call
            current = switch.current
            plane = current.plane if current is not None else None
            cached = last
            (cached[1] if cached[0] is plane and cached[1] is not None else recorder()).ok(elapsed)
        return reply

    async def on_the_loop(request: Any, context: grpc.aio.ServicerContext) -> Any:
        reply = attempt(request, context)
        if reply.__class__ is _Failure:
            if reply.trailing:
                context.set_trailing_metadata(reply.trailing)
            await context.abort(reply.code, reply.details)
        return reply

    async def on_a_thread(request: Any, context: grpc.aio.ServicerContext) -> Any:
        started = clock()
        try:
            reply = await asyncio.get_running_loop().run_in_executor(threads, attempt, request, context)
        except BaseException:  # not answered by us (the call was cancelled): counted, and on its way
            if metrics is not None:
                recorder().record(clock() - started, grpc.StatusCode.CANCELLED)
            raise
        if reply.__class__ is _Failure:
            if reply.trailing:
                context.set_trailing_metadata(reply.trailing)
            await context.abort(reply.code, reply.details)
        return reply

    def on_the_pool(request: Any, context: grpc.ServicerContext) -> Any:
        reply = attempt(request, context)
        if reply.__class__ is _Failure:
            if reply.trailing:
                context.set_trailing_metadata(reply.trailing)
            context.abort(reply.code, reply.details)
        return reply

    behavior = on_the_pool if not asynchronous else on_the_loop if threads is None else on_a_thread
    return grpc.unary_unary_rpc_method_handler(behavior, request_deserializer=guard.deserializer(method, handler),
                                               response_serializer=handler.response_serializer)


class _Refusing:
    """What both servers' access interceptors share: ``access.refusal`` decides, and a refused call is answered
    by the interceptor, before its body is decoded; a refused ModelInfer is counted in ``metrics`` under its
    code (with no time: no model ran), as the servicer's own failures are."""

    def __init__(self, access: Any, metrics: AgentMetrics | None) -> None:
        self.access = access
        self.metrics = metrics

    def _refusal(self, handler: grpc.RpcMethodHandler | None,
                 details: grpc.HandlerCallDetails) -> tuple[grpc.StatusCode, str, Observe | None] | None:
        """None: the call goes on to ``handler`` (None for an unknown method: gRPC answers UNIMPLEMENTED); else
        (code, message, the metrics' observe for a refused ModelInfer or None)."""
        if handler is None:
            return None
        refused = self.access.refusal(details)
        if refused is None:
            return None
        counted = self.metrics is not None and details.method == INFER_METHOD
        code, message = refused
        return code, message, self.metrics.observe if counted else None  # type: ignore[union-attr]


class _Access(_Refusing, grpc.aio.ServerInterceptor):
    """The access check on the asyncio server."""

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        refused = self._refusal(handler, details)
        if refused is None:
            return handler
        code, message, observe = refused

        async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
            if observe is not None:
                observe(0.0, code)
            await context.abort(code, message)

        return handler_like(handler, abort)


class _ThreadsAccess(_Refusing, grpc.ServerInterceptor):
    """The access check on grpcio's threads server: the same decision and count, answered synchronously."""

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        refused = self._refusal(handler, details)
        if refused is None:
            return handler
        code, message, observe = refused

        def abort(request: Any, context: grpc.ServicerContext) -> None:
            if observe is not None:
                observe(0.0, code)
            context.abort(code, message)

        return handler_like(handler, abort)


def interceptors(access: Any, metrics: AgentMetrics | None, asynchronous: bool = True) -> list[Any]:
    """The agent port's interceptors: none without tokens (``access``: an ``agent.tokens.AccessInterceptor``);
    else the access check, counting the ModelInfer calls it refuses in ``metrics`` -- for the asyncio server,
    or (not ``asynchronous``) grpcio's threads server."""
    if access is None:
        return []
    return [_Access(access, metrics) if asynchronous else _ThreadsAccess(access, metrics)]
