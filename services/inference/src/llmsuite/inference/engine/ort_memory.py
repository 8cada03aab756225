"""What ONNX Runtime keeps alive behind the engine's back, and how the engine stops it.

An OrtValue taken from `IOBinding.get_outputs()` keeps the native binding alive, and the
binding holds every tensor bound to it: all the run's inputs and all its other outputs.
A prefix-cache entry extracted from a batch would then pin the whole batch's past (and
a decode step's cache would pin the previous step's), so held memory grows with every
request while the bytes the engine accounts for stay flat (docs/design.md, "Memory").
Every run therefore goes through `run_detached`, which empties the binding before the
outputs are handed out: each output then keeps only its own tensor.
"""

from __future__ import annotations

from typing import Any

import onnxruntime as ort


def run_detached(session: ort.InferenceSession, binding: ort.IOBinding,
                 run_options: ort.RunOptions | None = None) -> list[Any]:
    """Runs `binding` and returns its outputs, each holding only its own tensor."""
    session.run_with_iobinding(binding, run_options)
    outputs: list[Any] = binding.get_outputs()
    binding.clear_binding_inputs()
    binding.clear_binding_outputs()
    return outputs
