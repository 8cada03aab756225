"""While models load, the port is bound, health says NOT_SERVING, and every
method (unary and streaming) answers UNAVAILABLE with reason LOADING."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import ServerThread

from llmsuite.client.errors import error_details
from llmsuite.inference.engine import EngineSettings
from llmsuite.inference.service import InferenceApp
from llmsuite.inference.v1 import inference_pb2 as pb
from llmsuite.inference.v1 import inference_pb2_grpc
from llmsuite.runtime.server import start_server


class _GatedInference(InferenceApp):
    def __init__(self, *args, gate: threading.Event, **kwargs):
        super().__init__(*args, **kwargs)
        self._gate = gate

    async def start(self) -> None:
        await asyncio.to_thread(self._gate.wait, 30)
        await super().start()


def test_calls_during_loading_are_unavailable_then_served(tiny_model_dir):
    gate, bound = threading.Event(), []
    app = _GatedInference({"tiny": tiny_model_dir}, EngineSettings(device="cpu", warmup=False), gate=gate)
    with ServerThread(app, start=False) as srv:
        future = asyncio.run_coroutine_threadsafe(start_server(srv.settings, app, on_bound=bound.append), srv.loop)
        try:
            deadline = time.monotonic() + 10
            while not bound and time.monotonic() < deadline:
                time.sleep(0.02)
            with grpc.insecure_channel(f"127.0.0.1:{bound[0]}") as ch:
                stub = inference_pb2_grpc.InferenceServiceStub(ch)
                assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status == \
                    health_pb2.HealthCheckResponse.NOT_SERVING
                for call in (lambda: stub.ListModels(pb.ListModelsRequest()),
                             lambda: list(stub.Generate(iter([pb.GenerateRequest(start=pb.GenerateStart(
                                 model="tiny", prompt_token_ids=[1]))])))):
                    try:
                        call()
                        raise AssertionError("expected UNAVAILABLE while loading")
                    except grpc.RpcError as exc:
                        assert exc.code() == grpc.StatusCode.UNAVAILABLE
                        assert error_details(exc)["reason"] == "LOADING"
        finally:
            gate.set()
        srv.running = future.result(30)
        with srv.channel() as ch:
            assert [m.name for m in inference_pb2_grpc.InferenceServiceStub(ch).ListModels(
                pb.ListModelsRequest()).models] == ["tiny"]
