"""The KV budget and the prefix cache that shares it with the running rows.

Admission and eviction compare one number with `--kv-cache-bytes`: what the running rows
may need (their reservations in the executor's layout, or what they really hold, when that
is more) plus the bytes the prefix cache holds. The rows are passed in as a `RowsKv`
each time, never reached back for, so this room knows nothing of turns or layouts.

Not thread-safe: the scheduler calls it under its lock.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from llmsuite.inference.engine.executor import StoredKv
from llmsuite.inference.engine.prefix_cache import CacheEntry, PrefixCache, PrefixHit
from llmsuite.runtime.errors import InvalidArgument


@dataclass(frozen=True)
class RowsKv:
    """The running rows, as the budget sees them: what their layout may need them to grow to,
    and the KV objects they keep alive (prefix-cache entries among them count once, as entries)."""

    reserved_bytes: int
    held: Sequence[StoredKv]


class KvBudget:
    """`--kv-cache-bytes` over the running rows and the prefix cache; evicts least recently used."""

    def __init__(self, budget_bytes: int, idle_timeout_s: float) -> None:
        self.budget_bytes = budget_bytes
        self.idle_timeout_s = idle_timeout_s
        self.prefix = PrefixCache()
        self.evictions = 0

    # ---- what is held and needed ------------------------------------------------------

    def row_bytes(self, rows: RowsKv) -> int:
        """Bytes the rows keep alive beyond the prefix cache's entries, each object once."""
        unique = {id(kv): kv for kv in rows.held if not self.prefix.holds(kv)}
        return sum(kv.nbytes for kv in unique.values())

    def held_bytes(self, rows: RowsKv) -> int:
        """Bytes of every KV tensor alive for this model: the rows' and the cache's."""
        return self.row_bytes(rows) + self.prefix.nbytes

    def needed_bytes(self, rows: RowsKv) -> int:
        """What the budget must cover: the rows' reservations (or what they really hold, when
        that is more) plus the prefix cache's held bytes."""
        return max(rows.reserved_bytes, self.row_bytes(rows)) + self.prefix.nbytes

    def growth_to_come(self, rows: RowsKv) -> int:
        """Bytes the rows may still add to what they hold (for --max-memory)."""
        return max(0, rows.reserved_bytes - self.row_bytes(rows))

    # ---- admission and eviction -------------------------------------------------------

    def refuse_if_never_fits(self, reserved_tokens: int, needed_bytes: int) -> None:
        """A request that could not fit even alone is the caller's to shrink: retrying cannot help.
        `needed_bytes`: what one row of `reserved_tokens` needs in the executor's layout."""
        if needed_bytes > self.budget_bytes:
            raise InvalidArgument.for_field(
                "sampling.max_new_tokens",
                f"the prompt plus max_new_tokens can grow to {reserved_tokens} tokens, whose KV cache ({needed_bytes} "
                f"bytes) exceeds this server's KV budget for the model ({self.budget_bytes} bytes); lower "
                "max_new_tokens or shorten the prompt",
                reason="KV_BUDGET_EXCEEDED",
                needed_bytes=str(needed_bytes), kv_budget_bytes=str(self.budget_bytes),
            )

    def make_room(self, rows: RowsKv, keep: CacheEntry | None = None) -> bool:
        """True when `rows` (the running ones and the candidate) fit, evicting least recently
        used entries (never `keep`, the entry the candidate is about to read) if needed."""
        if self.needed_bytes(rows) - self.prefix.nbytes > self.budget_bytes:
            return False  # wait for running rows to finish; evicting the cache would not be enough
        for entry in self.prefix.least_recently_used():
            if self.needed_bytes(rows) <= self.budget_bytes:
                return True
            if entry is not keep:
                self.evict(entry)
        return self.needed_bytes(rows) <= self.budget_bytes

    def store(self, ids: Sequence[int], kv: StoredKv, rows: RowsKv) -> None:
        """Keeps a finished sequence's KV, then evicts least recently used entries until the
        rows and the cache fit again."""
        self.prefix.insert(ids, kv)
        for entry in self.prefix.least_recently_used():
            if self.needed_bytes(rows) <= self.budget_bytes:
                return
            self.evict(entry)

    def lookup(self, ids: Sequence[int], *, limit: int, touch: bool = True) -> PrefixHit | None:
        return self.prefix.lookup(ids, limit=limit, touch=touch)

    def evict(self, entry: CacheEntry) -> None:
        self.prefix.remove(entry)
        self.evictions += 1

    def expire(self, now: float) -> None:
        """Drops entries unused for the idle timeout."""
        for entry in self.prefix.least_recently_used():
            if now - entry.last_used < self.idle_timeout_s:
                return
            self.evict(entry)

    def next_expiry_delay(self) -> float | None:
        """Seconds until the oldest entry expires; None when the cache is empty."""
        entries = self.prefix.least_recently_used()
        if not entries:
            return None
        return max(0.0, entries[0].last_used + self.idle_timeout_s - time.monotonic())

    def clear(self) -> None:
        self.prefix.clear()
