"""A minimal ServiceApp with hand-made handlers, for testing the shared bootstrap itself."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2

SERVICE = "llmsuite.test.Probe"


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


class ProbeApp:
    """Serves `handlers` (method name -> grpc.RpcMethodHandler) under SERVICE."""

    service_names: Sequence[str] = (SERVICE,)

    def __init__(self, handlers: dict[str, grpc.RpcMethodHandler], *, admin_methods: Sequence[str] = ()) -> None:
        self._handlers = handlers
        self.admin_methods = tuple(admin_methods)

    def register(self, server: grpc.aio.Server) -> None:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, self._handlers),))

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    def health_names(self) -> Sequence[str]:
        return ()


def unary(behaviour) -> grpc.RpcMethodHandler:  # type: ignore[no-untyped-def]
    """A unary handler taking and returning HealthCheckRequest/Response messages (any real message would do)."""
    return grpc.unary_unary_rpc_method_handler(
        behaviour, request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString)


def bidi(behaviour) -> grpc.RpcMethodHandler:  # type: ignore[no-untyped-def]
    return grpc.stream_stream_rpc_method_handler(
        behaviour, request_deserializer=health_pb2.HealthCheckRequest.FromString,
        response_serializer=health_pb2.HealthCheckResponse.SerializeToString)
