"""The slot buffer seen from outside, over a real inference server on loopback: GetModelInfo
and ListModels report a fused model's slot count and slot length (none for an Optimum model),
its live stats the free slots, and the metrics the same numbers. Nothing here is timed: a
running request is held mid-generation by gating its decode forward on an event.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from metrics_scrape import scrape, scrape_until
from support import ServerThread

from llmsuite.builder.variants import build_variant
from llmsuite.common.v1 import common_pb2
from llmsuite.inference.engine import EngineSettings
from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.inference.service import InferenceApp
from llmsuite.inference.v1 import inference_pb2 as pb
from llmsuite.inference.v1 import inference_pb2_grpc
from llmsuite.runtime.settings import ServerSettings

# The builder's tiny preset: 2 layers x (key, value) x 2 KV heads x 32 dims x 4 bytes.
BYTES_PER_TOKEN = 1024
SLOT_TOKENS = 64
SLOTS = 3


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    gqa = tmp_path_factory.mktemp("slot-info") / "gqa"
    build_variant(gqa, layout="gqa")
    # Three slots of 64 tokens, and half a slot more that only the prefix cache can use.
    engine = EngineSettings(device="cpu", intra_op_threads=1, max_running=8, max_model_len=SLOT_TOKENS,
                            kv_cache_bytes=(SLOTS * SLOT_TOKENS + SLOT_TOKENS // 2) * BYTES_PER_TOKEN)
    settings = ServerSettings(listen="127.0.0.1:0", grace_period_s=1.0, log_format="text",
                              metrics_listen="127.0.0.1:0")
    with ServerThread(InferenceApp({"gqa": gqa, "tiny": tiny_model_dir}, engine), settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def stub(server: ServerThread) -> Iterator[Any]:
    with server.channel() as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def info(stub: Any, model: str) -> pb.ModelInfo:
    return stub.GetModelInfo(pb.GetModelInfoRequest(model=model)).info


def test_model_info_reports_the_slots_of_a_fused_model_and_none_for_an_optimum_one(stub: Any) -> None:
    gqa, tiny = info(stub, "gqa"), info(stub, "tiny")
    # Warm-up ran through the buffer and left every slot free.
    assert (gqa.kv_cache_slots, gqa.kv_cache_slot_tokens, gqa.stats.kv_cache_free_slots) == (SLOTS, SLOT_TOKENS,
                                                                                            SLOTS)
    assert gqa.stats.kv_cache_bytes == SLOTS * SLOT_TOKENS * BYTES_PER_TOKEN  # the buffer the numbers describe
    assert (tiny.layout, tiny.kv_cache_slots, tiny.kv_cache_slot_tokens, tiny.stats.kv_cache_free_slots) == (
        "optimum", 0, 0, 0)
    listed = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert (listed["gqa"].kv_cache_slots, listed["gqa"].kv_cache_slot_tokens) == (SLOTS, SLOT_TOKENS)
    assert (listed["tiny"].kv_cache_slots, listed["tiny"].kv_cache_slot_tokens) == (0, 0)


class DecodeGate:
    """Lets the first in-place forward (a prefill) through, then holds every later one until opened."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = threading.Event()
        self._passed = 0
        gate, run_in_place = self, OnnxDecoder.run_in_place

        def gated(decoder: OnnxDecoder, *args: Any) -> Any:
            if gate._passed >= 1:
                gate.opened.wait(timeout=120)
            gate._passed += 1
            return run_in_place(decoder, *args)

        monkeypatch.setattr(OnnxDecoder, "run_in_place", gated)


def test_a_running_request_holds_a_slot_and_the_metrics_say_so(server: ServerThread, stub: Any,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    port = server.running.metrics_port
    idle = scrape(port)
    assert idle.value("llmsuite_inference_kv_cache_slots", model="gqa") == SLOTS
    assert idle.value("llmsuite_inference_kv_cache_slot_tokens", model="gqa") == SLOT_TOKENS
    assert idle.value("llmsuite_inference_kv_cache_free_slots", model="gqa") == SLOTS
    for name in ("slots", "slot_tokens", "free_slots"):  # a padded-layout model has no slots: no sample
        assert idle.value(f"llmsuite_inference_kv_cache_{name}", model="tiny") is None

    gate = DecodeGate(monkeypatch)
    sampling = common_pb2.SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    call = stub.Generate(iter([pb.GenerateRequest(start=pb.GenerateStart(
        model="gqa", prompt_token_ids=[5, 6, 7, 8, 9], sampling=sampling))]))
    try:
        first = next(call)  # sampled from the prefill; the next decode forward waits at the gate
        assert first.WhichOneof("kind") == "tokens"
        running = info(stub, "gqa").stats
        assert (running.running, running.kv_cache_free_slots) == (1, SLOTS - 1)
        held = scrape(port)
        assert held.value("llmsuite_inference_kv_cache_free_slots", model="gqa") == SLOTS - 1
        assert held.value("llmsuite_inference_kv_cache_slots", model="gqa") == SLOTS
    except BaseException:
        call.cancel()
        raise
    finally:
        gate.opened.set()
    finals = [r.final for r in call if r.WhichOneof("kind") == "final"]
    assert [f.finish_reason for f in finals] == [common_pb2.FINISH_REASON_LENGTH]
    freed = scrape_until(port, lambda s: s.value("llmsuite_inference_kv_cache_free_slots", model="gqa") == SLOTS)
    assert freed.value("llmsuite_inference_kv_cache_free_slots", model="gqa") == SLOTS
    assert info(stub, "gqa").stats.kv_cache_free_slots == SLOTS

