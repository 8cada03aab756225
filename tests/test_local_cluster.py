"""`make run`'s launcher and docker-compose's services, run as local processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import grpc
from compose_local import compose_services_as_local_processes
from support import REPO, ServiceProcess, processes

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def streamed_text(address: str) -> tuple[str, int]:
    with grpc.insecure_channel(address) as ch:
        responses = list(gateway_pb2_grpc.GatewayServiceStub(ch).GenerateStream(pb.GenerateStreamRequest(
            model="tiny", prompt="Hello", sampling=common_pb2.SamplingParams(max_new_tokens=8, temperature=0)),
            timeout=60))
    text = "".join(r.delta.text for r in responses if r.WhichOneof("kind") == "delta")
    return text, responses[-1].final.usage.completion_tokens


def test_compose_services_run_as_local_processes_and_stream(tiny_model_dir):
    gw, tok, inf = free_ports(3)
    specs = compose_services_as_local_processes(REPO / "docker-compose.yml", {50050: gw, 50051: tok, 50052: inf},
                                                tiny_model_dir)
    assert [s.name for s in specs][-1] == "gateway"
    clean_env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSUITE_")}
    started = [ServiceProcess(s.argv, env={**clean_env, **s.env}) for s in specs]
    with processes(*started):
        _, completion = streamed_text(f"127.0.0.1:{gw}")
        assert completion == 8


def test_make_run_launcher_serves_and_stops_gracefully_on_ctrl_c(tiny_model_dir):
    gw, tok, inf = free_ports(3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmsuite.cluster", "--model", f"tiny={tiny_model_dir}", "--device", "cpu",
         "--gateway-port", str(gw), "--tokenizer-port", str(tok), "--inference-port", str(inf)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        banner = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            banner.append(line)
            if "Ctrl-C stops all three" in line or not line:
                break
        out = "".join(banner)
        assert "llmsuite is up" in out, out
        assert 'llmsuite generate --stream "Hello"' in out
        _, completion = streamed_text(f"127.0.0.1:{gw}")
        assert completion == 8
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0
        with socket.socket() as s:  # every child is gone: the gateway port is free again
            s.bind(("127.0.0.1", gw))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
