"""The `llmsuite` CLI: commands through `main([...])` with captured output and
exit codes, health probes against a bare grpc.health.v1 server, and the
installed console script as a real subprocess (including Ctrl-C)."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmsuite.client.cli import main

CONSOLE_SCRIPT = Path(sys.executable).parent / "llmsuite"


@pytest.fixture
def cli(gateway, capsys, monkeypatch):
    """Runs main() against the fake gateway (address and key from the
    environment, as a user would set them); returns (code, stdout, stderr)."""
    monkeypatch.setenv("LLMSUITE_ADDRESS", gateway.address)
    monkeypatch.setenv("LLMSUITE_API_KEY", gateway.api_key)

    def run(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_generate(cli, gateway):
    code, out, err = cli("generate", "hello big world", "--max-new-tokens", "2", "--seed", "3",
                         "--stop", "zzz", "--stop", "yyy", "--request-id", "cli-1")
    assert (code, out) == (0, "hello big\n")
    assert err.startswith("[length] prompt_tokens=4 completion_tokens=2 cached_tokens=0 ")
    assert err.strip().endswith("request_id=cli-1")
    sent = gateway.app.last("Generate").request
    assert list(sent.sampling.stop_strings) == ["zzz", "yyy"] and sent.sampling.seed == 3
    assert gateway.app.last("Generate").metadata["authorization"] == f"Bearer {gateway.api_key}"


def test_generate_stream_json_and_stdin_prompt(cli):
    code, out, err = cli("generate", "--stream", "one two three")
    assert (code, out) == (0, "one two three\n") and "[stop]" in err

    code, out, _ = cli("generate", "--json", "a b c", "--max-new-tokens", "2")
    result = json.loads(out)
    assert result["text"] == "a b" and result["finish_reason"] == "length"
    assert result["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "cached_tokens": 0}
    assert len(result["token_ids"]) == 2

    code, out, _ = cli("generate", "--stream", "--json", "x y")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["text"] for line in lines[:-1]] == ["x", " y"]
    assert lines[-1]["completion"]["text"] == "x y"

    code, out, _ = cli("generate", "-", stdin="from standard input\n")
    assert (code, out) == (0, "from standard input\n")


def test_connection_options_after_the_command_and_bad_key(cli, gateway, monkeypatch):
    monkeypatch.setenv("LLMSUITE_ADDRESS", "127.0.0.1:1")  # overridden by the flag below
    code, out, _ = cli("generate", "after", "--address", gateway.address)
    assert (code, out) == (0, "after\n")
    code, out, err = cli("--api-key", "wrong", "--address", gateway.address, "models")
    assert code == 1 and out == ""
    assert err == "llmsuite: UNAUTHENTICATED: invalid API key [reason INVALID_API_KEY]\n"


def test_errors_are_one_line_with_usage_exit_code(cli):
    code, out, err = cli("generate", "hi", "--top-p", "1.5")
    assert (code, out) == (2, "")
    assert err == "llmsuite: INVALID_ARGUMENT: sampling.top_p: must be in (0, 1] [reason INVALID_FIELD]\n"
    code, _, err = cli("generate", "hi", "--model", "nope")
    assert code == 1 and err.startswith("llmsuite: NOT_FOUND: ") and err.count("\n") == 1
    code, _, err = cli("generate", "hi", "--max-new-tokens", "-3")  # caught before sending
    assert code == 2 and "sampling.max_new_tokens" in err
    code, _, err = cli("generate", "--bogus-flag", "hi")
    assert code == 2 and "unrecognized arguments" in err
    code, _, err = cli("--cert-file", "c.pem", "models")
    assert code == 2 and "together" in err
    assert cli("--help")[0] == 0


def test_chat_piped_one_line_per_turn(cli, gateway):
    code, out, err = cli("chat", "--system", "terse please", "--max-new-tokens", "8",
                         stdin="hello there\n\nsecond turn here\n/exit\nnever sent\n")
    assert code == 0
    assert out == "hello there\nsecond turn here\n"
    turns = err.strip().splitlines()
    assert turns[0].startswith("turn 0: [stop] prompt_tokens=4 completion_tokens=2 cached_tokens=0")
    assert turns[1].startswith("turn 1: [stop] prompt_tokens=3 completion_tokens=3 cached_tokens=6")
    assert [r.WhichOneof("kind") for r in gateway.app.chat_requests] == ["start", "turn"]
    assert gateway.app.chat_requests[0].start.sampling.max_new_tokens == 8

    code, out, _ = cli("chat", stdin="only at eof")
    assert (code, out) == (0, "only at eof\n")


def test_tokenize_and_models(cli, gateway):
    wid = gateway.word_id
    code, out, _ = cli("tokenize", "hello world", "x")
    assert code == 0 and out.splitlines() == [f"1 {wid('hello')} {wid('world')}", f"1 {wid('x')}"]
    code, out, _ = cli("tokenize", "--offsets", "--no-special-tokens", "ab cd")
    assert out == f"{wid('ab')}@0:2 {wid('cd')}@3:5\n"
    code, out, _ = cli("tokenize", "--json", "--offsets", "ab")
    assert json.loads(out) == {"token_ids": [1, wid("ab")], "truncated": False, "offsets": [[0, 0], [0, 2]]}

    code, out, _ = cli("models")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["NAME", "KIND", "ARCHITECTURE", "CONTEXT", "CHAT", "PROVIDER",
                                              "LAYOUT", "PRECISION", "SLOTS", "QUANTIZATION"]
    assert lines[1].split() == ["tiny", "generation", "llama", "512", "yes", "CPUExecutionProvider", "optimum",
                                "fp32", "-", "none"]
    assert lines[2].split() == ["tiny-gpt2", "generation", "gpt2", "256", "no", "CPUExecutionProvider",
                                "onnxruntime-genai", "int4", "16x256", "MatMulNBits", "int4,", "block", "32"]
    code, out, _ = cli("models", "--json")
    models = json.loads(out)
    assert [m["name"] for m in models] == ["tiny", "tiny-gpt2"]
    assert [(m["layout"], m["precision"], m["quantization"]) for m in models] == [
        ("optimum", "fp32", "none"), ("onnxruntime-genai", "int4", "MatMulNBits int4, block 32")]
    assert [(m["kv_cache_slots"], m["kv_cache_slot_tokens"]) for m in models] == [(0, 0), (16, 256)]


@pytest.fixture
def health_only_server():
    """A server with nothing but grpc.health.v1, like any llmsuite service's probe target."""
    servicer = health.HealthServicer()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def test_health_exit_codes(health_only_server, capsys):
    address, servicer = health_only_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set("llmsuite.tokenizer.v1.TokenizerService", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["health", "--address", address]) == 0
    assert capsys.readouterr().out == "SERVING\n"
    assert main(["--address", address, "health", "--service", "llmsuite.tokenizer.v1.TokenizerService"]) == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"
    assert main(["health", "--address", address, "--service", "no.such.Service"]) == 1
    assert capsys.readouterr().out == "SERVICE_UNKNOWN\n"
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main(["health", "--address", address]) == 1

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    assert main(["health", "--address", closed]) == 1  # never 2: docker reserves it
    err = capsys.readouterr().err
    assert err.startswith("llmsuite: UNAVAILABLE: ") and err.count("\n") == 1
    assert time.monotonic() - started < 5


def _console(*argv: str, env: dict[str, str] | None = None, **kwargs):
    return subprocess.Popen([str(CONSOLE_SCRIPT), *argv], env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason=f"{CONSOLE_SCRIPT} not installed (make setup)")
def test_console_script_generate_health_and_ctrl_c(gateway):
    env = {"LLMSUITE_API_KEY": gateway.api_key}
    proc = _console("generate", "--stream", "over the wire", "--address", gateway.address, env=env)
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out) == (0, "over the wire\n"), err
    proc = _console("health", "--address", gateway.address)
    assert proc.communicate(timeout=30)[0] == "SERVING\n" and proc.returncode == 0

    gateway.app.hold_after_first_token = True  # the stream stays open until the client cancels it
    proc = _console("generate", "--stream", "w " * 100, "--max-new-tokens", "100", "--address", gateway.address,
                    env=env)
    assert proc.stdout is not None
    assert proc.stdout.read(1) == "w"  # streaming has started, and cannot finish on its own
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert gateway.app.cancelled.wait(5), "Ctrl-C did not cancel the stream"
