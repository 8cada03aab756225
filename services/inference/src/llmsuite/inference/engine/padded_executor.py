"""The padded KV layout (Optimum exports): rows' past in left-padded batches, rewritten by every forward.

A row prefilling chunk by chunk keeps its own unpadded one-row cache; fresh prompts
prefilled together share one left-padded cache. When its prompt is fed, a row joins a
decode batch (`DecodeBatch`, batch.py, the only place that pads or compacts), and it
leaves the moment it ends, with a copy of just its tokens when the prefix cache keeps
them. The decoder returns a whole new present each forward, so nothing here is written in
place: every cache is immutable and a prefix-cache entry can be read by any number of rows.

Exports that cannot be left-padded (no `position_ids`, or fused attention reading its KV
right-padded) keep one batch per length instead.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Generic

import numpy as np

from llmsuite.inference.engine.batch import BatchLayout, DecodeBatch
from llmsuite.inference.engine.executor import (
    CachedPrefix,
    DecodeOutcome,
    KvReleaseFailed,
    PrefillWork,
    RowKey,
    StoredKv,
)
from llmsuite.inference.engine.kv_ops import KvOps
from llmsuite.inference.engine.onnx_model import KvCache, OnnxDecoder

# Nothing is written in place, so a step can hold the running rows' KV twice: a decode
# forward returns the whole present (past + one column) while the past is still alive, and a
# join or a compaction writes the batch anew while the old one lives (as does a prefill
# chunk for its row). Admission reserves both, so that what the process holds at the peak
# of a step stays within --kv-cache-bytes (docs/design.md, "Memory").
STEP_COPIES = 2


class PaddedExecutor(Generic[RowKey]):
    """`KvExecutor` for the padded layout; see the module docstring."""

    def __init__(self, decoder: OnnxDecoder, ops: KvOps) -> None:
        self._decoder = decoder
        self._ops = ops
        self._padded = decoder.left_padding
        self._bytes_per_token = decoder.kv_bytes_per_token
        # Guards publishing: the tensors are computed outside it, the layouts swapped inside,
        # so `held` never sees a row twice or a batch half changed.
        self._lock = threading.Lock()
        self._own: dict[RowKey, KvCache] = {}  # rows prefilling chunk by chunk, unpadded
        self._groups: list[DecodeBatch[RowKey]] = []  # fresh prompts prefilled together, not decoding yet
        self._batches: list[DecodeBatch[RowKey]] = []  # decoding

    @property
    def mixes_prompt_lengths(self) -> bool:
        return self._padded  # left-padded, where positions cannot shift

    def reservation_bytes(self, reserved_tokens: Sequence[int]) -> int:
        """The rows' KV at its longest, padded as their batch pads it, times STEP_COPIES: what
        they hold between steps and the copy a step writes."""
        if not reserved_tokens:
            return 0
        if self._padded:  # one batch: every row is as long as the longest
            held = len(reserved_tokens) * max(reserved_tokens) * self._bytes_per_token
        else:
            held = sum(reserved_tokens) * self._bytes_per_token
        return STEP_COPIES * held

    # ---- forwards -------------------------------------------------------------------

    def prefill(self, work: PrefillWork[RowKey]) -> np.ndarray:
        if len(work.rows) > 1:
            batch, logits = DecodeBatch.prefill(self._decoder, self._ops, work.rows, work.tokens, padded=self._padded)
            with self._lock:
                self._groups.append(batch)
            return logits
        (row,), (tokens,) = work.rows, work.tokens
        cache = self._own.get(row)
        if cache is None:
            cache = self._starting_cache(work.start)
        result = self._decoder.forward(tokens, cache)
        with self._lock:
            self._own[row] = result.cache
        return result.logits[-1:]

    def _starting_cache(self, start: CachedPrefix | None) -> KvCache:
        """The KV a row's first chunk continues from: its cached prefix, or nothing."""
        if start is None:
            return self._decoder.empty_cache()
        cache = start.kv
        assert isinstance(cache, KvCache), "a prefix stored by another layout"
        if start.length == cache.length:
            return cache  # immutable: the forward writes new tensors and the entry stays valid
        return KvCache(self._ops.reshape(cache.tensors, [0], keep=start.length), start.length, 1)

    def start_decoding(self, rows: Sequence[RowKey]) -> None:
        """`rows`: what is left of one prefill's rows (one chunked row, or a group's survivors)."""
        if len(rows) == 1 and rows[0] in self._own:
            cache = self._own[rows[0]]
            target = self._batch_accepting(cache.length)
            layout = target.with_row(rows[0], cache)
            with self._lock:
                target.apply(layout)
                self._publish(target)
                del self._own[rows[0]]
            return
        group = self._holder(rows[0], self._groups)
        if group is None or set(map(id, group.keys)) != set(map(id, rows)):
            raise ValueError("start_decoding takes every row left of one prefill")
        target = self._batch_accepting(group.padded_length)
        layout = target.with_batch(group)
        with self._lock:
            target.apply(layout)
            self._publish(target)
            self._groups.remove(group)

    def _batch_accepting(self, length: int) -> DecodeBatch[RowKey]:
        found = next((b for b in self._batches if b.accepts(length)), None)
        return found if found is not None else DecodeBatch(self._decoder, self._ops, padded=self._padded)

    def _publish(self, batch: DecodeBatch[RowKey]) -> None:
        if batch not in self._batches:
            self._batches.append(batch)

    def decode(self, rows: Sequence[RowKey], last_tokens: Sequence[int]) -> Iterator[DecodeOutcome[RowKey]]:
        newest = dict(zip(map(id, rows), last_tokens, strict=True))
        for batch in list(self._batches):
            keys = list(batch.keys)
            try:
                logits = batch.forward([newest[id(key)] for key in keys])
            except Exception as exc:
                with self._lock:  # every row leaves: no KV work
                    batch.apply(batch.without_rows(keys))
                    self._batches.remove(batch)
                yield DecodeOutcome(keys, error=exc)
                continue
            yield DecodeOutcome(keys, logits=logits)

    # ---- rows leaving ---------------------------------------------------------------

    def release(self, rows: Sequence[RowKey], keep: Sequence[RowKey]) -> dict[RowKey, StoredKv | None]:
        keeping = set(map(id, keep))
        kept: dict[RowKey, StoredKv | None] = {}
        leaving: dict[int, tuple[DecodeBatch[RowKey], list[RowKey]]] = {}
        try:
            for row in rows:
                batch = self._holder(row, [*self._groups, *self._batches])
                if batch is not None:
                    leaving.setdefault(id(batch), (batch, []))[1].append(row)  # before the KV work that may fail
                    kept[row] = batch.extract(row) if id(row) in keeping else None
                else:
                    kept[row] = self._own.get(row) if id(row) in keeping else None
            layouts = [(batch, batch.without_rows(left)) for batch, left in leaving.values()]
        except Exception as exc:
            raise KvReleaseFailed(self._drop_batches(rows, [b for b, _ in leaving.values()]), exc) from exc
        self._settle(layouts, rows)
        return kept

    def _drop_batches(self, rows: Sequence[RowKey], batches: Sequence[DecodeBatch[RowKey]]) -> list[RowKey]:
        """After a failed release: `rows` and whole `batches` go (no KV work); returns the other
        rows those batches held, which cannot run on without them."""
        leaving = set(map(id, rows))
        casualties = [key for batch in batches for key in batch.keys if id(key) not in leaving]
        self._settle([(batch, batch.without_rows(list(batch.keys))) for batch in batches], rows)
        return casualties

    def discard(self, rows: Iterable[RowKey]) -> None:
        gone = list(rows)
        ids = set(map(id, gone))
        changes = []
        for batch in [*self._groups, *self._batches]:
            leaving = [key for key in batch.keys if id(key) in ids]
            if leaving:  # a fault takes whole batches; a partial one is compacted (KV work)
                changes.append((batch, batch.without_rows(leaving)))
        self._settle(changes, gone)

    def clear(self) -> None:
        with self._lock:
            self._own.clear()
            self._groups.clear()
            self._batches.clear()

    def _settle(self, layouts: Sequence[tuple[DecodeBatch[RowKey], BatchLayout[RowKey]]],
                rows: Iterable[RowKey]) -> None:
        """Under the lock: applies each batch's new layout, forgets emptied batches and the
        rows that left (whatever they owned)."""
        with self._lock:
            for batch, layout in layouts:
                batch.apply(layout)
            self._forget_empty()
            for row in rows:
                self._own.pop(row, None)

    def _forget_empty(self) -> None:
        self._groups = [b for b in self._groups if len(b)]
        self._batches = [b for b in self._batches if len(b)]

    @staticmethod
    def _holder(row: RowKey, batches: Iterable[DecodeBatch[RowKey]]) -> DecodeBatch[RowKey] | None:
        return next((b for b in batches if any(key is row for key in b.keys)), None)

    # ---- checks and accounting ------------------------------------------------------

    def probe(self) -> None:
        self._decoder.forward([0], self._decoder.empty_cache())

    def held(self) -> list[StoredKv]:
        with self._lock:
            caches = [b.cache for b in [*self._groups, *self._batches] if b.cache is not None]
            caches += self._own.values()
        return list({id(cache): cache for cache in caches}.values())

    def held_tokens(self) -> int:
        with self._lock:
            return (sum(cache.length for cache in self._own.values())
                    + sum(sum(b.lengths) for b in [*self._groups, *self._batches]))
