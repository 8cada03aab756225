"""Where does the inference engine's memory go? Resident size against the KV it reports, in-process.

    python bench/memory_probe.py models/tiny                              # defaults
    python bench/memory_probe.py models/tiny --kv-cache-bytes 64MiB --requests 3000
    python bench/memory_probe.py models/tiny --no-arena                   # one ONNX Runtime option at a time

Loads the engine in this process (no gRPC), runs --requests greedy requests with
--concurrency in flight (prompts uniform over --prompt-tokens, outputs over --output-tokens,
random ids: the prefix cache stores every one and rarely hits), samples this process's RSS
and the engine's reported KV bytes every 0.2 s, and prints the peak RSS, the growth over the
RSS after loading, and that growth as a multiple of the peak reported KV. docs/design.md
("Memory") has the figures this found. The ONNX Runtime options are switched by patching
`onnxruntime.InferenceSession` for this process only, so every session the engine makes
(the model's and the KV-reshaping graphs') gets them. It prints numbers and asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import onnxruntime as ort

from llmsuite.inference.__main__ import byte_size
from llmsuite.inference.engine import EngineSettings, InferenceEngine, SamplingParams
from llmsuite.inference.engine import scheduler as scheduler_module
from llmsuite.inference.engine.memory import resident_bytes

MIB = 1024**2


def patch_sessions(args: argparse.Namespace) -> None:
    if args.shared_arena:
        # kNextPowerOfTwo (0), as the per-session arenas grow; kSameAsRequested (1) is far worse.
        ort.create_and_register_allocator(
            ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
            ort.OrtArenaCfg(0, 0, -1, -1))
    original_init = ort.InferenceSession.__init__
    original_run = ort.InferenceSession.run_with_iobinding
    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def init(self: Any, path_or_bytes: Any, sess_options: Any = None, providers: Any = None,
             provider_options: Any = None, **kwargs: Any) -> None:
        options = sess_options or ort.SessionOptions()
        kv_ops = isinstance(path_or_bytes, bytes)  # the KV-reshaping graphs are built in memory
        options.enable_cpu_mem_arena = not (args.no_arena or (kv_ops and args.no_kv_ops_arena))
        options.enable_mem_pattern = not args.no_mem_pattern
        if args.shared_arena:
            options.add_session_config_entry("session.use_env_allocators", "1")
        original_init(self, path_or_bytes, options, providers, provider_options, **kwargs)

    def run(self: Any, binding: Any, run_options: Any = None) -> Any:
        return original_run(self, binding, shrink)

    ort.InferenceSession.__init__ = init  # type: ignore[method-assign]
    if args.arena_shrinkage:
        ort.InferenceSession.run_with_iobinding = run  # type: ignore[method-assign]
    if args.malloc_trim:
        libc = ctypes.CDLL("libc.so.6")
        original_step = scheduler_module.Scheduler.step

        def step(self: Any) -> bool:
            progressed = original_step(self)
            libc.malloc_trim(0)
            return progressed

        scheduler_module.Scheduler.step = step  # type: ignore[method-assign]


def span(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


async def load(engine: InferenceEngine, args: argparse.Namespace, vocab: int) -> None:
    rng = random.Random(args.seed)
    left = args.requests

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            prompt = [rng.randrange(7, vocab) for _ in range(rng.randint(*args.prompt_tokens))]
            params = SamplingParams(max_new_tokens=rng.randint(*args.output_tokens), temperature=0.0,
                                    ignore_eos=True)
            session = engine.open_session("m", multi_turn=False)
            async for _ in session.generate(prompt, params):
                pass
            session.close()

    await asyncio.gather(*(client() for _ in range(args.concurrency)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="an export directory (e.g. models/tiny)")
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=span, default=(32, 256), metavar="LO-HI")
    parser.add_argument("--output-tokens", type=span, default=(16, 128), metavar="LO-HI")
    parser.add_argument("--kv-cache-bytes", type=byte_size, default="auto")
    parser.add_argument("--no-prefix-cache", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    knobs = parser.add_argument_group("one option at a time")
    knobs.add_argument("--no-arena", action="store_true", help="enable_cpu_mem_arena=False for every session")
    knobs.add_argument("--no-kv-ops-arena", action="store_true", help="... for the KV-reshaping sessions only")
    knobs.add_argument("--no-mem-pattern", action="store_true", help="enable_mem_pattern=False")
    knobs.add_argument("--arena-shrinkage", action="store_true",
                       help="run option memory.enable_memory_arena_shrinkage=cpu:0 on every run")
    knobs.add_argument("--shared-arena", action="store_true",
                       help="one CPU arena for every session (session.use_env_allocators)")
    knobs.add_argument("--malloc-trim", action="store_true", help="glibc malloc_trim(0) after every scheduler step")
    args = parser.parse_args()
    patch_sessions(args)

    settings = EngineSettings(device="cpu", kv_cache_bytes=args.kv_cache_bytes, prefix_cache=not args.no_prefix_cache)
    engine = InferenceEngine.load({"m": args.model}, settings)
    idle = resident_bytes()
    peak_rss, peak_kv = idle, 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_rss, peak_kv
        while not stop.wait(0.2):
            peak_rss = max(peak_rss, resident_bytes())
            peak_kv = max(peak_kv, engine.stats("m").kv_bytes)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    asyncio.run(load(engine, args, engine.model_info("m").vocab_size))
    seconds = time.monotonic() - started
    stop.set()
    sampler.join()
    stats = engine.stats("m")
    growth = peak_rss - idle
    print(f"{' '.join(sys.argv[1:])}: KV budget {stats.kv_budget_bytes / MIB:.0f} MiB, RSS after loading "
          f"{idle / MIB:.0f} MiB, peak {peak_rss / MIB:.0f} MiB (+{growth / MIB:.0f}), peak reported KV "
          f"{peak_kv / MIB:.1f} MiB, growth / KV {growth / max(1, peak_kv):.1f}x, {args.requests} requests in "
          f"{seconds:.0f} s")
    asyncio.run(engine.close())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
