"""Hypothesis over the metadata every RPC reads (authorization, x-request-id), against a
tokenizer with API keys and scopes: any header gets an authentication answer or a normal
one, never a server fault, and a valid key still works afterwards."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import ServiceProcess

from llmsuite.tokenizer.v1 import tokenizer_pb2 as pb
from llmsuite.tokenizer.v1 import tokenizer_pb2_grpc

from .conftest import Tally
from .rpcs import SERVER_FAULTS

KEYS = "user-key-1,ops admin-key-2 admin"
# Metadata values gRPC lets a client send: printable ASCII.
PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)


def header_values() -> st.SearchStrategy[str]:
    keys = st.sampled_from(["user-key-1", "admin-key-2", "wrong", ""])
    return st.one_of(
        st.builds(lambda scheme, key: f"{scheme} {key}", st.sampled_from(["Bearer", "bearer", "Basic", "", "Bearer "]),
                  keys),
        st.text(PRINTABLE, max_size=40),
        st.builds(lambda piece, times: piece * times, st.text(PRINTABLE, min_size=1, max_size=4),
                  st.integers(500, 4000)),
    )


@pytest.fixture(scope="module")
def keyed_tokenizer(tiny_tokenizer_dir: Path):
    with ServiceProcess(["llmsuite-tokenizer", "--listen", "127.0.0.1:0", "--model", f"tiny={tiny_tokenizer_dir}"],
                        env={"LLMSUITE_API_KEYS": KEYS}) as process:
        yield process


@settings(settings.get_profile("fuzz"))
@given(authorization=st.one_of(st.none(), header_values()), request_id=st.one_of(st.none(), header_values()),
       admin=st.booleans())
def test_any_authorization_and_request_id_get_a_specific_status(keyed_tokenizer, tally: Tally, authorization,
                                                                  request_id, admin):
    metadata = [(key, value) for key, value in (("authorization", authorization), ("x-request-id", request_id))
                if value is not None]
    with grpc.insecure_channel(keyed_tokenizer.address) as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        try:
            if admin:
                stub.Reload(pb.ReloadRequest(model="tiny"), metadata=metadata, timeout=30)
            else:
                stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=["x"]), metadata=metadata, timeout=30)
            code = grpc.StatusCode.OK
        except grpc.RpcError as error:
            code = error.code()
    tally["tokenizer metadata"][code.name] += 1
    assert code not in SERVER_FAULTS, code
    assert keyed_tokenizer.alive(), keyed_tokenizer.log()


def test_valid_keys_still_work_after_the_metadata_fuzzing(keyed_tokenizer):
    with grpc.insecure_channel(keyed_tokenizer.address) as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        assert stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=["x"]),
                                metadata=(("authorization", "Bearer user-key-1"),), timeout=30).total
        assert stub.Reload(pb.ReloadRequest(model="tiny"), metadata=(("authorization", "Bearer admin-key-2"),),
                           timeout=30).info.name == "tiny"
