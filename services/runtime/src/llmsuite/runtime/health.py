"""gRPC health for the shared bootstrap: the standard servicer, with drain semantics.

`DrainingHealthServicer` is grpcio-health-checking's aio servicer with one
change: once the server drains, every open `Watch` receives NOT_SERVING and
then ends, so a watcher can never hold the exit back for the whole grace
period. `HealthReporter` is what a running app uses to say whether it can
serve (e.g. the tokenizer when its workers are wedged); the drain wins over
any later report.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeAlias

from grpc_health.v1 import health, health_pb2

# A HealthCheckResponse.ServingStatus value (grpc_health ships no types to name it by).
ServingStatus: TypeAlias = int
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class DrainingHealthServicer(health.aio.HealthServicer):
    """The standard aio health servicer whose Watch streams end after the drain's NOT_SERVING."""

    def __init__(self) -> None:
        super().__init__()
        # A mirror of the statuses, kept through the public `set`, so Watch
        # needs none of the base class's internals.
        self._statuses: dict[str, ServingStatus] = {"": SERVING}
        self._changed: asyncio.Condition | None = None
        self._draining = False

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:  # created on the server's loop, at first use
            self._changed = asyncio.Condition()
        return self._changed

    async def set(self, service: str, status: ServingStatus) -> None:
        if self._draining:
            return
        await super().set(service, status)
        self._statuses[service] = status
        async with self._condition():
            self._condition().notify_all()

    async def enter_graceful_shutdown(self) -> None:
        if self._draining:
            return
        for service in list(self._statuses):
            await self.set(service, NOT_SERVING)
        self._draining = True
        await super().enter_graceful_shutdown()
        async with self._condition():
            self._condition().notify_all()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        last: ServingStatus | None = None
        while True:
            status = self._statuses.get(request.service, SERVICE_UNKNOWN)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
                continue  # the drain may have begun while the write was in flight
            if self._draining:
                return
            async with self._condition():
                await self._condition().wait_for(functools.partial(self._changed_since, request.service, last))

    def _changed_since(self, service: str, seen: ServingStatus | None) -> bool:
        return self._draining or self._statuses.get(service, SERVICE_UNKNOWN) != seen


class HealthReporter:
    """Lets a started app flip its health names between SERVING and NOT_SERVING.

    `names()` gives the current names to report for (the server's, the app's
    services and its `health_names()`); reports are idempotent and ignored
    once the server drains.
    """

    def __init__(self, servicer: DrainingHealthServicer, names: Callable[[], Sequence[str]]) -> None:
        self._servicer = servicer
        self._names = names
        self.serving: bool | None = None

    async def report(self, serving: bool) -> None:
        if serving == self.serving:
            return
        self.serving = serving
        for name in self._names():
            await self._servicer.set(name, SERVING if serving else NOT_SERVING)

    async def report_each(self, statuses: Mapping[str, bool]) -> None:
        """Per-name statuses, for apps whose parts come and go separately (the
        gateway's `model:NAME`, one per model); names not given keep theirs."""
        for name, serving in statuses.items():
            await self._servicer.set(name, SERVING if serving else NOT_SERVING)


