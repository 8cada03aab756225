"""Forwards of a fused (GroupQueryAttention) export over its slot buffer (slot_kv.py).

GroupQueryAttention takes each row's length from attention_mask (`seqlens_k` = ones - 1) and
reads the KV right-padded, so rows of different lengths decode together: row r's mask has
`lengths[r] + 1` leading ones, its new key/value lands in column `lengths[r]` of its slot
and its rotary position is its own length. onnxruntime's CPU kernel
(`group_query_attention_helper.h`, `gqa_attention_base.h`) accepts three shapes of call,
and these forwards use each where it fits:

* decode, one new token per row, any mix of lengths: ONE forward over the slots from the
  lowest to the highest decoding one. The op's batch is the bound view's first axis, so
  slots in between that are not decoding ride along with a placeholder token written at
  their own length (a column nobody reads before it is written again: a free slot's first,
  a prefilling row's next), and their logits are dropped;
* a first prompt (`sequence_length == total_sequence_length`): several fresh prompts of
  different lengths in consecutive slots share one right-padded forward (the padding's
  keys land beyond each row's length, where its decode overwrites them before reading);
* a continuation of more than one token (a prompt chunk after a cached prefix or an
  earlier chunk): one row per forward, which is all the kernel accepts.

Only the logits come back to the host; the KV never moves.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llmsuite.inference.engine.onnx_model import OnnxDecoder
from llmsuite.inference.engine.slot_kv import SlotKvBuffer

# Fed at the positions of slots that ride along in a decode forward without decoding.
_PLACEHOLDER_TOKEN = 0


class SlotForwards:
    """Prefill and decode of rows held in a SlotKvBuffer; call from one thread at a time."""

    def __init__(self, decoder: OnnxDecoder, buffer: SlotKvBuffer) -> None:
        self.decoder = decoder
        self.buffer = buffer
        sig = decoder.signature
        self._ids_dtype = sig.input_ids_dtype
        self._mask_dtype = sig.attention_mask_dtype

    def prefill(self, rows: Sequence[tuple[int, Sequence[int]]]) -> np.ndarray:
        """Feeds each (slot, ids) after what its slot holds; returns the logits of each row's
        last id, [rows, vocab], in the order given. Fresh rows in consecutive slots share a
        forward; every other row gets its own."""
        logits: list[np.ndarray | None] = [None] * len(rows)
        lengths = self.buffer.lengths
        for slot, ids in rows:
            if not ids:
                raise ValueError(f"slot {slot}: nothing to prefill")
            if lengths[slot] + len(ids) > self.buffer.max_length:
                raise ValueError(f"slot {slot} holds {lengths[slot]} tokens; {len(ids)} more would pass its "
                                 f"{self.buffer.max_length}")
        fresh = {slot: index for index, (slot, _) in enumerate(rows) if lengths[slot] == 0}
        if len(fresh) != sum(1 for slot, _ in rows if lengths[slot] == 0):
            raise ValueError("a slot appears twice in one prefill")
        for first, count in self.buffer.spans(list(fresh)):
            indices = [fresh[slot] for slot in range(first, first + count)]
            prompts = [rows[i][1] for i in indices]
            for i, row_logits in zip(indices, self._first_prompts(first, prompts), strict=True):
                logits[i] = row_logits
        for index, (slot, ids) in enumerate(rows):
            if logits[index] is None:
                logits[index] = self._continue(slot, ids)
        return np.stack([row for row in logits if row is not None])

    def decode(self, rows: Sequence[tuple[int, int]]) -> np.ndarray:
        """Feeds one token to each (slot, token) in one forward; returns logits [rows, vocab]
        in the order given."""
        if not rows:
            raise ValueError("nothing to decode")
        slots = [slot for slot, _ in rows]
        first, last = min(slots), max(slots)
        count = last - first + 1
        if len(set(slots)) != len(slots):
            raise ValueError("a slot appears twice in one decode")
        held = np.asarray(self.buffer.lengths[first:last + 1], dtype=np.int64)
        if int(held.max()) >= self.buffer.max_length:
            raise ValueError(f"a slot is full ({self.buffer.max_length} tokens)")
        input_ids = np.full((count, 1), _PLACEHOLDER_TOKEN, dtype=self._ids_dtype)
        for slot, token in rows:
            input_ids[slot - first, 0] = token
        width = int(held.max()) + 1
        mask = (np.arange(width)[None, :] <= held[:, None]).astype(self._mask_dtype)
        out = self.decoder.run_in_place(input_ids, mask, lambda binding: self.buffer.bind(binding, first, count))
        for slot in slots:
            self.buffer.lengths[slot] += 1
        return out[[slot - first for slot in slots], -1, :]

    def _first_prompts(self, first: int, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Fresh prompts for slots first..first+len(prompts), right-padded into one forward."""
        rows, width = len(prompts), max(len(p) for p in prompts)
        input_ids = np.zeros((rows, width), dtype=self._ids_dtype)
        mask = np.zeros((rows, width), dtype=self._mask_dtype)
        for row, prompt in enumerate(prompts):
            input_ids[row, :len(prompt)] = prompt
            mask[row, :len(prompt)] = 1
        out = self.decoder.run_in_place(input_ids, mask, lambda binding: self.buffer.bind(binding, first, rows))
        for row, prompt in enumerate(prompts):
            self.buffer.lengths[first + row] = len(prompt)
        return [out[row, len(prompt) - 1, :] for row, prompt in enumerate(prompts)]

    def _continue(self, slot: int, ids: Sequence[int]) -> np.ndarray:
        held = self.buffer.lengths[slot]
        input_ids = np.asarray(ids, dtype=self._ids_dtype).reshape(1, -1)
        mask = np.ones((1, held + len(ids)), dtype=self._mask_dtype)
        out = self.decoder.run_in_place(input_ids, mask, lambda binding: self.buffer.bind(binding, slot, 1))
        self.buffer.lengths[slot] = held + len(ids)
        return out[0, -1, :]
