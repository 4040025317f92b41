"""Request bodies that cannot be decoded: INVALID_ARGUMENT and one log line, on any Outrider gRPC server.

gRPC Python decodes each request with its handler's ``request_deserializer``;
when that raises, gRPC logs a whole traceback and answers INTERNAL
"Exception deserializing request!" -- once per request, so a client sending
garbage floods the log and the status blames the server. ``DecodeGuard``, a
server interceptor, swaps in a deserializer that cannot raise: a body that
does not parse becomes a marker, and the handler around the servicer answers
it with INVALID_ARGUMENT naming the message type, logs one line and counts it.
The servicer never sees it.

It also refuses, before decoding, a body larger than a per-method limit
(``max_bytes``): gRPC's ``max_receive_message_length`` is one size for every
method, but a method whose requests are small by nature (the agent's Feedback:
at most 10,000 labels) should not have to parse, and hold as Python objects,
a 64 MB message of them: RESOURCE_EXHAUSTED, with the limit in the message.

It knows nothing of our services, so the collector's server can put it in its
interceptors as well (after any that authenticate: a refused caller's body is
then never parsed). A server that registers its own handlers wraps each once
instead (``wrap``; ``deserializer`` and ``refusal`` for a handler that guards
itself): no interceptor runs per call (``agent.handlers``).
"""
from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from agent.errors import InvalidArgument, OutriderError, ResourceExhausted, clip_details

log = logging.getLogger(__name__)

# gRPC's experimental attributes of a behavior (e.g. the health service's non-blocking Watch):
# a wrapped behavior keeps them, or it would change how gRPC calls it.
_BEHAVIOR_ATTRIBUTES = ("experimental_non_blocking", "experimental_thread_pool")


class UndecodableRequest(InvalidArgument):
    """A request body that does not decode: what a streamed request's iterator raises."""


class RequestTooLarge(ResourceExhausted):
    """A request body over its method's limit: what a streamed request's iterator raises."""


class Undecodable:
    """What the safe deserializer returns for a body that does not parse (or is too large to)."""

    __slots__ = ("reason", "size")

    def __init__(self, reason: str, size: int = 0) -> None:
        self.reason = reason
        self.size = size  # > 0: not parsed, larger than the method's limit


def _safe(deserializer: Callable[[bytes], Any] | None, limit: int | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:  # the handler takes raw bytes: nothing can fail
        return None

    def deserialize(data: bytes) -> Any:
        if limit is not None and len(data) > limit:
            return Undecodable("too large", len(data))
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or a string field that is not UTF-8 (also DecodeError)
            return Undecodable(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)

    return deserialize


def message_type(deserializer: Callable[[bytes], Any] | None) -> str:
    """'inference.ModelInferRequest' for ``ModelInferRequest.FromString``; 'request' when unknown."""
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return getattr(descriptor, "full_name", "request")


class DecodeGuard(grpc.ServerInterceptor):
    """Answers undecodable request bodies with INVALID_ARGUMENT, and bodies over their method's limit in
    ``max_bytes`` ({"/package.Service/Method": bytes}) with RESOURCE_EXHAUSTED; one log line each,
    counted in ``refused`` and ``too_large``."""

    def __init__(self, max_bytes: dict[str, int] | None = None) -> None:
        self.max_bytes = dict(max_bytes or {})
        self._lock = threading.Lock()
        self._refused = 0
        self._too_large = 0
        # method -> (the handler gRPC gave, its guarded copy): gRPC asks for the handler on every
        # call and gets the same object each time, so each is wrapped once, not per call.
        self._guarded: dict[str, tuple[Any, Any]] = {}

    @property
    def refused(self) -> int:
        """Requests refused because their body could not be decoded."""
        with self._lock:
            return self._refused

    @property
    def too_large(self) -> int:
        """Requests refused because their body was over their method's limit."""
        with self._lock:
            return self._too_large

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Any],
                          handler_call_details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = self.wrap(method, handler)
        self._guarded[method] = (handler, guarded)  # one assignment: threads see the old pair or the new
        return guarded

    def deserializer(self, method: str, handler: Any) -> Callable[[bytes], Any] | None:
        """``handler``'s request deserializer made safe: a body that does not decode, or is over
        ``method``'s limit, becomes an ``Undecodable`` (answer it with ``refusal``), never an exception."""
        return _safe(handler.request_deserializer, self.max_bytes.get(method))

    def refusal(self, method: str, what: str, undecodable: Undecodable, peer: str) -> OutriderError:
        """Count and log one refused body; the error to answer it with."""
        if undecodable.size:
            with self._lock:
                self._too_large += 1
            limit = self.max_bytes[method]
            log.warning("refused %s from %s: a body of %d bytes, over its limit of %d", method, peer,
                        undecodable.size, limit)
            return RequestTooLarge(f"a {what} of {undecodable.size} bytes is over this server's limit of {limit} "
                                     "bytes for it; send less in each call")
        with self._lock:
            self._refused += 1
        log.warning("refused %s from %s: the body is not a valid %s (%s)", method, peer, what, undecodable.reason)
        return UndecodableRequest(f"the request body is not a valid {what} message ({undecodable.reason}); "
                                  "check that client and server use the same .proto definitions")

    def wrap(self, method: str, handler: Any) -> Any:
        """``handler`` of ``method`` guarded: what ``intercept_service`` gives gRPC for it. A server that knows
        its handlers wraps each once at registration and needs no interceptor (``agent.handlers``)."""
        what = message_type(handler.request_deserializer)
        refusal = self.refusal
        safe = self.deserializer(method, handler)

        def abort(context: grpc.ServicerContext, error: OutriderError) -> None:
            context.abort(error.code, clip_details(str(error)))

        if handler.request_streaming:
            # A streamed request that does not decode surfaces where the stream is read -- which may be
            # another thread than the handler's (the collector reads agent streams on their own thread),
            # where context.abort would be wrong: the iterator raises the refusal as an OutriderError,
            # which our servicers' one mapping answers; a handler that lets it escape is answered here.
            def checked(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
                for request in requests:
                    if isinstance(request, Undecodable):
                        raise refusal(method, what, request, context.peer())
                    yield request

            if handler.response_streaming:
                behavior = handler.stream_stream

                def guarded(requests: Iterator[Any], context: grpc.ServicerContext, *args: Any, **kwargs: Any) -> Any:
                    try:
                        yield from behavior(checked(requests, context), context, *args, **kwargs)
                    except (UndecodableRequest, RequestTooLarge) as error:
                        abort(context, error)
            else:
                behavior = handler.stream_unary

                def guarded(requests: Iterator[Any], context: grpc.ServicerContext, *args: Any, **kwargs: Any) -> Any:
                    try:
                        return behavior(checked(requests, context), context, *args, **kwargs)
                    except (UndecodableRequest, RequestTooLarge) as error:
                        abort(context, error)
        else:
            behavior = handler.unary_unary or handler.unary_stream
            if inspect.iscoroutinefunction(behavior):  # a grpc.aio server's (agent.grpc_loop): abort is awaited

                async def guarded(request: Any, context: Any, *args: Any, **kwargs: Any) -> Any:
                    if isinstance(request, Undecodable):
                        error = refusal(method, what, request, context.peer())
                        await context.abort(error.code, clip_details(str(error)))
                    return await behavior(request, context, *args, **kwargs)
            else:

                def guarded(request: Any, context: grpc.ServicerContext, *args: Any, **kwargs: Any) -> Any:
                    if isinstance(request, Undecodable):
                        abort(context, refusal(method, what, request, context.peer()))
                    return behavior(request, context, *args, **kwargs)

        for name in _BEHAVIOR_ATTRIBUTES:
            if hasattr(behavior, name):
                setattr(guarded, name, getattr(behavior, name))
        return handler_like(handler, guarded, request_deserializer=safe,
                            response_serializer=handler.response_serializer)


def handler_like(handler: grpc.RpcMethodHandler, behavior: Callable[..., Any], **kwargs: Any) -> grpc.RpcMethodHandler:
    """A method handler running ``behavior`` with ``handler``'s arity (streamed requests, streamed replies)."""
    make = {(False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler}[
        (bool(handler.request_streaming), bool(handler.response_streaming))]
    return make(behavior, **kwargs)
