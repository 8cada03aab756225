"""A client's gRPC retry policy must fire for an UNAVAILABLE the server returns:
the bootstrap may not commit the call (send headers) before the handler has
produced its first message."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2
from runtime.probe_app import SERVICE, ProbeApp, bidi, method, unary
from support import ServerThread

from llmsuite.client.connection import service_config
from llmsuite.client.errors import from_rpc_error
from llmsuite.runtime.errors import Unavailable

SERVING = health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _retrying_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[
        ("grpc.enable_retries", 1), ("grpc.service_config", service_config([SERVICE], attempts=3))])


def test_server_returned_unavailable_is_retried_by_the_client_policy():
    attempts: list[str] = []

    async def flaky_unary(request, context):
        attempts.append("unary")
        if len(attempts) == 1:
            raise Unavailable("warming up", reason="LOADING")
        return SERVING

    async def flaky_stream(requests, context):
        attempts.append("stream")
        async for _ in requests:
            if attempts.count("stream") == 1:
                raise Unavailable("warming up", reason="LOADING")
            yield SERVING

    app = ProbeApp({"Unary": unary(flaky_unary), "Stream": bidi(flaky_stream)})
    with ServerThread(app) as srv, _retrying_channel(srv.address) as ch:
        response, call = ch.unary_unary(method("Unary"), response_deserializer=health_pb2.HealthCheckResponse.FromString
                                        ).with_call(b"", metadata=(("x-request-id", "retried-1"),))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        assert attempts == ["unary", "unary"]
        assert ("x-request-id", "retried-1") in call.initial_metadata()

        request = health_pb2.HealthCheckRequest().SerializeToString()
        replies = list(ch.stream_stream(method("Stream"))(iter([request])))
        assert len(replies) == 1 and attempts.count("stream") == 2


def test_a_call_that_keeps_failing_reports_its_request_id():
    async def down(request, context):
        raise Unavailable("down for good", reason="LOADING")

    with ServerThread(ProbeApp({"Down": unary(down)})) as srv, _retrying_channel(srv.address) as ch:
        try:
            ch.unary_unary(method("Down"))(b"", metadata=(("x-request-id", "rid-down"),))
        except grpc.RpcError as exc:
            error = from_rpc_error(exc)
        else:
            raise AssertionError("the call succeeded")
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.request_id == "rid-down"
