"""The bootstrap's Prometheus endpoint and per-RPC metrics, scraped over HTTP."""

from __future__ import annotations

import socket
import threading

import grpc
import pytest
from metrics_scrape import metrics_port, metrics_were_served, scrape, scrape_until
from support import ServerThread, ServiceProcess

from llmsuite.runtime.server import start_server
from llmsuite.runtime.settings import ServerSettings, resolve_metrics_listen
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import SERVICE_NAME, TokenizerApp
from llmsuite.tokenizer.v1 import tokenizer_pb2 as pb
from llmsuite.tokenizer.v1 import tokenizer_pb2_grpc

METRICS_ON = ServerSettings(listen="127.0.0.1:0", grace_period_s=1.0, log_format="text",
                            metrics_listen="127.0.0.1:0")


@pytest.fixture
def server(tiny_tokenizer_dir):
    with ServerThread(TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits()), METRICS_ON) as srv:
        yield srv


def handled(result, method: str, code: str) -> float:
    return result.get("llmsuite_grpc_server_handled_total", grpc_service=SERVICE_NAME, grpc_method=method,
                      grpc_code=code)


def test_rpcs_are_counted_and_timed_by_method_and_code(server):
    port = server.running.metrics_port
    before = scrape(port)
    assert handled(before, "CountTokens", "OK") == 0
    with server.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        for _ in range(3):
            stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=["hello"]))
        with pytest.raises(grpc.RpcError):
            stub.CountTokens(pb.CountTokensRequest(model="nope", texts=["hello"]))
        list(stub.DecodeStream(iter([pb.DecodeStreamRequest(start=pb.DecodeStreamStart(model="tiny")),
                                     pb.DecodeStreamRequest(token_ids=pb.TokenIds(token_ids=[5, 6]))])))
    after = scrape_until(port, lambda r: handled(r, "DecodeStream", "OK") == 1)
    assert handled(after, "CountTokens", "OK") == 3
    assert handled(after, "CountTokens", "NOT_FOUND") == 1
    assert handled(after, "DecodeStream", "OK") == 1
    assert after.get("llmsuite_grpc_server_started_total", grpc_method="CountTokens", grpc_type="unary") == 4
    assert after.get("llmsuite_grpc_server_started_total", grpc_method="DecodeStream", grpc_type="bidi_stream") == 1
    assert after.get("llmsuite_grpc_server_handling_seconds_count", grpc_method="CountTokens", grpc_code="OK") == 3
    assert after.get("llmsuite_grpc_server_handling_seconds_sum", grpc_method="CountTokens") > 0
    # Buckets are cumulative: the +Inf bucket holds every observation.
    assert after.get("llmsuite_grpc_server_handling_seconds_bucket", grpc_method="CountTokens", grpc_code="OK",
                     le="+Inf") == 3
    assert after.value("process_resident_memory_bytes") > 0


def test_a_stream_is_counted_when_it_ends_with_the_code_it_ended_with(server):
    port = server.running.metrics_port
    with server.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        release = threading.Event()

        def requests():
            yield pb.DecodeStreamRequest(start=pb.DecodeStreamStart(model="tiny"))
            yield pb.DecodeStreamRequest(token_ids=pb.TokenIds(token_ids=[5]))
            release.wait(30)

        stream = stub.DecodeStream(requests())
        next(stream)
        during = scrape(port)
        assert during.get("llmsuite_grpc_server_started_total", grpc_method="DecodeStream") == 1
        assert during.value("llmsuite_grpc_server_handled_total", grpc_method="DecodeStream") is None
        stream.cancel()
        release.set()
    after = scrape_until(port, lambda r: r.value("llmsuite_grpc_server_handled_total",
                                                 grpc_method="DecodeStream") is not None)
    assert handled(after, "DecodeStream", "CANCELLED") == 1


def test_each_server_has_its_own_registry(tiny_tokenizer_dir, server):
    with ServerThread(TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits()), METRICS_ON) as other, \
            other.channel() as ch:
        tokenizer_pb2_grpc.TokenizerServiceStub(ch).CountTokens(pb.CountTokensRequest(model="tiny", texts=["x"]))
        assert handled(scrape(other.running.metrics_port), "CountTokens", "OK") == 1
    assert handled(scrape(server.running.metrics_port), "CountTokens", "OK") == 0


def test_metrics_are_off_when_not_configured(tiny_tokenizer_dir):
    with ServerThread(TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits())) as srv:
        assert srv.running.metrics_port is None


def test_a_busy_metrics_port_fails_start_up_with_the_reason(tiny_tokenizer_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        settings = ServerSettings(listen="127.0.0.1:0", log_format="text", metrics_listen=address)
        with ServerThread(TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits()), settings,
                          start=False) as srv:
            with pytest.raises(RuntimeError, match=f"cannot serve metrics on {address}"):
                srv.call(start_server(srv.settings, srv.app))


@pytest.mark.parametrize(("value", "listen", "expected"), [
    ("auto", "0.0.0.0:50051", "0.0.0.0:51051"),
    ("auto", "[::]:50052", "[::]:51052"),
    ("auto", "127.0.0.1:0", "127.0.0.1:0"),
    ("off", "0.0.0.0:50051", ""),
    ("", "0.0.0.0:50051", ""),
    ("10.0.0.1:9100", "0.0.0.0:50051", "10.0.0.1:9100"),
])
def test_metrics_listen_values(value, listen, expected):
    assert resolve_metrics_listen(value, listen) == expected


@pytest.mark.parametrize("value", ["9100", "host:", "h:x", "h:70000"])
def test_metrics_listen_rejects_what_is_not_an_address(value):
    with pytest.raises(SystemExit, match="--metrics-listen"):
        resolve_metrics_listen(value, "0.0.0.0:50051")


def test_metrics_listen_auto_needs_room_above_the_grpc_port():
    with pytest.raises(SystemExit, match="out of range"):
        resolve_metrics_listen("auto", "0.0.0.0:65000")


def test_a_service_process_serves_metrics_by_default_and_off_turns_them_off(tiny_tokenizer_dir):
    argv = ["llmsuite-tokenizer", "--listen", "127.0.0.1:0", "--model", f"tiny={tiny_tokenizer_dir}"]
    with ServiceProcess(argv) as proc, grpc.insecure_channel(proc.address) as ch:
        tokenizer_pb2_grpc.TokenizerServiceStub(ch).Encode(pb.EncodeRequest(model="tiny", texts=["hi"]))
        result = scrape(metrics_port(proc))
        assert handled(result, "Encode", "OK") == 1
        assert result.value("process_start_time_seconds") is not None
    with ServiceProcess([*argv, "--metrics-listen", "off"]) as proc:
        assert not metrics_were_served(proc)
