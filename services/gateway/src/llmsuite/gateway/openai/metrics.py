"""Prometheus metrics of the HTTP API, served at GET /metrics on its own port (listed in
docs/metrics.md).

Requests are counted by a pure ASGI middleware around the whole app, so 404s, 413s and
the parser-level errors Starlette sees are counted too, and a stream's time to first byte
is when its first event left, not when its handler returned. `route` is the route's path
template (`/v1/models/{model}`), never the raw path: labels stay bounded whatever a caller
sends.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Latency buckets from 5 ms to 2 minutes: a refusal takes milliseconds, a long generation minutes.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OTHER_ROUTE = "other"


class ApiMetrics:
    """The HTTP API's metric objects, in a registry of their own."""

    def __init__(self, routes: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._routes = tuple(routes)
        self.requests = Counter(
            "llmsuite_openai_requests", "HTTP requests by route and the status they were answered with (499: the "
            "caller went away before the answer).", ("route", "status"), registry=self.registry)
        self.time_to_first_byte = Histogram(
            "llmsuite_openai_time_to_first_byte_seconds", "From a request's arrival to the first byte of its "
            "response body (a stream's first event).", ("route",), buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.duration = Histogram(
            "llmsuite_openai_request_duration_seconds", "From a request's arrival to the end of its response "
            "(a stream's last event).", ("route",), buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.sse_disconnects = Counter(
            "llmsuite_openai_sse_disconnects", "Streams whose caller went away (or that shutdown cut) before "
            "their last event; each cancels its generation.", ("route",), registry=self.registry)
        self.ignored_fields = Counter(
            "llmsuite_openai_ignored_fields", "Request fields accepted and ignored because they do not change "
            "what is generated (see docs/openai.md, Unknown fields).", ("field",), registry=self.registry)
        ProcessCollector(registry=self.registry)

    def route_of(self, path: str) -> str:
        """The route template serving `path` (a trailing slash is the same route), else `other`."""
        path = path.rstrip("/") or "/"
        for route in self._routes:
            if route == path:
                return route
            prefix, brace, _ = route.partition("{")
            if brace and path.startswith(prefix) and len(path) > len(prefix):
                return route
        return OTHER_ROUTE

    def fields_ignored(self, fields: Sequence[str]) -> None:
        for field in fields:
            self.ignored_fields.labels(field).inc()

    def stream_disconnected(self, path: str) -> None:
        self.sse_disconnects.labels(self.route_of(path)).inc()

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), headers={"content-type": CONTENT_TYPE_LATEST})


class RequestMetrics:
    """ASGI middleware: counts every HTTP request by route and status, with its time to
    first byte and duration."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        route = self.metrics.route_of(scope.get("path", ""))
        status = 500  # what a handler that fails before answering becomes
        first_byte = False

        async def observed_send(message: Message) -> None:
            nonlocal status, first_byte
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not first_byte and message.get("body"):
                first_byte = True
                self.metrics.time_to_first_byte.labels(route).observe(time.monotonic() - started)
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.duration.labels(route).observe(time.monotonic() - started)
