"""Server reflection, v1 and v1alpha, from one servicer.

grpcio-reflection implements only `grpc.reflection.v1alpha` (grpc/grpc#38576),
while newer grpcurl and other tools ask for `grpc.reflection.v1` first. The
two protocols are the same messages under another package name, identical on
the wire, so the library's servicer answers both: its own v1alpha
registration, plus the v1 method name served with the same message classes.
(Only v1alpha is listed among the services: the v1 descriptors are not in the
process's descriptor pool, so a `describe` of it could not be answered.)
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2 as messages

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME


def enable_reflection(server: grpc.aio.Server, service_names: Sequence[str]) -> None:
    """Serves reflection for `service_names` (and v1alpha itself) on both protocol versions."""
    servicer = reflection.aio.ReflectionServicer((*service_names, V1ALPHA_SERVICE_NAME))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=messages.ServerReflectionRequest.FromString,
            response_serializer=messages.ServerReflectionResponse.SerializeToString),
    }),))
