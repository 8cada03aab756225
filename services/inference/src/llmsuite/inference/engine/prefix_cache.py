"""Automatic prefix caching: the KV of finished sequences, reused by any later request that
starts with the same token ids.

Entries are whole sequences: the token ids a finished turn's KV covers and that KV as one
unpadded `[1, kv_heads, length, head_dim]` cache per layer, exactly what a forward reads as
its past. An Optimum export wants one contiguous past tensor, so a reused prefix must be
contiguous anyway: keeping sequences whole makes a full hit free (the entry's tensors are
fed as they are) and a partial hit one slice, where block storage would need a concat of
every block on every hit.

The index is vLLM-style block hashing: every full block of BLOCK_TOKENS ids of an entry is
keyed by a hash chained over all blocks before it, so a lookup walks the request's blocks
until the chain breaks, then extends the match token by token into the best entry (hits are
exact, not block-aligned, and the ids are compared, so a hash collision cannot return wrong
KV). An entry whose ids are a prefix of a newer entry is dropped as the newer one is stored
(a chat's turn N+1 subsumes turn N), so a conversation costs one entry, not one per turn.
Eviction is least recently used, driven by the KV budget (kv_budget.py), which counts each
entry by the bytes of the tensors it keeps alive.

Not thread-safe: the scheduler calls it under its lock.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from llmsuite.inference.engine.executor import StoredKv

BLOCK_TOKENS = 16
# How many entries sharing a request's deepest matching block are compared id by id.
MAX_COMPARED_ENTRIES = 32


@dataclass(eq=False)
class CacheEntry:
    """A finished sequence's ids and the KV covering exactly those ids."""

    ids: np.ndarray  # int64 [length]
    cache: StoredKv  # opaque: made and read back by the model's executor
    block_hashes: list[int] = field(default_factory=list)
    last_used: float = 0.0  # time.monotonic() of the last store or hit

    @property
    def length(self) -> int:
        return int(self.ids.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the entry keeps alive (read from their shapes)."""
        return self.cache.nbytes


@dataclass(frozen=True)
class PrefixHit:
    entry: CacheEntry
    length: int  # tokens of the request covered by entry.cache[:, :, :length]


def _block_hashes(ids: np.ndarray) -> list[int]:
    hashes: list[int] = []
    previous = 0
    for start in range(0, ids.shape[0] - BLOCK_TOKENS + 1, BLOCK_TOKENS):
        previous = hash((previous, ids[start:start + BLOCK_TOKENS].tobytes()))
        hashes.append(previous)
    return hashes


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(a.shape[0], b.shape[0])
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


class PrefixCache:
    """Finished sequences' KV, found by the longest common prefix of token ids; LRU order."""

    def __init__(self) -> None:
        self._entries: OrderedDict[int, CacheEntry] = OrderedDict()  # id(entry) -> entry, oldest first
        self._by_block: dict[int, dict[int, CacheEntry]] = {}  # chained block hash -> entries having it
        self._caches: set[int] = set()  # id() of every entry's KV
        self.nbytes = 0
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def holds(self, cache: StoredKv) -> bool:
        """Whether `cache` is an entry's (its bytes are then in `nbytes`)."""
        return id(cache) in self._caches

    def lookup(self, ids: Sequence[int] | np.ndarray, *, limit: int, touch: bool = True) -> PrefixHit | None:
        """The longest cached prefix of `ids`, at most `limit` tokens (a request must keep at
        least one token to feed); None when nothing useful (under one block) is cached."""
        query = np.asarray(ids, dtype=np.int64)
        deepest: dict[int, CacheEntry] | None = None
        for hashed in _block_hashes(query[:limit]):
            candidates = self._by_block.get(hashed)
            if not candidates:
                break
            deepest = candidates
        if deepest is None:
            return None
        # Entries sharing every full block may still differ in their last, partial block: take
        # the longest match, the most recently stored on a tie (a bounded number are compared).
        best, length = None, 0
        for candidate in itertools.islice(reversed(deepest.values()), MAX_COMPARED_ENTRIES):
            common = min(_common_prefix(candidate.ids, query), limit)
            if common > length:
                best, length = candidate, common
        if best is None or length < BLOCK_TOKENS:  # a hash collision: the ids did not really match
            return None
        if touch:
            self._entries.move_to_end(id(best))
            best.last_used = time.monotonic()
        return PrefixHit(best, length)

    def insert(self, ids: Sequence[int] | np.ndarray, cache: StoredKv) -> CacheEntry | None:
        """Stores a finished sequence (`cache` covers exactly `ids`); entries it extends are dropped.

        Returns the new entry, or None when the sequence is shorter than a block or already
        covered by an entry that extends it (that entry is marked as recently used instead).
        """
        array = np.asarray(ids, dtype=np.int64)
        if array.shape[0] < BLOCK_TOKENS:
            return None
        covering = self.lookup(array, limit=array.shape[0], touch=False)
        if covering is not None and covering.length == array.shape[0]:
            self._entries.move_to_end(id(covering.entry))
            covering.entry.last_used = time.monotonic()
            return None
        entry = CacheEntry(array, cache, _block_hashes(array), last_used=time.monotonic())
        # Every entry that is a prefix of this one shares its first block.
        for older in list(self._by_block.get(entry.block_hashes[0], {}).values()):
            if older.length <= entry.length and _common_prefix(older.ids, array) == older.length:
                self.remove(older)
        self._entries[id(entry)] = entry
        self._caches.add(id(entry.cache))
        for hashed in entry.block_hashes:
            self._by_block.setdefault(hashed, {})[id(entry)] = entry
        self.nbytes += entry.nbytes
        self.tokens += entry.length
        return entry

    def remove(self, entry: CacheEntry) -> None:
        if self._entries.pop(id(entry), None) is None:
            return
        self._caches.discard(id(entry.cache))
        for hashed in entry.block_hashes:
            holders = self._by_block.get(hashed)
            if holders is not None:
                holders.pop(id(entry), None)
                if not holders:
                    del self._by_block[hashed]
        self.nbytes -= entry.nbytes
        self.tokens -= entry.length

    def least_recently_used(self) -> list[CacheEntry]:
        """Every entry, least recently used first."""
        return list(self._entries.values())

    def clear(self) -> None:
        self._entries.clear()
        self._by_block.clear()
        self._caches.clear()
        self.nbytes = self.tokens = 0
