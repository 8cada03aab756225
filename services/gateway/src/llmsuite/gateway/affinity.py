"""Prefix affinity: requests that start the same way go to the same inference replica.

Each replica keeps its own prefix cache, so a conversation re-sent turn after turn (every
stateless OpenAI-style client, every retry) is cheap only if it lands where its earlier
turns were computed. The key is the start of what the model will read: the prompt's first
characters, or for a chat the conversation's first messages. It is stable while a
conversation grows, because later turns only append.

Replicas are ranked by rendezvous hashing (highest score of hash(key, replica) wins), so a
key keeps its replica when others come and go. Load still spreads, as in consistent hashing
with bounded loads: a replica that would carry more than LOAD_FACTOR x its fair share of the
calls in flight (this one included) is passed over for the next in the key's ranking, and
circuit-broken replicas are never ranked.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Protocol, TypeVar

from llmsuite.common.v1 import common_pb2

# Characters of the model's input that make the key: about a 16-token block of text, short
# enough that a conversation's first turn already has them, long enough to tell apart
# conversations that share only a template's opening.
DEFAULT_KEY_CHARS = 64
# How far above a fair share of the calls in flight a replica may go before the next takes over.
LOAD_FACTOR = 1.25


class Ranked(Protocol):
    target: str
    in_flight: int


R = TypeVar("R", bound=Ranked)


def prompt_key(prompt: str, key_chars: int) -> str | None:
    """The affinity key of a raw prompt; None (no affinity) when it is shorter than the key."""
    if key_chars <= 0 or len(prompt) < key_chars:
        return None
    return prompt[:key_chars]


def chat_key(messages: Sequence[common_pb2.ChatMessage], key_chars: int) -> str | None:
    """The affinity key of a conversation: its first messages, up to key_chars of content."""
    if key_chars <= 0:
        return None
    text = "".join(f"{m.role}\x1f{m.content}\x1e" for m in messages)
    return text[:key_chars] if len(text) >= key_chars else None


def rank(key: str, replicas: Sequence[R]) -> list[R]:
    """`replicas` in the order to try them for `key`: the key's rendezvous order, with the ones
    that one more call would load beyond LOAD_FACTOR x a fair share moved behind the rest."""
    ordered = sorted(replicas, key=lambda r: _score(key, r.target), reverse=True)
    if len(ordered) < 2:
        return ordered
    cap = math.ceil(LOAD_FACTOR * (sum(r.in_flight for r in ordered) + 1) / len(ordered))
    return [r for r in ordered if r.in_flight + 1 <= cap] + [r for r in ordered if r.in_flight + 1 > cap]


def _score(key: str, target: str) -> int:
    digest = hashlib.blake2b(f"{key}\x00{target}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")
