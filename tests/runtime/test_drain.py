"""Drain as a health checker sees it: NOT_SERVING while the port is still open,
and open Watch streams end instead of holding the exit for the grace period."""

from __future__ import annotations

import threading

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from runtime.probe_app import ProbeApp, method, unary
from support import ServerThread

from llmsuite.runtime.settings import ServerSettings

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _ok(request, context):
    return health_pb2.HealthCheckResponse(status=SERVING)


def _check(ch: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_check_polls_see_not_serving_before_the_port_closes():
    settings = ServerSettings(listen="127.0.0.1:0", grace_period_s=1.0, drain_delay_s=600.0, log_format="text")
    with ServerThread(ProbeApp({"Ok": unary(_ok)}), settings) as srv, srv.channel() as ch:
        running = srv.running
        assert running is not None and _check(ch) == SERVING
        stopper = threading.Thread(target=srv.call, args=(running.stop(),), kwargs={"timeout": 120})
        stopper.start()
        try:
            while _check(ch) != NOT_SERVING:  # the poller sees it...
                pass
            # ...while the port is still open and requests are still served.
            assert ch.unary_unary(method("Ok"))(b"", timeout=10)
        finally:
            srv.loop.call_soon_threadsafe(running.stop_now)  # a second signal ends the delay
            stopper.join(60)
        assert not stopper.is_alive()
        srv.running = None


def test_open_watch_gets_not_serving_then_ends_without_holding_the_exit():
    settings = ServerSettings(listen="127.0.0.1:0", grace_period_s=3600.0, log_format="text")
    with ServerThread(ProbeApp({"Ok": unary(_ok)}), settings) as srv, srv.channel() as ch:
        running = srv.running
        assert running is not None
        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == SERVING
        stopper = threading.Thread(target=srv.call, args=(running.stop(),), kwargs={"timeout": 3600})
        stopper.start()
        assert next(watch).status == NOT_SERVING
        assert list(watch) == []  # the stream ended (OK), so it no longer holds the drain
        # With the watch holding it, stop() would wait for the hour-long grace period.
        stopper.join(60)
        assert not stopper.is_alive()
        srv.running = None
