"""OpenTelemetry tracing: one provider per process, configured in `main`.

Server spans come from opentelemetry-instrumentation-grpc's aio server
interceptor (it extracts W3C `traceparent` from metadata and handles
streaming behaviours). Calls between services get a client span from the
interceptors here, which inject the span's context into the call's metadata
and end the span when the call ends, however it ends. (The library's aio
client interceptors end a streaming call's span only when its responses are
iterated to the end; a stream read with `read()` and then cancelled, as the
gateway does with every Generate stream, never ended its span, so the span was
never exported and every inference span lost its parent.) Both sides take the
provider explicitly so tests can give each server an in-memory exporter.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import any_of, negate, service_prefix
from opentelemetry.propagate import inject
from opentelemetry.propagators.textmap import Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode

from llmsuite.runtime.calls import call_interceptors, method_name, on_call_done
from llmsuite.runtime.settings import TelemetrySettings

log = logging.getLogger("llmsuite.tracing")


def build_tracer_provider(settings: TelemetrySettings, *, extra: SpanProcessor | None = None) -> TracerProvider | None:
    """None when tracing is off and no extra processor is given (no spans, no cost)."""
    if settings.exporter == "none" and extra is None:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    if settings.exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif settings.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
        log.info("exporting spans over OTLP", extra={"endpoint": settings.otlp_endpoint})
    if extra is not None:
        provider.add_span_processor(extra)
    return provider


# Health probes and reflection would flood traces (and the instrumentation
# assumes async-generator handlers, which the health Watch is not).
_UNTRACED = negate(any_of(service_prefix("grpc.health."), service_prefix("grpc.reflection.")))


def server_interceptor(provider: TracerProvider | None) -> grpc.aio.ServerInterceptor | None:
    if provider is None:
        return None
    return aio_server_interceptor(tracer_provider=provider, filter_=_UNTRACED)


class _MetadataSetter(Setter[MutableMapping[str, str]]):
    def set(self, carrier: MutableMapping[str, str], key: str, value: str) -> None:
        carrier[key.lower()] = value  # gRPC metadata keys are lower case


_METADATA_SETTER = _MetadataSetter()


class _ClientSpans:
    """A CLIENT span per outgoing call (named, like the server's, by the full
    method), its context injected as `traceparent`, ended with the call's
    status code when the call ends (see `on_call_done`)."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self._tracer = tracer

    async def __call__(self, continuation: Callable[..., Awaitable[Any]], details: grpc.aio.ClientCallDetails,
                       request: Any) -> Any:
        method = method_name(details)
        service, _, name = method.lstrip("/").rpartition("/")
        span = self._tracer.start_span(method, kind=SpanKind.CLIENT,
                                       attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        inject(metadata, context=trace.set_span_in_context(span), setter=_METADATA_SETTER)
        traced = grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                            details.wait_for_ready)
        try:
            call = await continuation(traced, request)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()
            raise
        on_call_done(call, lambda code: _end(span, code))
        return call


def _end(span: trace.Span, code: grpc.StatusCode) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


def client_interceptors(provider: TracerProvider | None) -> list[grpc.aio.ClientInterceptor]:
    if provider is None:
        return []
    return call_interceptors(_ClientSpans(provider.get_tracer("llmsuite.runtime.tracing")))
