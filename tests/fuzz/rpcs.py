"""Every RPC of the three services, and how to call it with any request."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from llmsuite.gateway.v1 import gateway_pb2
from llmsuite.inference.v1 import inference_pb2
from llmsuite.tokenizer.v1 import tokenizer_pb2

from .strategies import messages, raw_requests

SERVICES = {
    "tokenizer": tokenizer_pb2.DESCRIPTOR.services_by_name["TokenizerService"],
    "inference": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
    "gateway": gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
}
# Codes that mean the server failed, not the request.
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
                 grpc.StatusCode.UNIMPLEMENTED}
# What a status must never carry back to a caller.
LEAKS = ("Traceback", "ipv4:", "127.0.0.1", "<class ", "_pb2", "AioRpcError")


@dataclass(frozen=True)
class Rpc:
    service: str
    method: MethodDescriptor

    @property
    def name(self) -> str:
        return f"{self.service}.{self.method.name}"

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def streams_requests(self) -> bool:
        return self.method.client_streaming

    def requests(self) -> st.SearchStrategy[list[Message]]:
        """One request, or for a request stream any order of its message kinds, often
        starting the way the protocol asks."""
        descriptor = self.method.input_type
        if not self.streams_requests:
            return messages(descriptor).map(lambda message: [message])
        any_order = st.lists(messages(descriptor), max_size=5)
        first = descriptor.oneofs[0].fields[0].name if descriptor.oneofs else None
        if first is None:
            return any_order
        started = st.tuples(messages(descriptor, only=first), st.lists(messages(descriptor), max_size=4)).map(
            lambda pair: [pair[0], *pair[1]])
        return st.one_of(started, started, any_order)

    def raw(self) -> st.SearchStrategy[list[bytes]]:
        single = raw_requests(messages(self.method.input_type))
        if not self.streams_requests:
            return single.map(lambda data: [data])
        valid = messages(self.method.input_type).map(lambda m: m.SerializeToString())
        return st.lists(st.one_of(single, valid), min_size=1, max_size=4)

    def call(self, channel: grpc.Channel, requests: Sequence[Any], *, raw: bool = False,
             timeout: float = 20.0) -> grpc.StatusCode:
        """Sends the requests, reads every response, returns the final status code."""
        serialize = None if raw else (lambda message: message.SerializeToString())
        kwargs: dict[str, Any] = {"request_serializer": serialize}
        try:
            if self.method.client_streaming and self.method.server_streaming:
                _drain(channel.stream_stream(self.path, **kwargs)(iter(requests), timeout=timeout))
            elif self.method.server_streaming:
                _drain(channel.unary_stream(self.path, **kwargs)(requests[0], timeout=timeout))
            elif self.method.client_streaming:
                channel.stream_unary(self.path, **kwargs)(iter(requests), timeout=timeout)
            else:
                channel.unary_unary(self.path, **kwargs)(requests[0], timeout=timeout)
        except grpc.RpcError as error:
            details = error.details() or ""
            leaked = [marker for marker in LEAKS if marker in details]
            assert not leaked, f"{self.name} status leaks {leaked}: {details[:300]}"
            return error.code()
        return grpc.StatusCode.OK


def _drain(responses: Iterable[Any]) -> None:
    for _ in responses:
        pass


def every_rpc() -> list[Rpc]:
    return [Rpc(service, method) for service, descriptor in SERVICES.items() for method in descriptor.methods]
