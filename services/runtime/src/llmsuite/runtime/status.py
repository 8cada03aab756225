"""The one place where errors become gRPC statuses.

`ErrorMappingInterceptor` wraps every handler: an `LlmsuiteError` becomes its
status code with rich details (google.rpc.Status: ErrorInfo, BadRequest field
violations, RetryInfo); a MemoryError becomes RESOURCE_EXHAUSTED; anything
else is logged with its traceback and becomes INTERNAL with a message that
names only the request id.

Messages and details often quote the caller's input (a model name, a path),
so what a status carries is capped here (`MAX_MESSAGE_BYTES`,
`MAX_STATUS_BYTES`): a huge input must not turn into a trailer that clients
refuse (gRPC C-core's default metadata soft limit is 8 KiB). Every status also
carries the request id in its trailers.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from llmsuite.runtime.errors import FieldViolation, LlmsuiteError, ResourceExhausted, Unavailable
from llmsuite.runtime.logs import REQUEST_ID_HEADER, current_request_id

log = logging.getLogger("llmsuite.errors")

ERROR_DOMAIN = "llmsuite.dev"

# grpc-message percent-encodes every non-ASCII byte, so 512 bytes are at most
# 1,536 characters on the wire.
MAX_MESSAGE_BYTES = 512
# The serialized google.rpc.Status travels base64-encoded (4/3 larger).
MAX_STATUS_BYTES = 2048
MAX_DETAIL_VALUE_BYTES = 160
MAX_FIELD_PATH_BYTES = 128
TRUNCATION_MARK = "…"


def truncate_utf8(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (marked with an ellipsis), never mid-character."""
    encoded = text.encode("utf-8", "replace")
    if len(encoded) <= limit:
        return text
    room = limit - len(TRUNCATION_MARK.encode())
    return encoded[:room].decode("utf-8", "ignore") + TRUNCATION_MARK


def _pack(message: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def to_status_proto(error: LlmsuiteError) -> status_pb2.Status:
    """The error as a google.rpc.Status, capped to MAX_STATUS_BYTES: strings are
    truncated first, then trailing field violations and metadata entries are
    dropped until it fits (the code, reason and retry delay always survive)."""
    metadata = {key: truncate_utf8(value, MAX_DETAIL_VALUE_BYTES) for key, value in error.metadata.items()}
    violations = [FieldViolation(truncate_utf8(v.field, MAX_FIELD_PATH_BYTES),
                                 truncate_utf8(v.description, MAX_DETAIL_VALUE_BYTES)) for v in error.violations]
    retry_after = getattr(error, "retry_after_s", None)
    retry_info = None
    if isinstance(error, ResourceExhausted | Unavailable) and retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(1, int(retry_after * 1000)))
        retry_info = error_details_pb2.RetryInfo(retry_delay=delay)
    message = truncate_utf8(error.message, MAX_MESSAGE_BYTES)
    while True:
        details = [_pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata))]
        if violations:
            details.append(_pack(error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in violations
            ])))
        if retry_info is not None:
            details.append(_pack(retry_info))
        status = status_pb2.Status(code=error.code.value[0], message=message, details=details)
        if status.ByteSize() <= MAX_STATUS_BYTES or not (violations or metadata):
            return status
        if len(violations) > 1 or not metadata:
            violations.pop()
        else:
            metadata.popitem()


def internal_status() -> status_pb2.Status:
    rid = current_request_id() or "unknown"
    return status_pb2.Status(
        code=code_pb2.INTERNAL, message=f"internal error; see server logs for request id {rid}"
    )


def _out_of_memory() -> ResourceExhausted:
    # Allocation failed for this request: other requests (and this one, later)
    # may well fit, so it is capacity, not a bug.
    return ResourceExhausted("the server ran out of memory for this request; retry later or send less",
                             reason="OUT_OF_MEMORY", retry_after_s=5.0)


async def _abort_with(context: grpc.aio.ServicerContext, status_proto: status_pb2.Status) -> None:
    status = rpc_status.to_status(status_proto)
    # abort() replaces trailers already set, so the request id goes in again.
    trailers = tuple(status.trailing_metadata)
    request_id = current_request_id()
    # Services may name a request with an id from the message itself; only one that
    # is a valid metadata value (printable ASCII) can travel, or the status is lost.
    if request_id and request_id.isascii() and request_id.isprintable():
        trailers += ((REQUEST_ID_HEADER, request_id),)
    await context.abort(status.code, status.details, trailers)


async def abort(context: grpc.aio.ServicerContext, error: LlmsuiteError) -> None:
    await _abort_with(context, to_status_proto(error))


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, MemoryError):
        log.warning("out of memory", extra={"method": method})
        exc = _out_of_memory()
    if isinstance(exc, LlmsuiteError):
        log.info("rpc failed", extra={"method": method, "code": exc.code.name, "reason": exc.reason})
        await _abort_with(context, to_status_proto(exc))
    else:
        log.exception("unexpected error", extra={"method": method})
        await _abort_with(context, internal_status())


def _is_control_flow(exc: BaseException) -> bool:
    # context.abort() raises AbortError; asyncio cancellation is the RPC ending.
    return isinstance(exc, grpc.aio.AbortError | grpc.RpcError) or not isinstance(exc, Exception)


async def stream_items(behaviour: Callable[..., Any], request: Any,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    """Iterate a response-streaming behaviour of either aio style: an async
    generator, or a coroutine that writes with `context.write()` (e.g. the
    standard health servicer's Watch)."""
    result = behaviour(request, context)
    if hasattr(result, "__aiter__"):
        async for item in result:
            yield item
    else:
        await result


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    method: str,
    around: Callable[[Callable[..., Any], bool, bool], Callable[..., Any]],
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """Returns a handler of the same arity whose behaviour is `around(behaviour,
    request_streaming, response_streaming)`. Interceptors use it so that an
    aborting wrapper never changes a streaming method into a unary one.
    `request_deserializer` replaces the handler's own when given."""
    req, resp = handler.request_streaming, handler.response_streaming
    if not req and not resp:
        factory, behaviour = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    elif not req and resp:
        factory, behaviour = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    elif req and not resp:
        factory, behaviour = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    else:
        factory, behaviour = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    return factory(
        around(behaviour, req, resp),
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping any handler to statuses (see module doc)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        def around(behaviour: Callable[..., Any], _req: bool, resp: bool) -> Callable[..., Any]:
            if resp:
                async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    try:
                        async for item in stream_items(behaviour, request, context):
                            yield item
                    except BaseException as exc:
                        if _is_control_flow(exc):
                            raise
                        await _abort_for(exc, context, method)
                return streaming

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await behaviour(request, context)
                except BaseException as exc:
                    if _is_control_flow(exc):
                        raise
                    await _abort_for(exc, context, method)
            return unary

        return wrap_handler(handler, method, around)
