"""KV memory: the bytes the engine reports are the KV tensors alive in the process, and the
process's memory stays within the budget however many requests of however many lengths ran.

Both run a real ONNX Runtime session on the tiny model in-process, with no timing: the RSS
bound is a sum the engine must keep to, measured after the work, not a speed.
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import onnxruntime as ort
import pytest

from llmsuite.builder.variants import build_variant
from llmsuite.inference.engine import InferenceEngine, SamplingParams
from llmsuite.inference.engine.memory import MemoryGuard, MemoryLimits, automatic_kv_budget, resident_bytes
from llmsuite.inference.engine.onnx_model import tensor_nbytes
from llmsuite.inference.engine.types import EngineSettings, StepReport
from llmsuite.runtime.errors import ResourceExhausted

MIB = 1024**2
# Tiny Llama KV is 1 KiB per token: 8 MiB holds about 8,000 tokens, a fraction of what the
# workload below produces, so the prefix cache evicts all the time.
BUDGET = 8 * MIB
# ONNX Runtime's arena (its high-water mark and fragmentation), the interpreter and the logits
# on top of the KV budget, which holds a step's copy of the running rows' KV too: before that
# copy was reserved the run grew by 34 MiB in all (57 MiB with an arena per session). Before
# every output was detached from its IOBinding (ort_memory.py), each cached entry kept a whole
# batch's past alive and the same run grew by about 171 MiB.
MARGIN = 80 * MIB


def live_kv_tensors() -> dict[int, int]:
    """Every OrtValue tensor alive in this process, by data address: its bytes."""
    found: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, ort.OrtValue) and obj.is_tensor():
            size = tensor_nbytes(obj)
            if size:
                found[obj.data_ptr()] = size
    return found


def workload(vocab: int, count: int, seed: int) -> list[tuple[list[int], int]]:
    """Prompts of 16-300 ids (a third continue one of a few shared prefixes, so cached prefixes
    are hit whole and in part) with 1-30 new tokens each."""
    rng = random.Random(seed)
    shared = [[rng.randrange(7, vocab) for _ in range(64)] for _ in range(4)]
    requests = []
    for _ in range(count):
        length = rng.randint(16, 300)
        head = rng.choice(shared)[:rng.randint(16, 64)] if rng.random() < 1 / 3 else []
        prompt = head + [rng.randrange(7, vocab) for _ in range(max(1, length - len(head)))]
        requests.append((prompt, rng.randint(1, 30)))
    return requests


async def run_all(engine: InferenceEngine, requests: list[tuple[list[int], int]], concurrency: int) -> int:
    queue = list(reversed(requests))
    generated = 0

    async def client() -> None:
        nonlocal generated
        while queue:
            prompt, new_tokens = queue.pop()
            session = engine.open_session("tiny", multi_turn=False)
            params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
            async for item in session.generate(prompt, params):
                generated += not hasattr(item, "finish_reason")
            session.close()

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return generated


def measure_workload(model_dir: Path, max_model_len: int = 0) -> dict[str, Any]:
    """Runs the workload on a fresh engine; what the test asserts, as JSON-able values.

    Called in a child interpreter (see the test below), so the resident size it starts
    from is a process that has loaded nothing else: in the suite's own process, earlier
    tests' heaps and thread arenas made the same growth read 57-96 MiB from run to run.
    """
    mismatches: list[str] = []
    checked = 0
    lock = threading.Lock()
    engine: InferenceEngine | None = None

    def compare_after_step(report: StepReport) -> None:
        # On the worker thread between steps every KV tensor is held by the scheduler's own
        # structures (no forward's locals), so the enumeration must match exactly.
        nonlocal checked
        assert engine is not None
        stats = engine.stats("tiny")
        if stats.steps % 16:
            return
        live = sum(live_kv_tensors().values())
        with lock:
            checked += 1
            if live != stats.kv_bytes:
                mismatches.append(f"step {stats.steps}: {live} bytes of KV alive, {stats.kv_bytes} reported")

    before = resident_bytes()
    settings = EngineSettings(device="cpu", intra_op_threads=1, kv_cache_bytes=BUDGET, max_running=16,
                              max_model_len=max_model_len)
    engine = InferenceEngine.load({"tiny": model_dir}, settings, step_observer=compare_after_step)
    try:
        requests = workload(engine.model_info("tiny").vocab_size, count=200, seed=7)
        generated = asyncio.run(run_all(engine, requests, concurrency=16))
        grown = resident_bytes() - before
        stats = engine.stats("tiny")
        return {
            "generated": generated, "expected_tokens": sum(n for _, n in requests), "requests": len(requests),
            "completed": stats.completed, "evictions": stats.prefix_cache_evictions,
            "hit_tokens": stats.prefix_cache_hit_tokens, "kv_bytes": stats.kv_bytes,
            "live_kv_bytes": sum(live_kv_tensors().values()), "checked": checked, "mismatches": mismatches[:5],
            "grown": grown,
        }
    finally:
        asyncio.run(engine.close())


@pytest.fixture(scope="module")
def tiny_gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-gqa") / "gqa"
    build_variant(out, layout="gqa")
    return out


# The fused layout's slot buffer is preallocated: 16 slots of 336 tokens (the workload's longest
# request) take 5.25 MiB of the budget at load, and the prefix cache gets the rest.
@pytest.mark.parametrize("layout", ["optimum", "gqa-slots"])
def test_memory_stays_within_the_kv_budget_and_every_live_kv_tensor_is_counted(
        layout: str, tiny_llama_dir: Path, tiny_gqa_dir: Path) -> None:
    model, max_model_len = (tiny_llama_dir, 0) if layout == "optimum" else (tiny_gqa_dir, 336)
    child = subprocess.run([sys.executable, __file__, str(model), str(max_model_len)], capture_output=True,
                           text=True, timeout=600, check=False)
    assert child.returncode == 0, f"the workload failed (exit {child.returncode}):\n{child.stderr[-4000:]}"
    result = json.loads(child.stdout.strip().splitlines()[-1])
    assert result["generated"] == result["expected_tokens"] and result["completed"] == result["requests"]
    assert result["evictions"] > 0, "the budget must have been reached for this to mean anything"
    assert result["hit_tokens"] > 0
    assert 0 < result["kv_bytes"] <= BUDGET
    assert result["live_kv_bytes"] == result["kv_bytes"]
    assert result["checked"] >= 5 and not result["mismatches"], result["mismatches"]
    grown = result["grown"]
    assert grown <= BUDGET + MARGIN, f"resident memory grew {grown / MIB:.1f} MiB with a {BUDGET / MIB:.0f} MiB budget"


def test_the_memory_guard_refuses_with_retry_info_before_the_limit(load_engine: Any, tiny_llama_dir: Path) -> None:
    # Far below what the process holds: the guard is asked at admission only (loading never
    # consults it). A limit near the RSS read before loading made the test depend on how RSS
    # moved during the load: garbage from earlier tests' engines freed then can shrink it by more
    # than any small margin (a full-suite run saw the request fit 16 MiB below the RSS before load).
    limit = 32 * MIB
    assert resident_bytes() > 2 * limit  # numpy and onnxruntime alone hold more
    engine = load_engine({"tiny": tiny_llama_dir}, kv_cache_bytes=MIB, max_memory_bytes=limit)

    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=False)
        with pytest.raises(ResourceExhausted) as refused:
            async for _ in session.generate(list(range(10, 110)), SamplingParams(max_new_tokens=100)):
                pass
        assert refused.value.reason == "MEMORY_PRESSURE" and refused.value.retry_after_s > 0
        assert refused.value.metadata["max_memory_bytes"] == str(limit)
        session.close()

    asyncio.run(scenario())


def test_max_memory_off_admits_what_the_kv_budget_admits(load_engine: Any, tiny_llama_dir: Path) -> None:
    engine = load_engine({"tiny": tiny_llama_dir}, kv_cache_bytes=MIB, max_memory_bytes=0)

    async def scenario() -> None:
        session = engine.open_session("tiny", multi_turn=False)
        async for _ in session.generate(list(range(10, 110)), SamplingParams(max_new_tokens=4)):
            pass
        session.close()

    asyncio.run(scenario())
    assert engine.stats("tiny").completed == 1


def test_the_guard_counts_what_running_requests_may_still_grow_by() -> None:
    guard = MemoryGuard(limit_bytes=resident_bytes() + 100 * MIB, refresh_s=0.0)
    guard.admit("m", reservation_bytes=10 * MIB, growth_to_come_bytes=10 * MIB)
    with pytest.raises(ResourceExhausted):
        guard.admit("m", reservation_bytes=10 * MIB, growth_to_come_bytes=95 * MIB)
    assert guard.refused == 1


def test_the_automatic_budget_follows_the_tightest_limit_after_weights_and_reserve() -> None:
    host = MemoryLimits(host_bytes=24 * 1024 * MIB, cgroup_bytes=None, address_space_bytes=None)
    shared = automatic_kv_budget(on_gpu=False, limits=host, max_memory_bytes=None, weights=1024 * MIB,
                                 gpu_free_bytes=None)
    assert (shared.basis, shared.budget_bytes) == ("host memory", int((24 * 1024 - 1024 - 512) * MIB * 0.25))

    capped = MemoryLimits(host_bytes=24 * 1024 * MIB, cgroup_bytes=8 * 1024 * MIB, address_space_bytes=4 * 1024 * MIB)
    own = automatic_kv_budget(on_gpu=False, limits=capped, max_memory_bytes=None, weights=1024 * MIB,
                              gpu_free_bytes=None)
    assert (own.basis, own.budget_bytes) == ("RLIMIT_AS", int((4 * 1024 - 1024 - 512) * MIB * 0.5))
    explicit = automatic_kv_budget(on_gpu=False, limits=capped, max_memory_bytes=2 * 1024 * MIB, weights=1024 * MIB,
                                   gpu_free_bytes=None)
    assert (explicit.basis, explicit.budget_bytes) == ("--max-memory", int(512 * MIB * 0.5))

    with pytest.raises(ValueError, match="leaves no room"):
        automatic_kv_budget(on_gpu=False, limits=capped, max_memory_bytes=1024 * MIB, weights=1024 * MIB,
                            gpu_free_bytes=None)
    gpu = automatic_kv_budget(on_gpu=True, limits=host, max_memory_bytes=None, weights=1024 * MIB,
                              gpu_free_bytes=10 * 1024 * MIB)
    assert gpu.budget_bytes == 5 * 1024 * MIB


if __name__ == "__main__":
    print(json.dumps(measure_workload(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)))
