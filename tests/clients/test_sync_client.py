"""LlmsuiteClient against a real gRPC server on loopback: every method, metadata,
compression on the wire, errors with details, cancellation, retries, TLS."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from support import ServerThread

from llmsuite.client import (
    ChatMessage,
    GenerateOptions,
    InvalidRequest,
    LlmsuiteClient,
    LlmsuiteError,
    NotFound,
    RateLimited,
    TextChunk,
    Unauthenticated,
    Unavailable,
)
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.runtime.settings import ServerSettings, TlsSettings


@pytest.fixture
def client(gateway):
    with LlmsuiteClient(gateway.address, api_key=gateway.api_key, timeout_s=10) as c:
        yield c


def test_generate_returns_completion_with_summary(client, gateway):
    c = client.generate("alpha beta gamma delta", max_new_tokens=3, return_token_ids=True, seed=7, top_k=5)
    assert c.text == "alpha beta gamma"
    assert c.finish_reason == "length"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.cached_tokens) == (5, 3, 0)
    assert c.token_ids == tuple(gateway.word_id(w) for w in ("alpha", "beta", "gamma"))
    assert c.timings.total_s == pytest.approx(0.0125) and c.timings.queue_s == pytest.approx(0.001)
    assert c.matched_stop is None and c.request_id
    assert c.raw.summary.usage.completion_tokens == 3  # the proto stays reachable
    sent = gateway.app.last("Generate").request
    assert sent.model == "tiny" and sent.sampling.max_new_tokens == 3 and sent.sampling.seed == 7
    assert sent.sampling.top_k == 5 and not sent.sampling.HasField("temperature")  # unset stays unset
    assert not sent.HasField("add_special_tokens")


def test_generate_takes_every_option_generate_options_lists_and_refuses_others(client, gateway):
    options = dict(model="tiny", max_new_tokens=2, temperature=0.5, top_k=3, top_p=0.9, repetition_penalty=1.1,
                   seed=1, stop=["zz"], stop_token_ids=[7], ignore_eos=False, logprobs=False, top_logprobs=None,
                   constraint=None, presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={5: 1.5}, min_p=0.1,
                   min_tokens=1, include_stop_str_in_output=True, add_special_tokens=False, truncate_prompt=True,
                   keep_special_tokens=True, return_token_ids=True, request_id="rid-options", timeout_s=10.0)
    assert set(options) == GenerateOptions.__optional_keys__  # the test covers every option there is
    client.generate("alpha beta", **options)
    call = gateway.app.last("Generate")
    sent = call.request
    assert (sent.sampling.max_new_tokens, sent.sampling.top_k, list(sent.sampling.stop_strings)) == (2, 3, ["zz"])
    assert list(sent.sampling.stop_token_ids) == [7] and sent.sampling.temperature == pytest.approx(0.5)
    assert (sent.sampling.presence_penalty, sent.sampling.frequency_penalty, dict(sent.sampling.logit_bias)) == (
        0.5, -0.5, {5: 1.5})
    assert sent.sampling.min_p == pytest.approx(0.1) and sent.sampling.min_tokens == 1
    assert sent.sampling.include_stop_str_in_output
    assert sent.HasField("add_special_tokens") and not sent.add_special_tokens
    assert sent.truncate_prompt and sent.keep_special_tokens and sent.return_token_ids
    assert call.metadata["x-request-id"] == "rid-options"
    with pytest.raises(TypeError, match="max_tokens"):
        client.generate("alpha", max_tokens=3)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="max_tokens"):
        client.generate_stream("alpha", max_tokens=3)  # type: ignore[call-arg]


def test_generate_stop_reasons_and_logprobs(client, gateway):
    eos = client.generate("one two", max_new_tokens=10)
    assert (eos.finish_reason, eos.matched_stop) == ("stop", gateway.eos)
    stopped = client.generate("say hello world now", stop=["world"], max_new_tokens=10)
    assert (stopped.text, stopped.finish_reason, stopped.matched_stop) == ("say hello ", "stop", "world")
    lp = client.generate("a b", logprobs=True, top_logprobs=2)
    assert len(lp.logprobs) == 2 and lp.logprobs[0].chosen.logprob == -0.25 and len(lp.logprobs[0].top) == 2


def test_request_id_auth_and_user_agent_metadata(client, gateway):
    c = client.generate("hi", request_id="req-123")
    md = gateway.app.last("Generate").metadata
    assert md["x-request-id"] == "req-123" and c.request_id == "req-123"
    assert md["authorization"] == f"Bearer {gateway.api_key}"
    assert md["user-agent"].startswith("llmsuite-python")
    counts = client.count_tokens(["a b", "c"], request_id="req-456")  # id read from the response headers
    assert counts.request_id == "req-456"


@pytest.mark.parametrize(("compression", "flag"), [("gzip", 1), ("none", 0)])
def test_requests_are_gzip_compressed_on_the_wire(gateway, recording_proxy, compression, flag):
    with LlmsuiteClient(recording_proxy.address, api_key=gateway.api_key, compression=compression,
                        timeout_s=10) as c:
        c.generate("word " * 200, max_new_tokens=1)
    (headers, body), = [r for r in recording_proxy.requests() if r[0][":path"].endswith("/Generate")]
    assert headers.get("grpc-encoding", "identity") == ("gzip" if compression == "gzip" else "identity")
    assert body[0] == flag  # the gRPC message's compressed-flag byte


def test_stream_yields_chunks_then_completion(client, gateway):
    stream = client.generate_stream("the quick brown fox", max_new_tokens=8, return_token_ids=True,
                                    request_id="s-1")
    chunks = list(stream)
    assert [ch.text for ch in chunks] == ["the", " quick", " brown", " fox"]
    assert chunks[1] == TextChunk(" quick", (gateway.word_id("quick"),))
    assert stream.completion is not None and stream.completion.text == "the quick brown fox"
    assert stream.completion.finish_reason == "stop" and stream.completion.usage.completion_tokens == 4
    assert stream.request_id == "s-1" == stream.completion.request_id
    assert stream.wait() is stream.completion  # already finished: nothing more to read


def test_breaking_out_of_a_stream_cancels_the_rpc(client, gateway):
    gateway.app.token_delay_s = 0.05
    received = []
    for chunk in client.generate_stream("w " * 200, max_new_tokens=200):
        received.append(chunk)
        if len(received) == 2:
            break
    assert gateway.app.cancelled.wait(5), "the server never saw the cancellation"

    gateway.app.cancelled.clear()
    with client.generate_stream("w " * 200, max_new_tokens=200) as stream:
        next(iter(stream))
    assert gateway.app.cancelled.wait(5)


def test_invalid_argument_maps_to_readable_exception(client):
    with pytest.raises(InvalidRequest) as info:
        client.generate("hi", top_p=1.5, request_id="bad-1")
    err = info.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "INVALID_FIELD"
    assert [(v.field, v.description) for v in err.field_violations] == [("sampling.top_p", "must be in (0, 1]")]
    assert err.request_id == "bad-1"
    assert str(err) == "INVALID_ARGUMENT: sampling.top_p: must be in (0, 1] [reason INVALID_FIELD]"


def test_values_protobuf_cannot_hold_fail_locally_like_server_validation(client, gateway):
    with pytest.raises(InvalidRequest) as info:
        client.generate("hi", max_new_tokens=-1)
    assert info.value.field_violations[0].field == "sampling.max_new_tokens"
    assert not gateway.app.calls  # never sent


def test_not_found_rate_limit_and_mid_stream_errors(client):
    with pytest.raises(NotFound) as nf:
        client.generate("hi", model="huge")
    assert nf.value.reason == "MODEL_NOT_FOUND" and "loaded: tiny" in str(nf.value)
    with pytest.raises(RateLimited) as rl:
        client.generate("ratelimit")
    assert rl.value.retry_after_s == 2.5 and str(rl.value).endswith("[reason RATE_LIMITED, retry after 2.5s]")
    stream = client.generate_stream("fine so far crash never", max_new_tokens=10)
    seen = []
    with pytest.raises(Unavailable) as un:
        for chunk in stream:
            seen.append(chunk.text)
    assert seen == ["fine", " so", " far"] and stream.completion is None
    assert un.value.reason == "UPSTREAM_CIRCUIT_OPEN" and un.value.retry_after_s == 1.5


def test_authentication(gateway):
    for key, reason in ((None, "MISSING_API_KEY"), ("wrong", "INVALID_API_KEY")):
        with LlmsuiteClient(gateway.address, api_key=key, timeout_s=5) as c:
            with pytest.raises(Unauthenticated) as info:
                c.list_models()
            assert info.value.reason == reason
            assert c.health() == "SERVING"  # health is exempt from auth


def test_with_api_key_shares_the_channel_and_sends_its_own_key(gateway):
    with LlmsuiteClient(gateway.address, timeout_s=5) as anonymous:
        keyed = anonymous.with_api_key(gateway.api_key)
        assert keyed._channel is anonymous._channel
        assert [m.name for m in keyed.list_models()] == ["tiny", "tiny-gpt2"]
        assert gateway.app.last("ListModels").metadata["authorization"] == f"Bearer {gateway.api_key}"
        with pytest.raises(Unauthenticated):
            anonymous.list_models()  # the original keeps its own (absent) key
        with pytest.raises(Unauthenticated):
            keyed.with_api_key(None).list_models()


def test_models_tokenize_count(client, gateway):
    models = client.list_models()
    assert [m.name for m in models] == ["tiny", "tiny-gpt2"]
    assert models[0].context_length == 512 and models[0].has_chat_template and not models[1].has_chat_template
    encs = client.tokenize(["hello big world", "x"], offsets=True)
    assert encs[0].token_ids == (1, gateway.word_id("hello"), gateway.word_id("big"), gateway.word_id("world"))
    assert encs[0].offsets == ((0, 0), (0, 5), (6, 9), (10, 15)) and not encs[0].truncated
    assert client.tokenize("hello world", add_special_tokens=False)[0].token_ids == (gateway.word_id("hello"),
                                                                                     gateway.word_id("world"))
    assert gateway.app.last("Tokenize").request.texts == ["hello world"]  # a lone string is one text
    counts = client.count_tokens(["a b", "c"])
    assert counts.counts == (3, 2) and counts.total == 5
    with pytest.raises(InvalidRequest) as info:
        client.tokenize([])
    assert info.value.reason == "MISSING_FIELD" and info.value.field_violations[0].field == "texts"


def test_chat_session_reuses_one_stream_and_reports_cached_tokens(client, gateway):
    with client.chat("tiny", system="be brief", max_new_tokens=8, request_id="chat-1") as chat:
        first = chat.send("hello there")
        assert "".join(ch.text for ch in first) == "hello there"
        assert first.completion.usage == type(first.completion.usage)(4, 2, 0)  # 2 system + 2 user words
        second = chat.send("and again please", temperature=0.0)
        assert second.wait().text == "and again please"
        assert chat.last is second.completion and chat.last.turn == 1
        assert chat.last.usage.cached_tokens == 6  # the whole first turn was reused
        assert chat.request_id == "chat-1"
        assert [m.role for m in chat.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert sum(1 for c in gateway.app.calls if c.method == "Chat") == 1
    start, turn = gateway.app.chat_requests
    assert [(m.role, m.content) for m in start.start.messages] == [("system", "be brief"), ("user", "hello there")]
    assert start.start.sampling.max_new_tokens == 8
    # A turn's sampling replaces the start's, so the client sends the merged set.
    assert turn.turn.sampling.max_new_tokens == 8 and turn.turn.sampling.temperature == 0.0
    assert [m.content for m in turn.turn.messages] == ["and again please"]


def test_chat_reply_left_early_is_drained_before_the_next_turn(client, gateway):
    with client.chat(messages=[ChatMessage("user", "earlier"), {"role": "assistant", "content": "ok"}]) as chat:
        for _ in chat.send("one two three four"):
            break
        assert chat.send("five").wait().text == "five"
        assert chat.last.usage.cached_tokens == 2 + 4 + 4
    assert not gateway.app.cancelled.is_set()


def test_chat_cancel_stops_the_reply(client, gateway):
    gateway.app.token_delay_s = 0.05
    chat = client.chat()
    reply = chat.send("w " * 100, max_new_tokens=100)
    next(iter(reply))
    chat.cancel("user pressed stop")
    assert reply.completion.finish_reason == "cancelled"
    assert gateway.app.chat_requests[-1].cancel.reason == "user pressed stop"
    with pytest.raises(RuntimeError):
        chat.send("more")


def test_chat_errors_surface_on_the_reply(client):
    with client.chat("nope") as chat, pytest.raises(NotFound):
        chat.send("hi").wait()


def test_health_statuses(client, gateway):
    assert client.health() == "SERVING"
    assert client.health("llmsuite.gateway.v1.GatewayService") == "SERVING"
    assert client.health("no.such.Service") == "SERVICE_UNKNOWN"
    gateway.set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        assert client.health() == "NOT_SERVING"
    finally:
        gateway.set_health(health_pb2.HealthCheckResponse.SERVING)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Flaky(gateway_pb2_grpc.GatewayServiceServicer):
    """Fails with UNAVAILABLE before sending anything (retryable), and a
    stream that fails after its first message (never replayed)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.attempts = {"Generate": 0, "GenerateStream": 0}

    def Generate(self, request, context):
        self.attempts["Generate"] += 1
        if self.attempts["Generate"] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        return pb.GenerateResponse(text="ok")

    def GenerateStream(self, request, context):
        self.attempts["GenerateStream"] += 1
        yield pb.GenerateStreamResponse(delta=pb.TextDelta(text="partial"))
        context.abort(grpc.StatusCode.UNAVAILABLE, "upstream lost")


@pytest.mark.parametrize(("failures", "succeeds"), [(2, True), (5, False)])
def test_unavailable_is_retried_up_to_three_attempts_and_streams_are_not_replayed(failures, succeeds):
    servicer = _Flaky(failures)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with LlmsuiteClient(f"127.0.0.1:{port}", timeout_s=10) as c:
            if succeeds:
                assert c.generate("x").text == "ok"
            else:
                with pytest.raises(Unavailable):
                    c.generate("x")
            assert servicer.attempts["Generate"] == min(failures + 1, 3)
            got = []
            with pytest.raises(Unavailable):
                for chunk in c.generate_stream("x"):
                    got.append(chunk.text)
            assert got == ["partial"] and servicer.attempts["GenerateStream"] == 1
    finally:
        server.stop(0)


def test_wait_for_ready_waits_for_a_late_server():
    port = _free_port()
    with LlmsuiteClient(f"127.0.0.1:{port}", wait_for_ready=False, timeout_s=5) as c:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            c.list_models()
        assert time.monotonic() - started < 4

    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    threading.Timer(0.5, lambda: (server.add_insecure_port(f"127.0.0.1:{port}"), server.start())).start()
    try:
        with LlmsuiteClient(f"127.0.0.1:{port}", timeout_s=10) as c:
            assert c.health(wait_for_ready=True) == "SERVING"
    finally:
        server.stop(0)


def test_constructor_rejects_inconsistent_options():
    with pytest.raises(ValueError, match="compression"):
        LlmsuiteClient(compression="brotli")
    with pytest.raises(ValueError, match="together"):
        LlmsuiteClient(cert_file="c.pem")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_tls_with_a_private_ca(tmp_path: Path, gateway_server):
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    settings = ServerSettings(listen="127.0.0.1:0", grace_period_s=0.2, log_format="text",
                              tls=TlsSettings(cert_file=cert, key_file=key))
    with ServerThread(gateway_server.app, settings) as tls_server:
        with LlmsuiteClient(tls_server.address, ca_file=cert, timeout_s=10) as c:
            assert c.generate("secure hello").text == "secure hello"
        with LlmsuiteClient(tls_server.address, timeout_s=3, wait_for_ready=False) as plain:
            with pytest.raises(LlmsuiteError):
                plain.list_models()
