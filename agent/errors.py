"""The one error hierarchy of Outrider, and its one mapping to gRPC (and to HTTP).

Plain-Python cores raise these; servicers are wrapped with ``grpc_errors``
(``grpc_stream_errors`` for streaming replies) so that each becomes ``context.abort(code, message)`` in exactly one place.
Anything else escaping a servicer is a bug: it is logged and answered INTERNAL.

The message travels in the ``grpc-message`` trailer, percent-encoded, and
clients refuse trailers beyond 8 KiB (gRPC's default metadata limit): a
message that echoes a caller's 20,000-character model name would reach the
caller as RESOURCE_EXHAUSTED "metadata too large" instead of its real status.
So the one mapping sends only the start of a long message (``clip_details``:
what went wrong comes first in our messages) and says how much was cut.

The agent's Open Inference Protocol over HTTP/REST (``agent.rest``) answers the
same errors with the HTTP status ``http_status`` reads from ``HTTP_STATUS``
and a JSON ``{"error": message}`` body (``http_error``).
"""
from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class OutriderError(Exception):
    """Base class: a failure with a message fit to show the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    trailing_metadata: tuple[tuple[str, str], ...] = ()  # sent with the status, e.g. retry-after-ms


class InvalidArgument(OutriderError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(OutriderError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(OutriderError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(OutriderError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(OutriderError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(OutriderError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(OutriderError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str = "", *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        if retry_after_ms is not None:  # tells the caller when to try again
            self.trailing_metadata = (("retry-after-ms", str(int(retry_after_ms))),)


class Unimplemented(OutriderError):
    """The server cannot do what was asked (e.g. feedback to a bare InferenceSession)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Unavailable(OutriderError):
    code = grpc.StatusCode.UNAVAILABLE


class PayloadTooLarge(ResourceExhausted):
    """A request body over its byte budget (gRPC refuses those itself with RESOURCE_EXHAUSTED)."""


# The one HTTP mapping: the most specific class of an error that is listed here gives its status.
# 400 for what the caller must change (KServe's REST errors are 400 or 404); 503 for what passes.
HTTP_STATUS: dict[type[OutriderError], int] = {
    InvalidArgument: 400,
    FailedPrecondition: 400,
    NotFound: 404,
    AlreadyExists: 409,
    Unauthenticated: 401,
    PermissionDenied: 403,
    ResourceExhausted: 429,
    PayloadTooLarge: 413,
    Unimplemented: 501,
    Unavailable: 503,
    OutriderError: 500,
}


F = TypeVar("F", bound=Callable[..., Any])

# Bytes of the percent-encoded grpc-message trailer a status message may take: far below the
# 8 KiB clients accept for all metadata, and still room for a few hundred words.
MAX_DETAILS_BYTES = 2048


def clip_details(text: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """``text`` if its percent-encoded form fits in ``limit`` bytes, else its start and how much was cut.

    Printable ASCII (but ``%``) travels as is, every other UTF-8 byte as ``%XX``;
    only the kept start is looked at, so a megabyte of text costs no more than a short one.
    """
    if len(text) * 12 <= limit:  # a character costs at most 4 UTF-8 bytes x 3
        return text
    room = limit - 48  # the note on what was cut
    cost, cut = 0, 0
    for i, char in enumerate(text):
        code = ord(char)
        cost += 1 if 0x20 <= code < 0x7F and char != "%" else 3 * len(char.encode("utf-8", "replace"))
        if cost <= room:
            cut = i + 1
        elif cost > limit:
            return f"{text[:cut]}... ({len(text) - cut} more characters cut)"
    return text


def http_status(exc: BaseException) -> int:
    """The HTTP status of ``exc``: from ``HTTP_STATUS`` for our errors, 500 for anything else (a bug)."""
    for cls in type(exc).__mro__:
        status = HTTP_STATUS.get(cls)  # type: ignore[call-overload]
        if status is not None:
            return status
    return 500


def http_error(exc: BaseException) -> tuple[int, bytes, list[tuple[str, str]]]:
    """(status, JSON ``{"error": message}`` body, extra headers) answering ``exc`` over HTTP.

    The message is clipped as gRPC's is, so both transports say the same; anything but our
    errors is a bug: logged, and answered 500 with its type."""
    if isinstance(exc, OutriderError):
        message, headers = str(exc), []
        retry = dict(exc.trailing_metadata).get("retry-after-ms")
        if retry is not None:  # HTTP counts whole seconds
            headers.append(("retry-after", str(max(1, -(-int(retry) // 1000)))))
    else:
        log.error("unhandled error answering an HTTP request", exc_info=exc)
        message, headers = f"internal error: {type(exc).__name__}: {exc}", []
    body = json.dumps({"error": clip_details(message)}).encode()
    return http_status(exc), body, headers


def grpc_status(exc: Exception, where: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """(code, details, trailing metadata) answering ``exc``: an OutriderError's own; anything else, a
    bug in ``where`` (a method's qualified name), is logged and answered INTERNAL. The one mapping:
    ``grpc_abort`` and the agent's asynchronous ModelInfer (``agent.handlers``) both use it."""
    if isinstance(exc, OutriderError):
        return exc.code, clip_details(str(exc)), tuple(exc.trailing_metadata)
    # a bug: keep serving, tell the caller plainly
    log.error("unhandled error in %s", where, exc_info=exc)
    return grpc.StatusCode.INTERNAL, clip_details(f"internal error: {type(exc).__name__}: {exc}"), ()


def grpc_abort(context: grpc.ServicerContext, exc: Exception, where: str) -> None:
    """Answer ``exc`` on ``context`` with ``grpc_status`` (raises, as ``context.abort`` does)."""
    code, details, trailing = grpc_status(exc, where)
    if trailing:
        context.set_trailing_metadata(trailing)
    context.abort(code, details)


def grpc_errors(method: F) -> F:
    """Wrap a unary servicer method: OutriderError -> its status, else INTERNAL."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            grpc_abort(context, exc, method.__qualname__)

    return wrapper  # type: ignore[return-value]


def grpc_stream_errors(method: F) -> F:
    """``grpc_errors`` for a servicer method that yields its responses (a generator)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from method(self, request, context)
        except Exception as exc:  # GeneratorExit (the client went away) is not an Exception
            grpc_abort(context, exc, method.__qualname__)

    return wrapper  # type: ignore[return-value]
