"""The one place where errors become gRPC statuses.

`ErrorMappingInterceptor` wraps every handler: an `LlmsuiteError` becomes its
status code with rich details (google.rpc.Status: ErrorInfo, BadRequest field
violations, RetryInfo); anything else is logged with its traceback and
becomes INTERNAL with a message that names only the request id.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from llmsuite.runtime.errors import LlmsuiteError, ResourceExhausted, Unavailable
from llmsuite.runtime.logs import current_request_id

log = logging.getLogger("llmsuite.errors")

ERROR_DOMAIN = "llmsuite.dev"


def to_status_proto(error: LlmsuiteError) -> status_pb2.Status:
    details: list[Any] = [
        error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    ]
    if error.violations:
        details.append(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
            for v in error.violations
        ]))
    retry_after = getattr(error, "retry_after_s", None)
    if isinstance(error, ResourceExhausted | Unavailable) and retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromMilliseconds(max(1, int(retry_after * 1000)))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for d in details:
        a = any_pb2.Any()
        a.Pack(d)
        packed.append(a)
    return status_pb2.Status(code=error.code.value[0], message=error.message, details=packed)


def internal_status() -> status_pb2.Status:
    rid = current_request_id() or "unknown"
    return status_pb2.Status(
        code=code_pb2.INTERNAL, message=f"internal error; see server logs for request id {rid}"
    )


async def abort(context: grpc.aio.ServicerContext, error: LlmsuiteError) -> None:
    status = rpc_status.to_status(to_status_proto(error))
    await context.abort(status.code, status.details, status.trailing_metadata)


async def _abort_for(exc: BaseException, context: grpc.aio.ServicerContext, method: str) -> None:
    if isinstance(exc, LlmsuiteError):
        log.info("rpc failed", extra={"method": method, "code": exc.code.name, "reason": exc.reason})
        status = rpc_status.to_status(to_status_proto(exc))
    else:
        log.exception("unexpected error", extra={"method": method})
        status = rpc_status.to_status(internal_status())
    await context.abort(status.code, status.details, status.trailing_metadata)


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
) -> grpc.RpcMethodHandler:
    """Returns a handler of the same arity whose behaviour is `around(behaviour,
    request_streaming, response_streaming)`. Interceptors use it so that an
    aborting wrapper never changes a streaming method into a unary one."""
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
        request_deserializer=handler.request_deserializer,
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
