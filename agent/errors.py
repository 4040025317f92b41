"""The one error hierarchy of Outrider, and its one mapping to gRPC.

Plain-Python cores raise these; servicers are wrapped with ``grpc_errors`` so
that each becomes ``context.abort(code, message)`` in exactly one place.
Anything else escaping a servicer is a bug: it is logged and answered INTERNAL.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

log = logging.getLogger(__name__)


class OutriderError(Exception):
    """Base class: a failure with a message fit to show the caller."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


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


class Unavailable(OutriderError):
    code = grpc.StatusCode.UNAVAILABLE


F = TypeVar("F", bound=Callable[..., Any])


def grpc_errors(method: F) -> F:
    """Wrap a unary servicer method: OutriderError -> its status, else INTERNAL."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except OutriderError as exc:
            context.abort(exc.code, str(exc))
        except Exception as exc:  # a bug: keep serving, tell the caller plainly
            log.exception("unhandled error in %s", method.__qualname__)
            context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")

    return wrapper  # type: ignore[return-value]
