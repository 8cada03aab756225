"""Chat templates as an attacker writes them, against a real server: every attack fails
fast with a clear status, abandoned renders stop, and the service keeps serving."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf import struct_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import ServerThread

from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.tokenizer.engine import TokenizerLimits
from llmsuite.tokenizer.service import TokenizerApp
from llmsuite.tokenizer.template_pool import TemplateLimits
from llmsuite.tokenizer.v1 import tokenizer_pb2 as pb
from llmsuite.tokenizer.v1 import tokenizer_pb2_grpc

USER = [common_pb2.ChatMessage(role="user", content="hello")]
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
ATTACKS = {
    "string repetition": ("{{ 'x' * 10**9 }}", "CHAT_TEMPLATE_LIMIT", "memory"),
    "list repetition": ("{{ ([1] * 10**9) | length }}", "CHAT_TEMPLATE_LIMIT", "memory"),
    "nested range loops": (NESTED_LOOPS, "CHAT_TEMPLATE_LIMIT", "time"),
    "huge integer power": ("{{ 7 ** 999999999 }}", "CHAT_TEMPLATE_LIMIT", None),
    "recursive macro": ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "CHAT_TEMPLATE_LIMIT", "recursion"),
    "output past the limit": ("{{ 'x' * 10**6 }}", "INPUT_TOO_LONG", None),
    "output from a loop": ("{% for i in range(100000) %}{{ 'abcdefgh' }}{% endfor %}", "INPUT_TOO_LONG", None),
}


def _render(stub, template: str = "", **kwargs):  # type: ignore[no-untyped-def]
    return stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(
        model="tiny", messages=USER, chat_template=template, **kwargs), timeout=kwargs.pop("timeout", 120))


def _assert_healthy(ch: grpc.Channel) -> None:
    stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
    assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == \
        health_pb2.HealthCheckResponse.SERVING
    assert stub.CountTokens(pb.CountTokensRequest(model="tiny", texts=["still here"])).total > 0
    assert "hello" in _render(stub).text  # the model's own template, on a template worker


@pytest.fixture(scope="module")
def server(tiny_tokenizer_dir: Path):
    app = TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits(max_input_chars=100_000),
                       allow_request_templates=True, templates=TemplateLimits(timeout_s=2.0, workers=2))
    with ServerThread(app) as srv:
        yield srv


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_each_attack_fails_with_a_clear_status_and_the_service_stays_healthy(server, attack):
    template, reason, resource = ATTACKS[attack]
    with server.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as exc_info:
            _render(stub, template)
        assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, exc_info.value
        details = error_details(exc_info.value)
        assert details["reason"] == reason, details
        if resource is not None:
            assert details["metadata"]["resource"] == resource, details
        _assert_healthy(ch)


def test_template_variables_must_be_finite_and_shallow(server):
    nan = struct_pb2.Struct()
    nan.update({"tools": [{"weight": float("nan")}]})
    deep = struct_pb2.Struct()
    level = deep
    for _ in range(33):  # past the 32-level limit, within what protobuf itself parses
        level = level.get_or_create_struct("d")
    with server.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        for variables, field in ((nan, "template_variables.tools[0].weight"), (deep, None)):
            with pytest.raises(grpc.RpcError) as exc_info:
                _render(stub, "{{ tools }}", template_variables=variables)
            assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            if field is not None:
                assert field in [f for f, _ in error_details(exc_info.value)["field_violations"]]
        _assert_healthy(ch)


def test_too_many_messages_are_refused_before_rendering(server):
    with server.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as exc_info:
            stub.ApplyChatTemplate(pb.ApplyChatTemplateRequest(model="tiny", messages=USER * 1025))
        assert error_details(exc_info.value)["reason"] == "BATCH_TOO_LARGE"


def _wait_until_gone(pids: set[int], timeout_s: float = 60.0) -> set[int]:
    deadline = time.monotonic() + timeout_s
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        for pid in list(alive):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive.discard(pid)
        time.sleep(0.05)
    return alive


def test_renders_abandoned_by_their_clients_are_stopped(tiny_tokenizer_dir: Path):
    # A time limit far beyond the test: only the callers leaving can stop these renders.
    app = TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits(), allow_request_templates=True,
                       templates=TemplateLimits(timeout_s=3600.0, workers=2))
    with ServerThread(app) as srv, srv.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        abandoned = [stub.ApplyChatTemplate.future(pb.ApplyChatTemplateRequest(
            model="tiny", messages=USER, chat_template=NESTED_LOOPS)) for _ in range(4)]
        busy: set[int] = set()
        while len(busy) < 2:  # both workers are rendering
            busy, _ = srv.call(_pids(app))
        for call in abandoned:
            call.cancel()
        assert _wait_until_gone(busy) == set()
        _assert_healthy(ch)
        # The two queued renders never started a worker of their own.
        busy_now, _ = srv.call(_pids(app))
        assert not busy_now & busy


async def _pids(app: TokenizerApp) -> tuple[set[int], set[int]]:
    return app.templates.worker_pids()


def test_request_templates_are_off_unless_allowed(tiny_tokenizer_dir: Path):
    with ServerThread(TokenizerApp({"tiny": tiny_tokenizer_dir}, TokenizerLimits())) as srv, srv.channel() as ch:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(ch)
        with pytest.raises(grpc.RpcError) as exc_info:
            _render(stub, "{{ messages[0].content }}")
        assert exc_info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = error_details(exc_info.value)
        assert details["reason"] == "UNSUPPORTED_PARAMETER"
        assert "--allow-request-templates" in details["message"]
        assert "hello" in _render(stub).text
