"""Server reflection answers on v1 (what newer grpcurl and tools ask for) and v1alpha."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2 as messages
from support import ServerThread

from llmsuite.runtime.settings import ServerSettings
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import SERVICE_NAME, TokenizerApp

# v1 and v1alpha are the same messages under two package names: identical bytes on the wire.
VERSIONS = ["grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"]


def reflect(channel: grpc.Channel, service: str, *requests: messages.ServerReflectionRequest,
            metadata: tuple[tuple[str, str], ...] = ()) -> list[messages.ServerReflectionResponse]:
    info = channel.stream_stream(f"/{service}/ServerReflectionInfo",
                                 request_serializer=messages.ServerReflectionRequest.SerializeToString,
                                 response_deserializer=messages.ServerReflectionResponse.FromString)
    return list(info(iter(requests), metadata=metadata, timeout=30))


@pytest.mark.parametrize("service", VERSIONS)
def test_reflection_lists_and_describes_on_both_versions(tiny_tokenizer_dir, service):
    # With API keys configured: reflection, like health, needs none.
    settings = ServerSettings(listen="127.0.0.1:0", log_format="text", api_keys=("secret",))
    with ServerThread(TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits()), settings) as srv, \
            srv.channel() as ch:
        listed, described = reflect(ch, service, messages.ServerReflectionRequest(list_services=""),
                                    messages.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in described.file_descriptor_response.file_descriptor_proto]
    methods = {m.name for f in files for s in f.service if f"{f.package}.{s.name}" == SERVICE_NAME for m in s.method}
    assert {"Encode", "Decode", "DecodeStream"} <= methods


def test_an_unknown_symbol_is_answered_with_not_found_on_v1(tiny_tokenizer_dir):
    with ServerThread(TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits())) as srv, srv.channel() as ch:
        (answer,) = reflect(ch, VERSIONS[0], messages.ServerReflectionRequest(file_containing_symbol="no.Such"))
    assert answer.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]
