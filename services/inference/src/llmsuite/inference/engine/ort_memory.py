"""What ONNX Runtime keeps alive behind the engine's back, and how the engine stops it.

An OrtValue taken from `IOBinding.get_outputs()` keeps the native binding alive, and the
binding holds every tensor bound to it: all the run's inputs and all its other outputs.
A prefix-cache entry extracted from a batch would then pin the whole batch's past (and
a decode step's cache would pin the previous step's), so held memory grows with every
request while the bytes the engine accounts for stay flat (docs/design.md, "Memory").
Every run therefore goes through `run_detached`, which empties the binding before the
outputs are handed out: each output then keeps only its own tensor.

Each session would also have a CPU arena of its own, and an arena keeps its high-water mark
for good: the model's (a step's past and present) and the KV-reshaping graphs' (a join's or
a compaction's copy of the batch) would each hold a batch-sized peak. `share_cpu_arena` puts
every session of the process on one arena instead, so those peaks, which never coincide,
share memory (measured in docs/design.md, "Memory").
"""

from __future__ import annotations

import threading
from typing import Any

import onnxruntime as ort

# ONNX Runtime's default growth for CPU arenas; kSameAsRequested (1) grew without bound here,
# since a decode step's tensors are one column longer than the freed ones every time.
_NEXT_POWER_OF_TWO = 0
_shared_arena_lock = threading.Lock()
_shared_arena_registered = False


def share_cpu_arena(options: ort.SessionOptions) -> None:
    """Makes a session allocate its CPU tensors from the process's one shared arena."""
    global _shared_arena_registered
    with _shared_arena_lock:
        if not _shared_arena_registered:
            cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, _NEXT_POWER_OF_TWO, -1, -1))
            _shared_arena_registered = True
    options.add_session_config_entry("session.use_env_allocators", "1")


def run_detached(session: ort.InferenceSession, binding: ort.IOBinding,
                 run_options: ort.RunOptions | None = None) -> list[Any]:
    """Runs `binding` and returns its outputs, each holding only its own tensor."""
    session.run_with_iobinding(binding, run_options)
    outputs: list[Any] = binding.get_outputs()
    binding.clear_binding_inputs()
    binding.clear_binding_outputs()
    return outputs
