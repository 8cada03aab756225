"""Client-side helpers for grpc.aio calls that interceptors share."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

# Tasks that report a finished call's status; held here because the event loop
# keeps only weak references to tasks.
_reporting: set[asyncio.Task[None]] = set()


def on_call_done(call: Any, callback: Callable[[grpc.StatusCode], None]) -> None:
    """Runs `callback(status code)` once `call` has ended, however it ended:
    read to the end, failed, cancelled, or abandoned and cancelled with its channel.

    For an interceptor that must see every call's outcome without depending on
    how the caller consumes the call (iterating, `read()` until EOF, or
    cancelling it part-way). The callback runs on the event loop just after the
    call's own done callbacks; it must not raise.
    """
    loop = asyncio.get_running_loop()

    def done(finished: Any) -> None:
        async def report() -> None:
            callback(await finished.code())  # immediate: the call has its status

        task = loop.create_task(report())
        _reporting.add(task)
        task.add_done_callback(_reporting.discard)

    try:
        call.add_done_callback(done)
    except NotImplementedError:  # already finished: an inner interceptor answered without calling out
        done(call)


def method_name(details: grpc.aio.ClientCallDetails) -> str:
    """'/pkg.Service/Method' (grpc.aio passes it as bytes to interceptors: grpc/grpc#31092)."""
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


# intercept(continuation, client_call_details, request or request iterator) -> call
Intercept = Callable[[Callable[..., Awaitable[Any]], grpc.aio.ClientCallDetails, Any], Awaitable[Any]]


def call_interceptors(intercept: Intercept) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors that run `intercept` for every kind of call (grpc.aio
    files each interceptor object under exactly one kind, so it takes four)."""
    return [_UnaryUnary(intercept), _UnaryStream(intercept), _StreamUnary(intercept), _StreamStream(intercept)]


class _Adapter:
    def __init__(self, intercept: Intercept) -> None:
        self._intercept = intercept


class _UnaryUnary(_Adapter, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await self._intercept(continuation, client_call_details, request)


class _UnaryStream(_Adapter, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await self._intercept(continuation, client_call_details, request)


class _StreamUnary(_Adapter, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details,  # type: ignore[no-untyped-def]
                                     request_iterator):
        return await self._intercept(continuation, client_call_details, request_iterator)


class _StreamStream(_Adapter, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details,  # type: ignore[no-untyped-def]
                                      request_iterator):
        return await self._intercept(continuation, client_call_details, request_iterator)
