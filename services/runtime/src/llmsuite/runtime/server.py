"""The one server bootstrap every service uses.

`start_server` builds a grpc.aio server with health, reflection, compression,
keepalive, message limits, interceptors (tracing, metrics, request id, errors,
auth, request decoding) and optional TLS/mTLS; registers the app's servicers;
binds; starts the Prometheus /metrics listener; runs the app's start-up (model
loading, warm-up) and only then reports SERVING. `serve` adds signal handling
and graceful drain for the command-line entry points.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from llmsuite.runtime.auth import ApiKeyAuthInterceptor, parse_keys
from llmsuite.runtime.decoding import RequestDecodingInterceptor
from llmsuite.runtime.health import DrainingHealthServicer, HealthReporter
from llmsuite.runtime.logs import REQUEST_ID_HEADER, new_request_id, set_request_id
from llmsuite.runtime.metrics import MetricsListener, RpcMetrics, all_collectors, new_registry, start_metrics_listener
from llmsuite.runtime.reflection import enable_reflection
from llmsuite.runtime.settings import ServerSettings
from llmsuite.runtime.status import ErrorMappingInterceptor, stream_items, wrap_handler
from llmsuite.runtime.tracing import server_interceptor

log = logging.getLogger("llmsuite.server")

__all__ = ["EXIT_CANNOT_SERVE", "REQUEST_ID_HEADER", "RunningServer", "ServiceApp", "deferred_servicer", "serve",
           "start_server"]

# The exit status of a process whose app reported it can no longer serve (EX_SOFTWARE in
# sysexits.h): distinct from 1 (failed to start) and from a signal, so logs and restart
# counters say which it was.
EXIT_CANNOT_SERVE = 70


class ServiceApp(Protocol):
    """What a service hands the bootstrap: its servicers and its lifecycle."""

    #: Full gRPC service names (e.g. "llmsuite.tokenizer.v1.TokenizerService"),
    #: reported by health and reflection.
    service_names: Sequence[str]

    def register(self, server: grpc.aio.Server) -> None:
        """Add servicers to the server (called before it starts)."""

    async def start(self) -> None:
        """Load and warm up; health turns SERVING when this returns."""

    async def stop(self) -> None:
        """Release resources after the server has drained."""

    def health_names(self) -> Sequence[str]:
        """Extra health service names to report SERVING once started (e.g.
        `model:NAME`); they flip to NOT_SERVING with the rest on drain."""

    # Optional: `admin_methods: Sequence[str]`, full method names (e.g.
    # "/llmsuite.tokenizer.v1.TokenizerService/Reload") that only API keys
    # with the `admin` scope may call; and `attach_health(reporter:
    # HealthReporter)`, called before `start()`, for apps whose health can
    # change while they run; and `async wait_failed() -> str`, which returns (with
    # the cause) once the app can no longer serve at all: `serve` then drains and
    # exits with EXIT_CANNOT_SERVE so that an orchestrator restarts the process.


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Takes `x-request-id` from metadata (or makes one), puts it in the log
    context and echoes it: in the initial metadata sent together with the
    first response message, and in the trailers.

    Sending headers before the handler runs would commit the call: a client's
    gRPC retry policy never retries a committed call, so an UNAVAILABLE the
    server returns would not be retried. A call that fails before its first
    message therefore carries the id only in its trailers."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith("/grpc."):
            return handler
        incoming = next(
            (v for k, v in handler_call_details.invocation_metadata or () if k == REQUEST_ID_HEADER), None
        )
        request_id = (incoming if isinstance(incoming, str) else None) or new_request_id()
        request_id = request_id[:128]

        echo = ((REQUEST_ID_HEADER, request_id),)

        def around(behaviour: Callable[..., Any], _req: bool, resp: bool) -> Callable[..., Any]:
            if resp:
                async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
                    set_request_id(request_id)
                    context.set_trailing_metadata(echo)
                    headers_sent = False
                    async for item in stream_items(behaviour, request, context):
                        if not headers_sent:
                            await context.send_initial_metadata(echo)
                            headers_sent = True
                        yield item
                return streaming

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                set_request_id(request_id)
                context.set_trailing_metadata(echo)
                response = await behaviour(request, context)
                await context.send_initial_metadata(echo)
                return response
            return unary

        return wrap_handler(handler, handler_call_details.method, around)


def deferred_servicer(base: type, service: Any, resolve: Callable[[], Any]) -> Any:
    """A servicer (subclass of the generated `base`) registered before the app
    has started: every method of `service` (a ServiceDescriptor) forwards to
    `resolve()`, which raises Unavailable until the real servicer exists. Lets
    the port bind, and health answer NOT_SERVING, while models load."""
    methods: dict[str, Any] = {}
    for method in service.methods:
        if method.server_streaming:
            async def streaming(self: Any, request: Any, context: Any, _name: str = method.name) -> Any:
                async for item in getattr(resolve(), _name)(request, context):
                    yield item
            methods[method.name] = streaming
        else:
            async def unary(self: Any, request: Any, context: Any, _name: str = method.name) -> Any:
                return await getattr(resolve(), _name)(request, context)
            methods[method.name] = unary
    return type(f"Deferred{base.__name__}", (base,), methods)()


@dataclass
class RunningServer:
    """A started server. `port` is the bound port (useful with port 0);
    `metrics_port` the /metrics port (None when metrics are off); `registry`
    holds this server's metrics whether or not they are served."""

    server: grpc.aio.Server
    port: int
    health: DrainingHealthServicer
    app: ServiceApp
    settings: ServerSettings
    registry: CollectorRegistry
    metrics: MetricsListener | None = None
    _stopped: bool = field(default=False, repr=False)
    _stop_now: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def metrics_port(self) -> int | None:
        return self.metrics.port if self.metrics is not None else None

    async def stop(self, grace_s: float | None = None, *, drain_delay_s: float | None = None) -> None:
        """Drain: health NOT_SERVING (open Watch streams get it and end); keep
        serving for the drain delay so that health pollers and load balancers
        see NOT_SERVING while the port is still open; then refuse new RPCs,
        let in-flight ones finish for the grace period, and stop the app.
        `stop_now()` cuts the drain delay short."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.settings.grace_period_s if grace_s is None else grace_s
        delay = self.settings.drain_delay_s if drain_delay_s is None else drain_delay_s
        await self.health.enter_graceful_shutdown()
        if delay > 0:
            log.info("not serving; port stays open for the drain delay", extra={"drain_delay_s": delay})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_now.wait(), delay)
        log.info("draining", extra={"grace_s": grace})
        await self.server.stop(grace)
        await self.app.stop()
        if self.metrics is not None:  # last, so the drain itself can still be scraped
            await asyncio.to_thread(self.metrics.stop)
        log.info("stopped")

    def stop_now(self) -> None:
        """Ends the drain delay early (a second SIGTERM/SIGINT)."""
        self._stop_now.set()


def _server_options(settings: ServerSettings) -> list[tuple[str, Any]]:
    ka = settings.keepalive
    options: list[tuple[str, Any]] = [
        ("grpc.keepalive_time_ms", int(ka.time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(ka.timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(ka.permit_without_calls)),
        ("grpc.http2.min_ping_interval_without_data_ms", int(ka.min_ping_interval_s * 1000)),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_receive_message_bytes or settings.max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ]
    if ka.max_connection_idle_s > 0:
        options.append(("grpc.max_connection_idle_ms", int(ka.max_connection_idle_s * 1000)))
    if ka.max_connection_age_s > 0:
        options.append(("grpc.max_connection_age_ms", int(ka.max_connection_age_s * 1000)))
        options.append(("grpc.max_connection_age_grace_ms", int(ka.max_connection_age_grace_s * 1000)))
    return options


def _credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    tls = settings.tls
    if not tls.enabled:
        return None
    assert tls.cert_file is not None and tls.key_file is not None
    pairs = [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())]
    if tls.client_ca_file is not None:
        return grpc.ssl_server_credentials(
            pairs, root_certificates=tls.client_ca_file.read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials(pairs)


async def start_server(
    settings: ServerSettings,
    app: ServiceApp,
    *,
    tracer_provider: Any = None,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    on_bound: Callable[[int], None] | None = None,
) -> RunningServer:
    """Build, bind and start a server for `app`; returns once it is SERVING.

    Interceptor order, outermost first: tracing (every RPC gets a span, even
    rejected ones), metrics (counted with the status the caller sees), request
    id, error mapping, auth, request decoding (so undecodable bytes are
    INVALID_ARGUMENT, after authentication), then `extra_interceptors`.
    `on_bound(port)` runs once the port is listening, before the app loads
    (health answers NOT_SERVING from then until loading is done); /metrics
    listens from then on too, when `settings.metrics_listen` is set.
    """
    registry = new_registry()
    for collector in all_collectors(app):
        registry.register(collector)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    tracing = server_interceptor(tracer_provider)
    if tracing is not None:
        interceptors.append(tracing)
    interceptors += [RpcMetrics(registry), RequestIdInterceptor(), ErrorMappingInterceptor()]
    if settings.api_keys:
        interceptors.append(ApiKeyAuthInterceptor(parse_keys(settings.api_keys), settings.auth_exempt_methods,
                                                  admin_methods=getattr(app, "admin_methods", ())))
        log.info("API-key auth enabled", extra={"keys": len(settings.api_keys)})
    else:
        log.warning("no API keys configured: authentication is OFF")
    interceptors.append(RequestDecodingInterceptor())
    interceptors += list(extra_interceptors)

    server = grpc.aio.server(
        interceptors=interceptors,
        options=_server_options(settings),
        compression=grpc.Compression.Gzip if settings.compression == "gzip" else grpc.Compression.NoCompression,
        maximum_concurrent_rpcs=None,
    )
    health_servicer = DrainingHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *app.service_names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    app.register(server)
    enable_reflection(server, (*app.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))

    credentials = _credentials(settings)
    try:
        port = (server.add_secure_port(settings.listen, credentials) if credentials
                else server.add_insecure_port(settings.listen))
    except RuntimeError as exc:
        raise SystemExit(f"cannot bind {settings.listen}: {exc}") from exc
    if port == 0:
        raise SystemExit(f"cannot bind {settings.listen} (in use or not a valid address)")
    await server.start()
    try:
        metrics = start_metrics_listener(settings.metrics_listen, registry) if settings.metrics_listen else None
    except BaseException:
        await server.stop(0)
        raise
    if on_bound is not None:
        on_bound(port)
    log.info("listening; loading", extra={"listen": settings.listen, "port": port, "tls": settings.tls.enabled})
    if metrics is not None:
        log.info("serving metrics", extra={"metrics_listen": settings.metrics_listen, "metrics_port": metrics.port})
    reporter = HealthReporter(health_servicer, lambda: ("", *app.service_names, *app.health_names()))
    attach_health = getattr(app, "attach_health", None)
    if attach_health is not None:
        attach_health(reporter)
    try:
        await app.start()
    except BaseException:
        await server.stop(0)
        if metrics is not None:
            metrics.stop()
        raise
    await reporter.report(True)
    log.info("serving", extra={"services": ",".join(app.service_names), "port": port})
    return RunningServer(server, port, health_servicer, app, settings, registry, metrics)


async def serve(settings: ServerSettings, app: ServiceApp, *, tracer_provider: Any = None) -> None:
    """Run until SIGTERM/SIGINT, then drain gracefully (see RunningServer.stop)."""
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_requested.set)
    # Start-up may wait a long time (models loading, a gateway's upstreams
    # absent): a stop request must end it rather than wait for it.
    starting = asyncio.ensure_future(start_server(settings, app, tracer_provider=tracer_provider))
    stopping = asyncio.ensure_future(stop_requested.wait())
    await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("shutdown requested while starting")
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await app.stop()
        return
    stopping.cancel()
    try:
        running = starting.result()
    except Exception as exc:  # a clear one-line reason beats a traceback for bad config or files
        log.error("failed to start", extra={"error": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from exc
    cause = await _stop_or_failure(app, stop_requested)
    if cause is None:
        log.info("shutdown requested")
    else:
        log.error("cannot serve any more; draining, then exiting to be restarted",
                  extra={"error": cause, "exit_status": EXIT_CANNOT_SERVE})
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal skips the drain delay
        loop.add_signal_handler(sig, running.stop_now)
    await running.stop()
    if tracer_provider is not None:
        with contextlib.suppress(Exception):
            tracer_provider.shutdown()
    if cause is not None:
        raise SystemExit(EXIT_CANNOT_SERVE)


async def _stop_or_failure(app: ServiceApp, stop_requested: asyncio.Event) -> str | None:
    """Waits for a stop request (None) or for the app to report it cannot serve (the cause)."""
    wait_failed: Callable[[], Awaitable[str]] | None = getattr(app, "wait_failed", None)
    stopping = asyncio.ensure_future(stop_requested.wait())
    if wait_failed is None:
        await stopping
        return None
    failing = asyncio.ensure_future(wait_failed())
    await asyncio.wait((stopping, failing), return_when=asyncio.FIRST_COMPLETED)
    for task in (stopping, failing):
        task.cancel()
    if stopping.done() and not stopping.cancelled():
        return None
    return failing.result()
