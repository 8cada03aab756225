"""Prefix affinity on its own: stable, spread, bounded by load, minimal disruption."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.affinity import chat_key, prompt_key, rank


@dataclass
class FakeReplica:
    target: str
    in_flight: int = 0


REPLICAS = [FakeReplica(f"10.0.0.{i}:50052") for i in range(4)]
KEYS = [f"conversation {i} starts with a long enough system prompt" for i in range(400)]


def test_a_key_always_ranks_the_same_replica_first() -> None:
    for key in KEYS[:20]:
        assert len({rank(key, REPLICAS)[0].target for _ in range(5)}) == 1
        assert rank(key, list(reversed(REPLICAS)))[0] is rank(key, REPLICAS)[0]  # order of the list is irrelevant


def test_keys_spread_over_replicas() -> None:
    firsts = Counter(rank(key, REPLICAS)[0].target for key in KEYS)
    assert len(firsts) == 4 and min(firsts.values()) > 50  # 100 each on average


def test_losing_a_replica_moves_only_its_own_keys() -> None:
    before = {key: rank(key, REPLICAS)[0].target for key in KEYS}
    gone = REPLICAS[1].target
    after = {key: rank(key, [r for r in REPLICAS if r.target != gone])[0].target for key in KEYS}
    moved = [key for key in KEYS if before[key] != after[key]]
    assert moved and all(before[key] == gone for key in moved)


def test_a_replica_loaded_beyond_its_share_is_passed_over() -> None:
    replicas = [FakeReplica("a"), FakeReplica("b")]
    key = KEYS[0]
    preferred, other = rank(key, replicas)
    assert rank(key, replicas)[0] is preferred
    preferred.in_flight = 1  # one more call keeps it within 1.25x of a fair share of 2
    assert rank(key, replicas)[0] is preferred
    preferred.in_flight = 3  # 4 of 4 calls would be there
    assert rank(key, replicas) == [other, preferred]


def test_keys_come_from_the_start_of_the_input_and_grow_stably() -> None:
    assert prompt_key("short", 64) is None and prompt_key("x" * 100, 0) is None
    long = "Once upon a time " * 10
    assert prompt_key(long, 64) == prompt_key(long + " and then more text", 64)
    system = common_pb2.ChatMessage(role="system", content="You are a helpful assistant who answers briefly.")
    first = [system, common_pb2.ChatMessage(role="user", content="What is gRPC and why use it?")]
    later = [*first, common_pb2.ChatMessage(role="assistant", content="A framework."),
             common_pb2.ChatMessage(role="user", content="Thanks")]
    assert chat_key(first, 64) is not None and chat_key(first, 64) == chat_key(later, 64)
    assert chat_key([common_pb2.ChatMessage(role="user", content="hi")], 64) is None
