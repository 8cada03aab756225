"""Fixtures for the inference engine tests: tiny models built offline, engines, turn helpers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from llmsuite.builder.model import build_model
from llmsuite.inference.engine import (
    EngineSettings,
    GeneratedToken,
    GenerationSession,
    InferenceEngine,
    SamplingParams,
    TurnResult,
)
from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.inference.engine.types import StepReport

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-style (RoPE, position_ids, GQA 4 heads / 2 KV heads), context 512."""
    out = tmp_path_factory.mktemp("tiny-llama")
    build_model(out, preset="tiny", arch="llama", seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GPT-2-style (learned positions from the mask, MHA, no position_ids input)."""
    out = tmp_path_factory.mktemp("tiny-gpt2")
    build_model(out, preset="tiny", arch="gpt2", seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_fp16_kv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-llama-fp16kv")
    build_model(out, preset="tiny", arch="llama", seed=0, kv_dtype="float16")
    return out


@pytest.fixture(scope="session")
def short_context_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Context of 32 tokens, to reach the limit quickly."""
    out = tmp_path_factory.mktemp("tiny-llama-ctx32")
    build_model(out, preset="tiny", arch="llama", seed=0, max_position_embeddings=32)
    return out


@pytest.fixture(scope="session")
def cpu_settings() -> EngineSettings:
    return EngineSettings(device="cpu", intra_op_threads=1)


@pytest.fixture(scope="session")
def llama_decoder(tiny_llama_dir: Path, cpu_settings: EngineSettings) -> OnnxDecoder:
    return OnnxDecoder.load(tiny_llama_dir, cpu_settings)


@pytest.fixture
def load_engine(cpu_settings: EngineSettings) -> Iterator[Callable[..., InferenceEngine]]:
    """load_engine({"name": dir}, **settings) -> a CPU engine, closed after the test."""
    engines: list[InferenceEngine] = []

    def load(models: Mapping[str, Path], *, step_observer: Any = None, **settings: Any) -> InferenceEngine:
        fields = {"device": "cpu", "intra_op_threads": 1, **settings}
        engine = InferenceEngine.load(models, EngineSettings(**fields), step_observer=step_observer)
        engines.append(engine)
        return engine

    yield load
    for engine in engines:
        asyncio.run(engine.close())


async def run_turn(session: GenerationSession, token_ids: Sequence[int], params: SamplingParams = GREEDY,
                   **kwargs: Any) -> tuple[list[GeneratedToken], TurnResult]:
    """Consumes one turn; checks the stream shape (tokens, then exactly one TurnResult)."""
    tokens: list[GeneratedToken] = []
    result: TurnResult | None = None
    async for item in session.generate(token_ids, params, **kwargs):
        assert result is None, "nothing may follow the TurnResult"
        if isinstance(item, TurnResult):
            result = item
        else:
            tokens.append(item)
    assert result is not None, "every stream ends with a TurnResult"
    assert result.usage.completion_tokens == len(tokens)
    return tokens, result


async def generate_once(engine: InferenceEngine, model: str, token_ids: Sequence[int],
                        params: SamplingParams = GREEDY, **kwargs: Any) -> tuple[list[int], TurnResult]:
    """A single-turn request, as the servicer runs one: open, generate, close."""
    session = engine.open_session(model, multi_turn=False)
    try:
        tokens, result = await run_turn(session, token_ids, params, **kwargs)
    finally:
        await session.aclose()
    return [t.token_id for t in tokens], result


def slow_forward(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Makes every model forward (prefill or batched decode, padded or in a slot buffer) take
    at least `seconds`, so timing-dependent tests are deterministic."""
    for name in ("run", "run_in_place"):
        original = getattr(OnnxDecoder, name)

        def slowed(self: OnnxDecoder, *args: Any, _original: Any = original) -> Any:
            time.sleep(seconds)
            return _original(self, *args)

        monkeypatch.setattr(OnnxDecoder, name, slowed)


def gate_forwards(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Holds every model forward (padded or in a slot buffer) until the returned event is set:
    a test sets it once all its requests are in the engine, so a busy machine cannot let the
    first one finish before the last is submitted."""
    gate = threading.Event()
    for name in ("run", "run_in_place"):
        original = getattr(OnnxDecoder, name)

        def gated(self: OnnxDecoder, *args: Any, _original: Any = original) -> Any:
            gate.wait(timeout=60)
            return _original(self, *args)

        monkeypatch.setattr(OnnxDecoder, name, gated)
    return gate


class StepLog:
    """A step observer: records what every scheduler step did (called on the worker thread)."""

    def __init__(self) -> None:
        self.reports: list[StepReport] = []
        self._lock = threading.Lock()

    def __call__(self, report: StepReport) -> None:
        with self._lock:
            self.reports.append(report)

    @property
    def most_rows(self) -> int:
        with self._lock:
            return max((r.decode_rows for r in self.reports), default=0)

    def decodes(self) -> list[tuple[int, int]]:
        """(rows, forwards) of every step that decoded."""
        with self._lock:
            return [(r.decode_rows, r.decode_forwards) for r in self.reports if r.decode_forwards]


async def wait_until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    give_up = time.monotonic() + within_s
    while not condition():
        if time.monotonic() > give_up:
            raise AssertionError(f"condition not reached within {within_s}s")
        await asyncio.sleep(0.01)


@pytest.fixture
def helpers() -> Any:
    """The module-level helpers above, for test modules (conftest is not importable by name)."""

    class Helpers:
        run_turn = staticmethod(run_turn)
        generate_once = staticmethod(generate_once)
        slow_forward = staticmethod(slow_forward)
        gate_forwards = staticmethod(gate_forwards)
        StepLog = StepLog
        wait_until = staticmethod(wait_until)
        GREEDY = GREEDY

    return Helpers
