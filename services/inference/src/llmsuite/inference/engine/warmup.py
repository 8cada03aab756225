"""The forwards warm-up runs: the path each model is served by.

ONNX Runtime allocates and tunes on a session's first runs of each shape, and the prefill
estimate (prefill_estimate.py) times prefills to refuse hopeless deadlines. Both are only
worth something through the forwards requests will run: a padded-layout model's
`OnnxDecoder.forward` from an empty cache, and a slot-buffer model's `SlotForwards`, which
bind the preallocated buffer as past and present (a different IOBinding, a different KV
shape, and GroupQueryAttention's in-place path).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.inference.engine.prefill_estimate import WarmupForwards
from llmsuite.inference.engine.slot_forwards import SlotForwards
from llmsuite.inference.engine.slot_kv import SlotKvBuffer


class PaddedWarmup:
    """Forwards of the padded path, each from an empty cache; their KV is dropped after."""

    def __init__(self, decoder: OnnxDecoder) -> None:
        self._decoder = decoder
        self.vocab_size = decoder.signature.vocab_size
        self.context_length = decoder.context_length

    def prefill(self, ids: Sequence[int]) -> None:
        self._decoder.forward(ids, self._decoder.empty_cache())

    def prefill_and_decode(self, ids: Sequence[int]) -> None:
        first = self._decoder.forward(ids, self._decoder.empty_cache())
        self._decoder.forward([0], first.cache)


class SlotWarmup:
    """Forwards into a free slot of the buffer the model is served from, through SlotForwards;
    the slot is freed after each, so the buffer is left as it was found (every slot free,
    length 0: a row's first prefill writes its slot from column 0, so nothing left there is read)."""

    def __init__(self, decoder: OnnxDecoder, buffer: SlotKvBuffer) -> None:
        self._buffer = buffer
        self._forwards = SlotForwards(decoder, buffer)
        self.vocab_size = decoder.signature.vocab_size
        self.context_length = buffer.max_length

    def prefill(self, ids: Sequence[int]) -> None:
        with self._slot() as slot:
            self._forwards.prefill([(slot, ids)])

    def prefill_and_decode(self, ids: Sequence[int]) -> None:
        with self._slot() as slot:
            self._forwards.prefill([(slot, ids)])
            self._forwards.decode([(slot, 0)])

    @contextmanager
    def _slot(self) -> Iterator[int]:
        slot = self._buffer.take()
        try:
            yield slot
        finally:
            self._buffer.release(slot)


def served_forwards(decoder: OnnxDecoder, buffer: SlotKvBuffer | None) -> WarmupForwards:
    """The warm-up forwards of a model served from `buffer`, or through the padded path when None."""
    return SlotWarmup(decoder, buffer) if buffer is not None else PaddedWarmup(decoder)
