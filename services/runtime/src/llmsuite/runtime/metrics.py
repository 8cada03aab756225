"""Prometheus metrics: one registry per server, RPC metrics, the /metrics listener.

Every server gets its own `CollectorRegistry` (several servers share a process
in tests, and the global default registry would refuse their second set of
metrics). The bootstrap registers the RPC metrics and whatever collectors the
service exports (see `ExportsMetrics`) there, and serves it over HTTP.
Names follow Prometheus conventions: `llmsuite_` prefix, base units, `_total`
counters; docs/metrics.md lists them all.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector, start_http_server
from prometheus_client.registry import Collector

from llmsuite.runtime.status import stream_items, wrap_handler

log = logging.getLogger("llmsuite.metrics")

# From sub-millisecond tokenizer calls to generations that stream for minutes.
RPC_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                       30.0, 60.0, 120.0, 300.0, 600.0)


@runtime_checkable
class ExportsMetrics(Protocol):
    """A ServiceApp that has metrics of its own implements this."""

    def collectors(self) -> Sequence[Collector]:
        """Collectors (metric objects created with `registry=None`, or custom
        collectors read at scrape time) for the server's registry."""


def new_registry() -> CollectorRegistry:
    """A registry with the standard `process_*` metrics (CPU, memory, file
    descriptors, start time) and nothing else."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return registry


def _rpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    return "server_stream" if handler.response_streaming else "unary"


def _split_method(full: str) -> tuple[str, str]:
    service, _, method = full.lstrip("/").rpartition("/")
    return service, method


class RpcMetrics(grpc.aio.ServerInterceptor):
    """Counts every RPC when it starts and when it ends, by method and final
    status code, and times it from the first byte of the handler to its end
    (for streams: the whole stream).

    Sits outside error mapping and auth, so the code is the one the caller
    sees. Methods the server does not implement are not counted (their names
    come from callers and would make labels unbounded).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ("grpc_service", "grpc_method", "grpc_type")
        self.started = Counter("llmsuite_grpc_server_started", "RPCs started on the server.", labels,
                               registry=registry)
        self.handled = Counter("llmsuite_grpc_server_handled", "RPCs completed on the server, by status code.",
                               (*labels, "grpc_code"), registry=registry)
        self.seconds = Histogram("llmsuite_grpc_server_handling_seconds",
                                 "Time from the handler's start to the RPC's end (whole stream for streams).",
                                 (*labels, "grpc_code"), buckets=RPC_SECONDS_BUCKETS, registry=registry)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split_method(handler_call_details.method)
        labels = (service, method, _rpc_type(handler))

        def finished(context: grpc.aio.ServicerContext, started: float, error: BaseException | None) -> None:
            code = _final_code(context, error).name
            self.handled.labels(*labels, code).inc()
            self.seconds.labels(*labels, code).observe(time.perf_counter() - started)

        def around(behaviour: Callable[..., Any], _req: bool, resp: bool) -> Callable[..., Any]:
            if resp:
                async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    self.started.labels(*labels).inc()
                    started, error = time.perf_counter(), None
                    try:
                        async for item in stream_items(behaviour, request, context):
                            yield item
                    except BaseException as exc:
                        error = exc
                        raise
                    finally:
                        finished(context, started, error)
                return streaming

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                self.started.labels(*labels).inc()
                started, error = time.perf_counter(), None
                try:
                    return await behaviour(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finished(context, started, error)
            return unary

        return wrap_handler(handler, handler_call_details.method, around)


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the RPC ends with, as far as the server can know it."""
    code = context.code()  # set by context.abort() or set_code()
    if isinstance(code, grpc.StatusCode):
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, Exception):
        return grpc.StatusCode.UNKNOWN
    # CancelledError (or a closed stream): grpc ends the handler this way when
    # the client cancels or the deadline passes.
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


@dataclass
class MetricsListener:
    """The HTTP listener serving a registry at /metrics (and any other path)."""

    server: WSGIServer
    port: int

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def split_host_port(address: str) -> tuple[str, int]:
    """'HOST:PORT' or '[V6]:PORT' -> (host, port); raises ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def start_metrics_listener(address: str, registry: CollectorRegistry) -> MetricsListener:
    """Serves `registry` on `address` (port 0 picks a free port) from a daemon
    thread; raises RuntimeError with the reason when it cannot bind."""
    try:
        host, port = split_host_port(address)
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"cannot serve metrics on {address}: {exc}") from exc
    return MetricsListener(server, server.server_address[1])


def all_collectors(app: object) -> Sequence[Collector]:
    return app.collectors() if isinstance(app, ExportsMetrics) else ()
