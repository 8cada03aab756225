"""One real cluster for the OpenAI-compatible API tests: tokenizer, inference
and an API-keyed gateway as processes on loopback, and `llmsuite-openai` in
front of it, shared by every test in this folder.

The model is the tiny preset with a long context (8192 positions, still
random weights and ~0.5 M parameters), so a generation can run long enough
for a test to disconnect in the middle of it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from support import ServiceProcess, processes, wait_http_ready

from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc

API_KEY = "main-key"
OTHER_KEY = "other-key"
MODEL = "tiny"
LONG_CONTEXT = 8192


def openai_process(gateway_address: str, *extra: str) -> ServiceProcess:
    # Not waited on through gRPC health: it speaks HTTP (see wait_http_ready).
    return ServiceProcess(["llmsuite-openai", "--listen", "127.0.0.1:0", "--gateway", gateway_address, *extra],
                          wait=False)


@contextlib.contextmanager
def running_openai(gateway_address: str, *extra: str) -> Iterator[str]:
    with processes(openai_process(gateway_address, *extra)) as (proc,):
        yield wait_http_ready(proc)


@dataclass
class Cluster:
    tokenizer: ServiceProcess
    inference: ServiceProcess
    gateway: ServiceProcess
    base_url: str  # the OpenAI API root, e.g. http://127.0.0.1:PORT/v1
    model_dir: Path
    model: str = MODEL
    api_key: str = API_KEY
    other_key: str = OTHER_KEY

    def inference_stats(self) -> inference_pb2.ModelStats:
        with grpc.insecure_channel(self.inference.address) as channel:
            return inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(
                inference_pb2.GetModelInfoRequest(model=MODEL), timeout=10).info.stats

    @contextlib.contextmanager
    def another_gateway(self, *extra: str, keys: bool = True) -> Iterator[ServiceProcess]:
        """A second gateway over the same upstreams, with its own flags (and auth off without `keys`)."""
        with processes(gateway(self.tokenizer, self.inference, *extra, keys=keys)) as (gw,):
            yield gw

    @contextlib.contextmanager
    def own_inference(self) -> Iterator[tuple[ServiceProcess, str]]:
        """An inference replica of its own, with a gateway and an HTTP API in front: a test
        may kill it. Yields the replica and the API root (with /v1)."""
        with processes(upstream("inference", self.model_dir)) as (inf,), \
                processes(gateway(self.tokenizer, inf)) as (gw,), running_openai(gw.address) as base:
            yield inf, f"{base}/v1"

    @staticmethod
    @contextlib.contextmanager
    def openai_process_in_front_of(gateway_address: str, *extra: str) -> Iterator[tuple[ServiceProcess, str]]:
        """Another llmsuite-openai, for tests that signal it; yields it and its base URL."""
        with processes(openai_process(gateway_address, *extra)) as (proc,):
            yield proc, wait_http_ready(proc)

    @staticmethod
    def openai_in_front_of(gateway_address: str, *extra: str) -> contextlib.AbstractContextManager[str]:
        """Another llmsuite-openai; yields its base URL (without /v1)."""
        return running_openai(gateway_address, *extra)

    @staticmethod
    def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> bool:
        """Polls `condition` (an upstream counter reaching a value) until true, bounded."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.02)
        return condition()


@pytest.fixture(scope="package")
def long_context_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmsuite.builder.model import build_model

    out = tmp_path_factory.mktemp("openai-models") / MODEL
    build_model(out, preset="tiny", max_position_embeddings=LONG_CONTEXT)
    return out


def upstream(kind: str, model_dir: Path) -> ServiceProcess:
    argv = [f"llmsuite-{kind}", "--listen", "127.0.0.1:0", "--model", f"{MODEL}={model_dir}"]
    if kind == "inference":
        argv += ["--device", "cpu", "--intra-op-threads", "1"]
    return ServiceProcess(argv)


def gateway(tokenizer: ServiceProcess, inference: ServiceProcess, *extra: str, keys: bool = True) -> ServiceProcess:
    return ServiceProcess(["llmsuite-gateway", "--listen", "127.0.0.1:0", "--tokenizer", tokenizer.address,
                           "--inference", inference.address, "--max-new-tokens", str(LONG_CONTEXT), *extra],
                          env={"LLMSUITE_API_KEYS": f"{API_KEY},{OTHER_KEY}" if keys else ""})


@pytest.fixture(scope="package")
def cluster(long_context_model_dir: Path) -> Iterator[Cluster]:
    tok, inf = upstream("tokenizer", long_context_model_dir), upstream("inference", long_context_model_dir)
    with processes(tok, inf):
        gw = gateway(tok, inf)
        with processes(gw), running_openai(gw.address) as base:
            yield Cluster(tok, inf, gw, f"{base}/v1", long_context_model_dir)

