"""The hub's gRPC error edge: our exceptions become status codes, anything else is logged and hidden.

One server interceptor wraps every handler (ours and the health service):
- a `HubError` aborts with its own status code, message and metadata (`x-tandem-error`, and
  `x-tandem-binding` for a budget);
- the models' `InvalidRequest` (bad sampling values, a prompt the model cannot take) is INVALID_ARGUMENT;
- any other exception is a bug: it is logged with its traceback and a request id, and the caller gets
  INTERNAL with that id (`x-tandem-request-id`) and no traceback, so an operator can find the log line.

Wrapped handlers are built once per method and reused; per call the cost is one dictionary lookup,
and per streamed message one more async-generator step (what a decorator per method cost before).
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Awaitable, Callable

import grpc

from cloud_hub.errors import HubError, InvalidRequest
from models.errors import InvalidRequest as ModelInvalidRequest

log = logging.getLogger("tandem.hub")

_PASS_THROUGH = (grpc.aio.AbortError, grpc.aio.UsageError)
"""Raised by context.abort and by gRPC itself: already a status, never a bug of ours."""


def request_id_of(request: object) -> str:
    """The caller's request id when its message carries one, else a fresh random one."""
    return getattr(request, "request_id", "") or os.urandom(8).hex()


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str, request: object) -> None:
    """Abort the call for `exc`, as the module docstring says. Always raises (AbortError)."""
    if isinstance(exc, ModelInvalidRequest):
        exc = InvalidRequest(str(exc))
    if isinstance(exc, HubError):
        await context.abort(exc.code, str(exc), trailing_metadata=exc.metadata())
    rid = request_id_of(request)
    log.error("internal error in %s (request id %s)", method, rid, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL,
        f"internal error in the hub (request id {rid}); the hub's log has the details",
        trailing_metadata=(("x-tandem-error", "internal"), ("x-tandem-request-id", rid)),
    )


def _wrap_unary_response(behavior: Callable[..., Awaitable], method: str) -> Callable[..., Awaitable]:
    async def call(request, context):
        try:
            return await behavior(request, context)
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            await abort_with(context, exc, method, request)

    return call


def _wrap_streaming_response(behavior: Callable, method: str) -> Callable:
    if not inspect.isasyncgenfunction(behavior):  # writes with context.write (the health service's Watch)
        return _wrap_unary_response(behavior, method)

    async def stream(request, context):
        try:
            async for item in behavior(request, context):
                yield item
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            await abort_with(context, exc, method, request)

    return stream


def wrap_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """The same handler, its behavior wrapped by the error edge."""
    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_wrap_unary_response(handler.unary_unary, method), **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_wrap_streaming_response(handler.unary_stream, method), **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_wrap_unary_response(handler.stream_unary, method), **codec)
    return grpc.stream_stream_rpc_method_handler(_wrap_streaming_response(handler.stream_stream, method), **codec)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method: gRPC answers UNIMPLEMENTED itself
            return handler
        method = handler_call_details.method
        hit = self._wrapped.get(method)
        if hit is None or hit[0] is not handler:
            hit = self._wrapped[method] = (handler, wrap_handler(handler, method))
        return hit[1]
