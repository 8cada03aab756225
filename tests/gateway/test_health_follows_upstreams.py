"""The gateway's health follows its upstreams as they come and go, not a probe period
later: the periodic refresh is set far beyond every wait here, so only the channels'
connectivity state (and failed calls) can move it. Each wait is on a health Watch event."""

from __future__ import annotations

from pathlib import Path

from grpc_health.v1 import health_pb2
from scripted_inference import ScriptedInference, running_gateway
from support import ServerThread, ServiceProcess, free_ports, watch_health

from llmsuite.runtime.tokenizer_hash import tokenizer_content_hash

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
NEVER = 3600.0  # the gateway's refresh interval in these tests


def tokenizer_process(model_dir: Path, port: int) -> ServiceProcess:
    return ServiceProcess(["llmsuite-tokenizer", "--listen", f"127.0.0.1:{port}", "--model", f"tiny={model_dir}",
                           "--metrics-listen", "off"])


def test_a_dead_tokenizer_turns_health_not_serving_and_its_return_serving(tiny_tokenizer_dir: Path):
    (port,) = free_ports(1)
    with ServerThread(ScriptedInference(tokenizer_content_hash(tiny_tokenizer_dir))) as inference, \
            tokenizer_process(tiny_tokenizer_dir, port) as tokenizer, \
            running_gateway(tokenizer.address, [inference.address], refresh_interval_s=NEVER) as gateway:
        watch_health(gateway.address, SERVING)
        tokenizer.kill()
        watch_health(gateway.address, NOT_SERVING)
        watch_health(gateway.address, NOT_SERVING, service="model:tiny")
        with tokenizer_process(tiny_tokenizer_dir, port):  # back on the same address
            watch_health(gateway.address, SERVING)
            watch_health(gateway.address, SERVING, service="model:tiny")


def test_the_last_replica_of_a_model_going_away_turns_its_health_not_serving(tiny_tokenizer_dir: Path):
    with ServerThread(ScriptedInference(tokenizer_content_hash(tiny_tokenizer_dir))) as inference, \
            tokenizer_process(tiny_tokenizer_dir, 0) as tokenizer, \
            running_gateway(tokenizer.address, [inference.address], refresh_interval_s=NEVER) as gateway:
        watch_health(gateway.address, SERVING, service="model:tiny")
        inference.stop()
        watch_health(gateway.address, NOT_SERVING, service="model:tiny")
        watch_health(gateway.address, NOT_SERVING)
