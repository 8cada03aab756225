"""The decoding rows of one model as a left-padded batch: the only place KV is padded or compacted.

Every row's past sits at the right end of the batch's tensors; row r with `lengths[r]`
tokens of past has `length - lengths[r]` columns of padding in front, masked out with
attention_mask 0, and its next token is fed at position `lengths[r]`, so each row sees
exactly the positions it would see alone. Rows join after their prefill, leave the moment
they finish, and a retained session's row is extracted (unpadded) on its way out. When
the longest rows leave, the columns every remaining row has as padding are dropped in the
same compaction.

Exports without a `position_ids` input compute positions inside the graph, which a left
pad would shift; a batch built with `padded=False` only accepts rows of its own length, so
no row is ever padded (the scheduler keeps one such batch per length).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from llmsuite.inference.engine.kv_ops import KvOps
from llmsuite.inference.engine.onnx_model import KvCache, OnnxDecoder

RowKey = TypeVar("RowKey")


@dataclass(frozen=True)
class BatchLayout(Generic[RowKey]):
    """Which rows a batch holds, their true lengths, and the (padded) cache holding them."""

    keys: list[RowKey]
    lengths: list[int]
    cache: KvCache | None


class DecodeBatch(Generic[RowKey]):
    """Rows (identified by `RowKey`) decoding together, one forward per step for all of them."""

    def __init__(self, decoder: OnnxDecoder, ops: KvOps, *, padded: bool) -> None:
        self._decoder = decoder
        self._ops = ops
        self.padded = padded
        self.keys: list[RowKey] = []
        self.lengths: list[int] = []  # true past length per row
        self.cache: KvCache | None = None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def padded_length(self) -> int:
        return self.cache.length if self.cache is not None else 0

    @property
    def nbytes(self) -> int:
        return self.cache.nbytes if self.cache is not None else 0

    def accepts(self, length: int) -> bool:
        return self.padded or not self.keys or length == self.padded_length

    def add(self, key: RowKey, cache: KvCache) -> None:
        """Joins one row whose own (unpadded, single-row) cache is `cache`."""
        self.apply(self.with_row(key, cache))

    def remove(self, keys: Sequence[RowKey]) -> None:
        """Drops rows and any leading columns that are padding in every remaining row."""
        self.apply(self.without_rows(keys))

    def with_row(self, key: RowKey, cache: KvCache) -> BatchLayout[RowKey]:
        """The batch with one more row (computed on the device; the batch itself is unchanged
        until `apply`, so the caller can publish the change atomically)."""
        if not self.accepts(cache.length):
            raise ValueError(f"an unpadded batch of length {self.padded_length} cannot take a row of {cache.length}")
        keys, lengths = [*self.keys, key], [*self.lengths, cache.length]
        if self.cache is None:
            return BatchLayout(keys, lengths, cache)
        target = max(self.cache.length, cache.length)
        tensors = self._ops.join(self.cache.tensors, cache.tensors, target - self.cache.length, target - cache.length)
        return BatchLayout(keys, lengths, KvCache(tensors, target, self.cache.rows + 1))

    def with_batch(self, other: DecodeBatch[RowKey]) -> BatchLayout[RowKey]:
        """This batch with every row of `other` after its own (see `with_row`)."""
        if other.cache is None:
            return BatchLayout(self.keys, self.lengths, self.cache)
        if not self.padded and self.keys and (other.padded_length != self.padded_length
                                              or len(set(other.lengths)) > 1):
            raise ValueError("an unpadded batch only takes rows of its own length")
        keys, lengths = [*self.keys, *other.keys], [*self.lengths, *other.lengths]
        if self.cache is None:
            return BatchLayout(keys, lengths, other.cache)
        target = max(self.cache.length, other.cache.length)
        tensors = self._ops.join(self.cache.tensors, other.cache.tensors, target - self.cache.length,
                                 target - other.cache.length)
        return BatchLayout(keys, lengths,
                           KvCache(tensors, target, self.cache.rows + other.cache.rows))

    def without_rows(self, keys: Sequence[RowKey]) -> BatchLayout[RowKey]:
        """The batch without `keys`, compacted (see `with_row` for why it is not applied here)."""
        leaving = set(keys)
        kept = [row for row, key in enumerate(self.keys) if key not in leaving]
        if len(kept) == len(self.keys):
            return BatchLayout(self.keys, self.lengths, self.cache)
        kept_keys = [self.keys[row] for row in kept]
        lengths = [self.lengths[row] for row in kept]
        if not kept or self.cache is None:
            return BatchLayout(kept_keys, lengths, None)
        longest = max(lengths)
        tensors = self._ops.reshape(self.cache.tensors, kept, drop_front=self.cache.length - longest)
        return BatchLayout(kept_keys, lengths, KvCache(tensors, longest, len(kept)))

    def apply(self, layout: BatchLayout[RowKey]) -> None:
        self.keys, self.lengths, self.cache = layout.keys, layout.lengths, layout.cache

    def extract(self, key: RowKey) -> KvCache:
        """A copy of one row's cache without its padding (the batch keeps the row)."""
        assert self.cache is not None
        row = self.keys.index(key)
        tensors = self._ops.reshape(self.cache.tensors, [row], drop_front=self.cache.length - self.lengths[row])
        return KvCache(tensors, self.lengths[row], 1)

    @classmethod
    def prefill(cls, decoder: OnnxDecoder, ops: KvOps, keys: Sequence[RowKey], prompts: Sequence[Sequence[int]],
                *, padded: bool) -> tuple[DecodeBatch[RowKey], np.ndarray]:
        """Prefills several prompts with no past in ONE forward, left-padded to the longest (an
        unpadded batch needs equal lengths); returns the batch holding their KV, laid out as
        any batch is, and each row's last-position logits [rows, vocab]."""
        if not padded and len({len(p) for p in prompts}) > 1:
            raise ValueError("prompts of an unpadded batch must have equal lengths")
        sig = decoder.signature
        rows, width = len(prompts), max(len(p) for p in prompts)
        input_ids = np.zeros((rows, width), dtype=sig.input_ids_dtype)
        attention_mask = np.zeros((rows, width), dtype=sig.attention_mask_dtype)
        position_ids = np.zeros((rows, width), dtype=sig.position_ids_dtype)
        for row, prompt in enumerate(prompts):
            pad = width - len(prompt)
            input_ids[row, pad:] = prompt
            attention_mask[row, pad:] = 1
            position_ids[row, pad:] = np.arange(len(prompt))
        logits, cache = decoder.run(input_ids, attention_mask, position_ids, decoder.empty_cache(rows))
        batch: DecodeBatch[RowKey] = cls(decoder, ops, padded=padded)
        batch.apply(BatchLayout(list(keys), [len(p) for p in prompts], cache))
        return batch, logits[:, -1, :]

    def forward(self, last_tokens: Sequence[int]) -> np.ndarray:
        """Feeds each row's newest token (in row order); returns logits [rows, vocab]."""
        assert self.cache is not None and len(last_tokens) == len(self.keys)
        sig = self._decoder.signature
        rows, past = len(self.keys), self.cache.length
        lengths = np.asarray(self.lengths, dtype=np.int64)
        input_ids = np.asarray(last_tokens, dtype=sig.input_ids_dtype).reshape(rows, 1)
        columns = np.arange(past + 1, dtype=np.int64)
        attention_mask = (columns[None, :] >= (past - lengths)[:, None]).astype(sig.attention_mask_dtype)
        position_ids = lengths.astype(sig.position_ids_dtype).reshape(rows, 1)
        logits, self.cache = self._decoder.run(input_ids, attention_mask, position_ids, self.cache)
        self.lengths = [length + 1 for length in self.lengths]
        return logits[:, -1, :]
