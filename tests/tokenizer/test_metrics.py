"""Tokenizer metrics scraped from a live server as requests run."""

from __future__ import annotations

import shutil

import grpc
import pytest
from metrics_scrape import scrape, scrape_until
from support import ServerThread
from tokenizers import Tokenizer

from llmsuite.runtime.settings import ServerSettings
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import TokenizerApp
from llmsuite.tokenizer.v1 import tokenizer_pb2 as pb
from llmsuite.tokenizer.v1 import tokenizer_pb2_grpc

METRICS_ON = ServerSettings(listen="127.0.0.1:0", grace_period_s=1.0, log_format="text",
                            metrics_listen="127.0.0.1:0")


@pytest.fixture
def served(tiny_tokenizer_dir, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(tiny_tokenizer_dir, live)
    with ServerThread(TokenizerApp({"tiny": live}, TokenizerLimits()), METRICS_ON) as srv, srv.channel() as ch:
        yield srv, tokenizer_pb2_grpc.TokenizerServiceStub(ch), live


def test_encode_and_decode_work_is_counted_per_model(served, tiny_tokenizer_dir):
    srv, stub, _ = served
    reference = Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))
    texts = ["Hello, world!", "a longer text with more tokens in it"]
    expected_tokens = sum(len(reference.encode(t).ids) for t in texts)
    stub.Encode(pb.EncodeRequest(model="tiny", texts=texts))
    stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=texts))
    stub.Decode(pb.DecodeRequest(model="tiny", sequences=[pb.TokenIds(token_ids=[5, 6, 7]),
                                                          pb.TokenIds(token_ids=[8])]))
    list(stub.DecodeStream(iter([pb.DecodeStreamRequest(start=pb.DecodeStreamStart(model="tiny")),
                                 pb.DecodeStreamRequest(token_ids=pb.TokenIds(token_ids=[5, 6])),
                                 pb.DecodeStreamRequest(token_ids=pb.TokenIds(token_ids=[7]))])))
    with pytest.raises(grpc.RpcError):
        stub.Encode(pb.EncodeRequest(model="made-up", texts=["x"]))

    result = scrape(srv.running.metrics_port)
    assert result.get("llmsuite_tokenizer_encoded_texts_total", model="tiny") == 4
    assert result.get("llmsuite_tokenizer_encoded_tokens_total", model="tiny") == 2 * expected_tokens
    assert result.get("llmsuite_tokenizer_decoded_tokens_total", model="tiny") == 4 + 3
    assert {s.labels["model"] for s in result.samples if s.name.startswith("llmsuite_tokenizer_")
            and "model" in s.labels} == {"tiny"}
    assert result.get("llmsuite_tokenizer_vocab_size", model="tiny") == reference.get_vocab_size()
    assert result.value("llmsuite_tokenizer_queued_requests") == 0  # idle: nothing waits for a worker
    assert result.value("llmsuite_tokenizer_oldest_wait_seconds") == 0


def test_reloads_are_counted_by_outcome(served):
    srv, stub, live = served
    port = srv.running.metrics_port
    loaded_at = scrape(port).get("llmsuite_tokenizer_loaded_timestamp_seconds", model="tiny")
    assert loaded_at > 0
    stub.Reload(pb.ReloadRequest(model="tiny"))
    (live / "tokenizer.json").write_text("{ not json")
    with pytest.raises(grpc.RpcError) as failed:
        stub.Reload(pb.ReloadRequest(model="tiny"))
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    result = scrape_until(port, lambda r: r.value("llmsuite_tokenizer_reloads_total", outcome="failure") is not None)
    assert result.get("llmsuite_tokenizer_reloads_total", model="tiny", outcome="success") == 1
    assert result.get("llmsuite_tokenizer_reloads_total", model="tiny", outcome="failure") == 1
    assert result.get("llmsuite_tokenizer_loaded_timestamp_seconds", model="tiny") >= loaded_at
