"""Request bytes that do not decode become INVALID_ARGUMENT.

grpcio deserializes requests itself: for a unary request a decode failure
becomes UNKNOWN with the exception text (naming the message type), and for a
streamed one the exception surfaces inside the handler. Wrapping every
method's deserializer so it returns a marker instead of raising lets the
marker be turned into a typed error where the handler would see it, so every
service and every RPC shape answers the same way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from llmsuite.runtime.errors import InvalidArgument
from llmsuite.runtime.status import stream_items, wrap_handler


class _Undecodable:
    """Stands in for a request message whose bytes did not decode."""


UNDECODABLE = _Undecodable()


def _malformed() -> InvalidArgument:
    return InvalidArgument(
        message="the request message could not be decoded as this method's request type",
        reason="MALFORMED_REQUEST",
    )


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        if deserializer is None:
            return data
        try:
            return deserializer(data)
        except (DecodeError, ValueError, UnicodeDecodeError, RecursionError):
            return UNDECODABLE
    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if request is UNDECODABLE:
            raise _malformed()
        yield request


class RequestDecodingInterceptor(grpc.aio.ServerInterceptor):
    """Turns undecodable request bytes into InvalidArgument (reason
    MALFORMED_REQUEST) without naming the message type. Install it inside the
    error-mapping and auth interceptors: authentication still comes first, and
    the error becomes a status like any other."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler

        def around(behaviour: Callable[..., Any], req: bool, resp: bool) -> Callable[..., Any]:
            if resp:
                async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    if req:
                        request = _checked(request)
                    elif request is UNDECODABLE:
                        raise _malformed()
                    async for item in stream_items(behaviour, request, context):
                        yield item
                return streaming

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if req:
                    request = _checked(request)
                elif request is UNDECODABLE:
                    raise _malformed()
                return await behaviour(request, context)
            return unary

        return wrap_handler(handler, handler_call_details.method, around,
                            request_deserializer=_tolerant(handler.request_deserializer))
