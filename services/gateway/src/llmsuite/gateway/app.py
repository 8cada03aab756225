"""GatewayApp: the gateway as the server bootstrap runs it (runtime.server.ServiceApp).

It connects the upstreams, keeps the catalogue refreshed, reports health from it,
and builds the servicer once the upstreams exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence

import grpc
from prometheus_client.registry import Collector

from llmsuite.gateway.admission import Admission, GatewayLimits
from llmsuite.gateway.catalogue import Catalogue, HealthStatuses
from llmsuite.gateway.circuit_breaker import CircuitBreaker
from llmsuite.gateway.metrics import GatewayMetrics
from llmsuite.gateway.rate_limit import RateLimiter
from llmsuite.gateway.service import SERVICE_NAME, GatewayServicer
from llmsuite.gateway.upstreams import Upstreams
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.runtime.errors import Unavailable
from llmsuite.runtime.health import HealthReporter
from llmsuite.runtime.server import deferred_servicer

log = logging.getLogger("llmsuite.gateway")


class GatewayApp:
    """The gateway as the bootstrap sees it (see runtime.server.ServiceApp).

    `start` returns once some model can be served (health turns SERVING
    then); until then the port answers, health says NOT_SERVING and calls get
    UNAVAILABLE. After that the catalogue keeps health current: NOT_SERVING
    while no model can be served, `model:NAME` per model.
    """

    service_names: Sequence[str] = (SERVICE_NAME,)

    def __init__(self, upstreams_factory: Callable[..., Upstreams], limits: GatewayLimits,
                 rate_limiter: RateLimiter, *, startup_timeout_s: float = 0.0,
                 refresh_interval_s: float = 2.0) -> None:
        self._factory = upstreams_factory
        self._rate = rate_limiter
        self._startup_timeout_s = startup_timeout_s
        self._refresh_interval_s = refresh_interval_s
        self.upstreams: Upstreams | None = None
        self.catalogue: Catalogue | None = None
        self._servicer: GatewayServicer | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._health: HealthReporter | None = None
        self._started = False
        self._statuses: dict[str, bool] = {}
        self._reported: dict[str, bool] = {}
        self.metrics = GatewayMetrics(self._circuits)
        self._admission = Admission(limits, rate_limiter, self.metrics)
        rate_limiter.report_to(self.metrics)

    def _circuits(self) -> Iterator[tuple[str, str, CircuitBreaker]]:
        if self.upstreams is not None:
            yield from self.upstreams.circuits()

    def collectors(self) -> Sequence[Collector]:
        return self.metrics.collectors()

    def register(self, server: grpc.aio.Server) -> None:
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server(deferred_servicer(
            gateway_pb2_grpc.GatewayServiceServicer, pb.DESCRIPTOR.services_by_name["GatewayService"],
            self._ready), server)

    def _ready(self) -> GatewayServicer:
        if self._servicer is None:
            raise Unavailable("the gateway is still connecting to its upstreams", reason="LOADING", retry_after_s=1.0)
        return self._servicer

    async def start(self) -> None:
        self.upstreams = self._factory(metrics=self.metrics)
        self.catalogue = Catalogue(self.upstreams, refresh_interval_s=self._refresh_interval_s,
                                   service_names=self.service_names, on_health=self._health_changed)
        self._servicer = GatewayServicer(self.upstreams, self.catalogue, self._admission)
        self._refresher = asyncio.create_task(self.catalogue.run())
        log.info("waiting for a servable model", extra={"startup_timeout_s": self._startup_timeout_s})
        try:
            await asyncio.wait_for(self.catalogue.ready.wait(), self._startup_timeout_s or None)
        except TimeoutError:
            raise RuntimeError(f"no model became servable within --startup-timeout {self._startup_timeout_s:g}s "
                               "(are the tokenizer and inference services up, and do their tokenizers match?)"
                               ) from None
        log.info("upstreams ready", extra={"models": ",".join(m.name for m in self.catalogue.served)})
        self._started = True  # the bootstrap reports SERVING next; from then on the catalogue reports

    def health_names(self) -> Sequence[str]:
        return [name for name, serving in self._statuses.items() if name.startswith("model:") and serving]

    def attach_health(self, reporter: HealthReporter) -> None:
        self._health = reporter

    async def _health_changed(self, statuses: HealthStatuses) -> None:
        # A name that disappeared (its model is listed nowhere now) stays known, as NOT_SERVING.
        self._statuses = {**dict.fromkeys(self._statuses, False), **statuses}
        await self._report()

    async def _report(self) -> None:
        if self._health is None or not self._started:
            return
        changed = {name: serving for name, serving in self._statuses.items() if self._reported.get(name) != serving}
        self._reported.update(changed)
        await self._health.report_each(changed)

    async def stop(self) -> None:
        if self._refresher is not None:
            # Cancel until it has ended: on Python 3.11 asyncio.wait_for returns the inner
            # result instead of raising when a cancellation and that result arrive together (an
            # upstream's channel changing state as shutdown begins wakes the loop), so one
            # cancel can be lost and the refresh loop would run on for ever.
            while not self._refresher.done():
                self._refresher.cancel()
                await asyncio.wait({self._refresher}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError, Exception):
                self._refresher.result()
        if self.upstreams is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.upstreams.close(), 5)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._rate.close(), 5)  # pending refunds to a shared store, its connections
