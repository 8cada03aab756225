"""The slot KV layout (fused exports sharing past and present): `KvExecutor` over a SlotKvBuffer.

A row takes a slot at its first prefill forward and frees it when it leaves; the buffer is
preallocated, so what the rows hold is the buffer itself, whatever their number and lengths,
and a row joining, leaving or failing never touches another row's KV. Every decode step is
one forward over all decoding rows, whatever their lengths (slot_forwards.py); fresh prompts
of different lengths share a prefill forward, right-padded, when their slots are consecutive
(a group takes the lowest run of free slots that fits it).

A cached prefix is copied into the row's slot before its first chunk, and a kept row's
tokens are copied out of its slot as it leaves: both only that sequence's tokens, on the
device (slot_kv.py). Those copies are one-row `KvCache`s, the prefix cache's entries.

The scheduler runs the engine with at most `buffer.slots` rows admitted (engine.py sets the
model's max_running to the slot count), so a row always finds a free slot.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic

import numpy as np

from llmsuite.inference.engine.executor import DecodeOutcome, KvReleaseFailed, PrefillWork, RowKey, StoredKv
from llmsuite.inference.engine.onnx_model import KvCache, OnnxDecoder
from llmsuite.inference.engine.slot_forwards import SlotForwards
from llmsuite.inference.engine.slot_kv import SlotKvBuffer


class SlotExecutor(Generic[RowKey]):
    """`KvExecutor` for the slot layout; see the module docstring."""

    # Fresh prompts of different lengths may share one prefill forward (right-padded).
    mixes_prompt_lengths = True

    def __init__(self, decoder: OnnxDecoder, buffer: SlotKvBuffer) -> None:
        self._decoder = decoder
        self._buffer = buffer
        self._forwards = SlotForwards(decoder, buffer)
        # Guards the row -> slot map against `held_tokens` readers on other threads.
        self._lock = threading.Lock()
        self._slots: dict[RowKey, int] = {}
        self._decoding: set[RowKey] = set()

    @property
    def buffer(self) -> SlotKvBuffer:
        return self._buffer

    def reservation_bytes(self, reserved_tokens: Sequence[int]) -> int:
        """A slot per row, whatever the row needs (a slot reserves max_length tokens). Those
        bytes are already held by the preallocated buffer, and no step copies them: for the
        budget, the rows never need more than the buffer that `held` reports."""
        return len(reserved_tokens) * self._buffer.slot_bytes

    # ---- forwards -------------------------------------------------------------------

    def prefill(self, work: PrefillWork[RowKey]) -> np.ndarray:
        with self._lock:
            new = [row for row in work.rows if row not in self._slots]
            for row, slot in zip(new, self._buffer.take_run(len(new)), strict=True):
                self._slots[row] = slot
            slots = [self._slots[row] for row in work.rows]
        if work.start is not None:
            cached = work.start.kv
            assert isinstance(cached, KvCache), "a prefix stored by another layout"
            self._buffer.write(slots[0], cached, work.start.length)
        return self._forwards.prefill(list(zip(slots, work.tokens, strict=True)))

    def start_decoding(self, rows: Sequence[RowKey]) -> None:
        with self._lock:
            missing = [row for row in rows if row not in self._slots]
            if missing:
                raise ValueError(f"{len(missing)} row(s) to decode hold no slot")
            self._decoding.update(rows)

    def decode(self, rows: Sequence[RowKey], last_tokens: Sequence[int]) -> Iterator[DecodeOutcome[RowKey]]:
        with self._lock:
            slots = [self._slots[row] for row in rows]
        try:
            logits = self._forwards.decode(list(zip(slots, last_tokens, strict=True)))
        except Exception as exc:
            self.discard(rows)
            yield DecodeOutcome(list(rows), error=exc)
            return
        yield DecodeOutcome(list(rows), logits=logits)

    # ---- rows leaving ---------------------------------------------------------------

    def release(self, rows: Sequence[RowKey], keep: Sequence[RowKey]) -> dict[RowKey, StoredKv | None]:
        keeping = set(keep)
        kept: dict[RowKey, StoredKv | None] = {}
        try:
            for row in rows:
                slot = self._slots.get(row)
                held = self._buffer.lengths[slot] if slot is not None else 0
                kept[row] = self._buffer.read(slot) if slot is not None and row in keeping and held else None
        except Exception as exc:
            self.discard(rows)
            raise KvReleaseFailed([], exc) from exc  # slots are independent: no other row is touched
        self.discard(rows)
        return kept

    def discard(self, rows: Iterable[RowKey]) -> None:
        with self._lock:
            for row in rows:
                slot = self._slots.pop(row, None)
                self._decoding.discard(row)
                if slot is not None:
                    self._buffer.release(slot)

    def clear(self) -> None:
        self.discard(list(self._slots))

    # ---- checks and accounting ------------------------------------------------------

    def probe(self) -> None:
        # Outside the buffer: whatever state the failed step left the slots in, this checks the model.
        self._decoder.forward([0], self._decoder.empty_cache())

    def held(self) -> list[StoredKv]:
        return [self._buffer]

    def held_tokens(self) -> int:
        with self._lock:
            return sum(self._buffer.lengths[slot] for slot in self._slots.values())

    def free_slots(self) -> int:
        """Slots no row holds (thread-safe, as `held_tokens`)."""
        with self._lock:
            return self._buffer.free_slots
