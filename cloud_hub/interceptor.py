"""The hub's gRPC error edge: our exceptions become status codes, anything else is logged and hidden.

One server interceptor wraps every handler (ours and the health service):
- a `HubError` aborts with its own status code, message and metadata (`x-tandem-error`, and
  `x-tandem-binding` for a budget);
- the models' `InvalidRequest` (bad sampling values, a prompt the model cannot take) is INVALID_ARGUMENT;
- any other exception is a bug: it is logged with its traceback and a request id, and the caller gets
  INTERNAL with that id (`x-tandem-request-id`) and no traceback, so an operator can find the log line.

Wrapped handlers are built once per method and reused; per call the cost is one dictionary lookup,
and per streamed message one more async-generator step (what a decorator per method cost before).

`AdmissionInterceptor`, first in the server's list, admits calls before any handler runs (the per-key
rate limit): a refused call ends with its error's status and metadata, and no servicer sees it.

`DeviceCertInterceptor`, with mutual TLS, refuses a call that names a device unless the connection's
verified client certificate is that device's.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Collection

import grpc
from google.protobuf.message import DecodeError

from cloud_hub.errors import HubError, InvalidRequest, Unauthenticated
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


Prepare = Callable[[object], object]
"""What the error edge does to a call's request before the handler sees it (parsing its bytes)."""


def _as_is(request: object) -> object:
    return request


def _wrap_unary_response(behavior: Callable[..., Awaitable], method: str, prepare: Prepare) -> Callable:
    async def call(request, context):
        parsed = None  # for the caller's request id, once parsed
        try:
            parsed = prepare(request)
            return await behavior(parsed, context)
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            await abort_with(context, exc, method, parsed)

    return call


def _wrap_streaming_response(behavior: Callable, method: str, prepare: Prepare) -> Callable:
    if not inspect.isasyncgenfunction(behavior):  # writes with context.write (the health service's Watch)
        return _wrap_unary_response(behavior, method, prepare)

    async def stream(request, context):
        parsed = None
        try:
            parsed = prepare(request)
            async for item in behavior(parsed, context):
                yield item
        except _PASS_THROUGH:
            raise
        except Exception as exc:
            await abort_with(context, exc, method, parsed)

    return stream


def _parser(parse: Callable[[bytes], object] | None) -> Prepare:
    """Parses one request's bytes, so that bytes that are no message of the method's type are
    INVALID_ARGUMENT from the error edge (gRPC's own deserializer would answer UNKNOWN)."""
    if parse is None:
        return _as_is

    def prepare(raw: object) -> object:
        try:
            return parse(raw)  # type: ignore[arg-type]
        except DecodeError as exc:
            raise InvalidRequest(f"request: not a valid protobuf message of this method's type ({exc})") from None

    return prepare


def _stream_parser(parse: Callable[[bytes], object] | None) -> Prepare:
    """As `_parser`, for a stream of requests: each is parsed as the handler reads it."""
    if parse is None:
        return _as_is
    one = _parser(parse)

    async def messages(raw: AsyncIterator[bytes]) -> AsyncIterator[object]:
        async for item in raw:
            yield one(item)

    return messages  # type: ignore[return-value]


def wrap_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """The same handler, its behavior wrapped by the error edge, which also parses its requests."""
    parse, codec = handler.request_deserializer, {"response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        call = _wrap_unary_response(handler.unary_unary, method, _parser(parse))
        return grpc.unary_unary_rpc_method_handler(call, **codec)
    if handler.unary_stream is not None:
        call = _wrap_streaming_response(handler.unary_stream, method, _parser(parse))
        return grpc.unary_stream_rpc_method_handler(call, **codec)
    if handler.stream_unary is not None:
        call = _wrap_unary_response(handler.stream_unary, method, _stream_parser(parse))
        return grpc.stream_unary_rpc_method_handler(call, **codec)
    call = _wrap_streaming_response(handler.stream_stream, method, _stream_parser(parse))
    return grpc.stream_stream_rpc_method_handler(call, **codec)


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


def bearer(metadata: object) -> str | None:
    """The API key of `authorization: Bearer <key>` in a call's metadata ((key, value) pairs), if any."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[7:]
    return None


def refusal(handler: grpc.RpcMethodHandler, exc: HubError) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind that only aborts with `exc`'s status, message and metadata."""

    async def refuse(request, context):
        await context.abort(exc.code, str(exc), trailing_metadata=exc.metadata())

    async def refuse_stream(request, context):
        await refuse(request, context)
        yield  # never reached (abort raises): this makes it the async generator a streaming handler is

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse_stream)


class AdmissionInterceptor(grpc.aio.ServerInterceptor):
    """Calls `admit(api key)` for each call of `methods` (full names, "/tandem.v1.Inference/Generate")
    before its handler runs; a HubError it raises (RateLimited) refuses the call. Other methods pass
    untouched. Place it first, before ErrorInterceptor: a refusal then costs no wrapped handler."""

    def __init__(self, admit: Callable[[str | None], None], methods: Collection[str]) -> None:
        self.admit, self.methods = admit, frozenset(methods)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method not in self.methods:
            return handler
        try:
            self.admit(bearer(handler_call_details.invocation_metadata))
        except HubError as exc:
            return refusal(handler, exc)
        return handler


DEVICE_ID_HEADER = "x-tandem-device-id"
WORK_CHANNEL = "/tandem.v1.WorkChannel/Connect"
"""The one device call that may come without a certificate: its servicer answers it with the
Welcome (which names the device port) before refusing it (cloud_hub.servicers.WorkChannelServicer)."""

REENROLL_HINT = (
    "an agent dials the hub's device port with the certificate it got at enrollment; one enrolled "
    "before the hub required certificates must re-enroll: remove credentials.json from its state "
    "directory and run it again with a new --token"
)


def certified_device(context: grpc.aio.ServicerContext) -> str | None:
    """The CN of the call's verified client certificate (the device id the CA signed it for), or None
    when the connection presented none."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if len(names) == 1 else None


def device_refusal(context: grpc.aio.ServicerContext, device_ids: list[str]) -> Unauthenticated | None:
    """Why a call naming `device_ids` (its x-tandem-device-id values) may not go on; None when its
    connection's certificate is that device's."""
    certified = certified_device(context)
    if certified is None:
        return Unauthenticated(
            f"device {device_ids[0]!r}: this hub requires the device's client certificate (mutual TLS) "
            f"and the call presented none; {REENROLL_HINT}"
        )
    if set(device_ids) != {certified}:
        return Unauthenticated(f"the client certificate is device {certified!r}'s, not {device_ids[0]!r}'s")
    return None


def _guarded(handler: grpc.RpcMethodHandler, device_ids: list[str], uncertified: bool = False) -> grpc.RpcMethodHandler:
    """`handler`, first refusing the call unless its client certificate is for `device_ids`; with
    `uncertified`, a call presenting no certificate at all goes on to the handler, which refuses it."""

    async def check(context: grpc.aio.ServicerContext) -> None:
        refused = device_refusal(context, device_ids)
        if refused is not None and not (uncertified and certified_device(context) is None):
            await context.abort(refused.code, str(refused), trailing_metadata=refused.metadata())

    def once(inner: Callable) -> Callable:
        async def call(request, context):
            await check(context)
            return await inner(request, context)

        return call

    def streaming(inner: Callable) -> Callable:
        if not inspect.isasyncgenfunction(inner):  # writes with context.write
            return once(inner)

        async def stream(request, context):
            await check(context)
            async for item in inner(request, context):
                yield item

        return stream

    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(once(handler.unary_unary), **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(once(handler.stream_unary), **codec)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **codec)


class DeviceCertInterceptor(grpc.aio.ServerInterceptor):
    """Mutual TLS for devices: a call that names a device (x-tandem-device-id: the work channel,
    Deregister, any device RPC) must come over a connection whose verified client certificate is that
    device's (CN = its id), or it is refused UNAUTHENTICATED before its handler runs. The servicer
    still checks the device credential: a call needs both. Calls naming no device (SDK calls with an
    API key, Enroll with its token) pass untouched.

    Only the hub's device port asks for client certificates (gRPC Python can require one on a port or
    not ask at all), so a device call on the main port, which has none, is refused too. One exception:
    the work channel (WORK_CHANNEL) without a certificate reaches its servicer, which refuses it
    after one Welcome, so that an agent whose device port moved finds the new one on the main port."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        named = [v for k, v in handler_call_details.invocation_metadata or () if k == DEVICE_ID_HEADER]
        if handler is None or not named:
            return handler
        return _guarded(handler, [str(v) for v in named], handler_call_details.method == WORK_CHANNEL)
