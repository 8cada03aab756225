"""The prefix cache's index on its own: exact longest prefixes, subsumption, LRU order, collisions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from llmsuite.inference.engine import prefix_cache as module
from llmsuite.inference.engine.onnx_model import KvCache
from llmsuite.inference.engine.prefix_cache import BLOCK_TOKENS, PrefixCache


def kv(length: int) -> KvCache:
    """A stand-in cache of one [1, 1, length, 10] int8 tensor: 10 bytes per token, read from its shape."""
    return KvCache(tensors=(np.zeros((1, 1, length, 10), dtype=np.int8),), length=length, rows=1)


def seq(start: int, length: int) -> list[int]:
    return list(range(start, start + length))


def test_lookup_finds_the_longest_common_prefix_exactly() -> None:
    cache = PrefixCache()
    stored = seq(100, 40)
    cache.insert(stored, kv(40))
    query = [*stored[:37], 1, 2, 3]  # diverges inside the third block
    hit = cache.lookup(query, limit=len(query) - 1)
    assert hit is not None and hit.length == 37 and hit.entry.length == 40
    assert cache.lookup(query, limit=20).length == 20  # never more than the caller can use


def test_nothing_under_one_block_is_stored_or_matched() -> None:
    cache = PrefixCache()
    assert cache.insert(seq(0, BLOCK_TOKENS - 1), kv(BLOCK_TOKENS - 1)) is None
    cache.insert(seq(0, 40), kv(40))
    assert cache.lookup(seq(0, 10) + [999] * 30, limit=39) is None  # shares less than a block
    assert cache.lookup([7, *seq(1, 39)], limit=39) is None  # differs in the first token


def test_an_extension_replaces_the_entry_it_extends() -> None:
    cache = PrefixCache()
    turn_1 = seq(0, 20)
    cache.insert(turn_1, kv(20))
    turn_2 = turn_1 + seq(500, 30)
    cache.insert(turn_2, kv(50))
    assert len(cache) == 1 and cache.tokens == 50 and cache.nbytes == 500
    assert cache.lookup([*turn_1, 1], limit=20).entry.length == 50
    # Storing a prefix of what is cached adds nothing.
    assert cache.insert(turn_1, kv(20)) is None and len(cache) == 1


def test_branches_are_separate_entries_and_the_latest_wins_ties() -> None:
    cache = PrefixCache()
    shared = seq(0, 32)
    first = cache.insert(shared + [1] * 8, kv(40))
    second = cache.insert(shared + [2] * 8, kv(40))
    assert len(cache) == 2
    assert cache.lookup(shared + [1] * 8 + [3], limit=40).entry is first
    assert cache.lookup([*shared, 9], limit=33).entry is second  # both share 32: the newer one
    assert cache.lookup([*shared, 9], limit=33).length == 32


def test_least_recently_used_order_follows_hits() -> None:
    cache = PrefixCache()
    a = cache.insert(seq(0, 20), kv(20))
    b = cache.insert(seq(100, 20), kv(20))
    assert cache.least_recently_used() == [a, b]
    cache.lookup(seq(0, 20), limit=19)
    assert cache.least_recently_used() == [b, a]
    cache.remove(b)
    assert cache.least_recently_used() == [a] and cache.tokens == 20
    assert cache.lookup(seq(100, 20), limit=19) is None


def test_a_hash_collision_cannot_return_wrong_kv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "_block_hashes", lambda ids: [0] * (len(ids) // BLOCK_TOKENS))
    cache = PrefixCache()
    cache.insert(seq(0, 32), kv(32))
    assert cache.lookup(seq(1000, 32), limit=31) is None  # same "hashes", different ids
    hit: Any = cache.lookup(seq(0, 20) + [5] * 12, limit=31)
    assert hit is not None and hit.length == 20


def test_ids_are_compared_as_int64() -> None:
    cache = PrefixCache()
    big = [2**31 + i for i in range(20)]
    cache.insert(big, kv(20))
    assert cache.lookup(np.asarray([*big, 1]), limit=20).length == 20
