"""One trace per request across gateway, tokenizer and inference.

All three services run in this process, each with its own tracer provider
(and service name) exporting to one in-memory exporter, so the test sees every
span the way a collector would: one trace id, the gateway's client spans as
the parents of the upstreams' server spans, and every span ended.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import grpc
import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from support import ServerThread, ServiceProcess, processes, wait_http_ready

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.admission import GatewayLimits
from llmsuite.gateway.app import GatewayApp
from llmsuite.gateway.rate_limit import KeyedRateLimiter
from llmsuite.gateway.upstreams import Upstreams
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.inference.engine import EngineSettings
from llmsuite.inference.service import InferenceApp
from llmsuite.runtime.channels import ChannelSettings
from llmsuite.runtime.logs import JsonFormatter
from llmsuite.runtime.settings import TelemetrySettings
from llmsuite.runtime.tracing import build_tracer_provider
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import TokenizerApp

GATEWAY = "llmsuite.gateway.v1.GatewayService"
TOKENIZER = "llmsuite.tokenizer.v1.TokenizerService"
INFERENCE = "llmsuite.inference.v1.InferenceService"
MAX_INPUT_CHARS = 1000


class SpanLedger(SpanProcessor):
    """Remembers every span started and ended, so the test can tell which never ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started: dict[int, str] = {}
        self.ended: set[int] = set()

    def on_start(self, span: Span, parent_context: object = None) -> None:
        with self._lock:
            self.started[span.context.span_id] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        with self._lock:
            self.ended.add(span.context.span_id)

    def never_ended(self) -> set[str]:
        with self._lock:
            return {name for span_id, name in self.started.items() if span_id not in self.ended}


@pytest.fixture(scope="module")
def traced_suite(tiny_model_dir: Path) -> Iterator[tuple[InMemorySpanExporter, SpanLedger, str]]:
    exporter, ledger = InMemorySpanExporter(), SpanLedger()

    def provider(service: str):
        p = build_tracer_provider(TelemetrySettings(service_name=service), extra=SimpleSpanProcessor(exporter))
        p.add_span_processor(ledger)
        return p

    gateway_provider = provider("llmsuite-gateway")
    tokenizer = TokenizerApp({"tiny": tiny_model_dir}, TokenizerLimits(max_input_chars=MAX_INPUT_CHARS))
    inference = InferenceApp({"tiny": tiny_model_dir}, EngineSettings(device="cpu", intra_op_threads=1))
    with ServerThread(tokenizer, tracer_provider=provider("llmsuite-tokenizer")) as tok, \
            ServerThread(inference, tracer_provider=provider("llmsuite-inference")) as inf:
        factory = partial(Upstreams.connect, tok.address, [inf.address], ChannelSettings(),
                          tracer_provider=gateway_provider, breaker_threshold=5, breaker_reset_s=5.0)
        gateway = GatewayApp(factory, GatewayLimits(), KeyedRateLimiter(0, 1, 0, 1), startup_timeout_s=60)
        with ServerThread(gateway, tracer_provider=gateway_provider) as gw:
            yield exporter, ledger, gw.address
            # Finished calls still hold grpc's request-writer coroutine; finalize
            # them while their event loop still runs, not at interpreter exit.
            gc.collect()
            gw.call(asyncio.sleep(0))


def spans_of_one_request(exporter: InMemorySpanExporter, root_name: str, timeout: float = 30.0
                         ) -> list[ReadableSpan]:
    """Every exported span in the trace of the (only) gateway server span named
    `root_name`, once no more arrive. Client spans end just after their call
    does, on the event loop, so the last ones may land after the reply."""
    deadline = time.monotonic() + timeout
    previous: list[ReadableSpan] | None = None
    while True:
        spans = list(exporter.get_finished_spans())
        roots = [s for s in spans if s.name == root_name and s.kind is SpanKind.SERVER]
        if roots:
            trace_id = roots[0].context.trace_id
            current = [s for s in spans if s.context.trace_id == trace_id]
            if previous is not None and len(current) == len(previous):
                return current
            previous = current
        if time.monotonic() > deadline:
            return previous or []
        time.sleep(0.05)


def test_a_streamed_generation_is_one_trace_with_every_span_ended(traced_suite):
    exporter, ledger, address = traced_suite
    exporter.clear()
    with grpc.insecure_channel(address) as ch:
        responses = list(gateway_pb2_grpc.GatewayServiceStub(ch).GenerateStream(pb.GenerateStreamRequest(
            model="tiny", prompt="Hello", sampling=common_pb2.SamplingParams(max_new_tokens=8, temperature=0))))
    assert responses[-1].final.usage.completion_tokens == 8

    spans = spans_of_one_request(exporter, f"/{GATEWAY}/GenerateStream")
    by_id = {s.context.span_id: s for s in spans}
    root = next(s for s in spans if s.name == f"/{GATEWAY}/GenerateStream")
    assert root.parent is None
    assert {s.resource.attributes["service.name"] for s in spans} == {
        "llmsuite-gateway", "llmsuite-tokenizer", "llmsuite-inference"}

    def server_span(method: str) -> ReadableSpan:
        matches = [s for s in spans if s.name == method and s.kind is SpanKind.SERVER]
        assert len(matches) == 1, (method, [s.name for s in spans])
        return matches[0]

    # Each upstream's server span hangs off the gateway's client span for that call,
    # which hangs off the gateway's own server span.
    for method in (f"/{TOKENIZER}/Encode", f"/{INFERENCE}/Generate"):
        server = server_span(method)
        assert server.parent is not None, method
        client = by_id.get(server.parent.span_id)
        assert client is not None, f"the parent of {method} was never exported"
        assert client.kind is SpanKind.CLIENT and client.name == method
        assert client.resource.attributes["service.name"] == "llmsuite-gateway"
        assert client.parent is not None and client.parent.span_id == root.context.span_id
        assert client.attributes["rpc.grpc.status_code"] == 0, (method, client.status)

    # Every span any of the three started has ended (and so was exported).
    assert not ledger.never_ended()


def test_an_http_callers_traceparent_makes_the_gateway_join_its_trace(traced_suite):
    exporter, _ledger, address = traced_suite
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    adapter = ServiceProcess(["llmsuite-openai", "--listen", "127.0.0.1:0", "--gateway", address], wait=False)
    with processes(adapter):
        base = wait_http_ready(adapter)
        exporter.clear()
        answer = httpx.post(f"{base}/v1/completions", timeout=60, json={"model": "tiny", "prompt": "Hello",
                                                                         "max_tokens": 4},
                            headers={"traceparent": f"00-{trace_id}-{parent_id}-01", "tracestate": "vendor=x"})
        assert answer.status_code == 200, answer.text
    spans = spans_of_one_request(exporter, f"/{GATEWAY}/Generate")
    root = next(s for s in spans if s.name == f"/{GATEWAY}/Generate" and s.kind is SpanKind.SERVER)
    assert format(root.context.trace_id, "032x") == trace_id  # the caller's trace, not a new one
    assert root.parent is not None and format(root.parent.span_id, "016x") == parent_id
    assert root.context.trace_state.get("vendor") == "x"
    # The upstream calls stay inside it.
    assert {f"/{TOKENIZER}/Encode", f"/{INFERENCE}/Generate"} <= {s.name for s in spans}


class JsonLines(logging.Handler):
    """Every log record as the services' JSON formatter writes it."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.entries: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.entries.append(json.loads(self.format(record)))


def test_logs_carry_the_request_id_and_the_trace_of_the_rpc_they_belong_to(traced_suite):
    exporter, _ledger, address = traced_suite
    exporter.clear()
    lines, root = JsonLines(), logging.getLogger()
    level = root.level
    root.addHandler(lines)
    root.setLevel(logging.INFO)  # "rpc failed" is an INFO line
    try:
        with grpc.insecure_channel(address) as ch, pytest.raises(grpc.RpcError) as refused:
            # Too long for the tokenizer: it refuses, and logs that, inside the request's trace.
            gateway_pb2_grpc.GatewayServiceStub(ch).Tokenize(
                pb.TokenizeRequest(model="tiny", texts=["x" * (MAX_INPUT_CHARS + 1)]),
                metadata=(("x-request-id", "req-traced-1"),))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        root.removeHandler(lines)
        root.setLevel(level)

    spans = spans_of_one_request(exporter, f"/{GATEWAY}/Tokenize")
    tokenizer_span = next(s for s in spans if s.name == f"/{TOKENIZER}/Encode" and s.kind is SpanKind.SERVER)
    refusals = [e for e in lines.entries if e["msg"] == "rpc failed" and e.get("method") == f"/{TOKENIZER}/Encode"]
    assert len(refusals) == 1, [e for e in lines.entries if e["msg"] == "rpc failed"]
    # The gateway forwarded its request id to the tokenizer, and the log line names the span it was in.
    assert refusals[0]["request_id"] == "req-traced-1"
    assert refusals[0]["trace_id"] == format(tokenizer_span.context.trace_id, "032x")
    assert refusals[0]["span_id"] == format(tokenizer_span.context.span_id, "016x")
    outside = JsonFormatter().format(logging.makeLogRecord({"msg": "no rpc here"}))
    assert "trace_id" not in json.loads(outside)
