"""OpenTelemetry tracing: one provider per process, configured in `main`.

Server spans come from opentelemetry-instrumentation-grpc's aio server
interceptor (it extracts W3C `traceparent` from metadata and handles
streaming behaviours); calls between services use its aio client
interceptors, which inject the current context. Both take the provider
explicitly so tests can give each server an in-memory exporter.
"""

from __future__ import annotations

import logging

from opentelemetry.instrumentation.grpc import aio_client_interceptors, aio_server_interceptor
from opentelemetry.instrumentation.grpc.filters import any_of, negate, service_prefix
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

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


def server_interceptor(provider: TracerProvider | None):  # type: ignore[no-untyped-def]
    if provider is None:
        return None
    return aio_server_interceptor(tracer_provider=provider, filter_=_UNTRACED)


def client_interceptors(provider: TracerProvider | None) -> list:  # type: ignore[type-arg]
    return list(aio_client_interceptors(tracer_provider=provider)) if provider is not None else []
