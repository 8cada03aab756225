"""The seam between the scheduler and a KV layout: what an executor runs and what it returns.

The scheduler plans a step (planner.py) and applies its results; an executor runs the
step's forwards over one KV layout and owns how every running row's KV is stored. Rows
are the scheduler's own objects, used here only as keys. Two layouts sit behind it:
`PaddedExecutor` (padded_executor.py: one left-padded tensor per layer, rewritten whole
by every forward and compacted when rows leave, for Optimum exports) and a slot buffer
(one preallocated `[slots, kv_heads, max_length, head_dim]` buffer per layer that a row
takes a slot of, for exports whose past and present share a buffer).

What leaves an executor is opaque: a finished row's KV becomes a `StoredKv` (a prefix-cache
entry), which the cache and the budget only size, and which only the executor that made it
reads back (`PrefillWork.start`). Every method is called from the scheduler's worker
thread; `held`, `held_tokens` and `reservation_bytes` may also be called from others.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np

RowKey = TypeVar("RowKey")


class StoredKv(Protocol):
    """KV that one object keeps alive: its tokens and the bytes of the tensors it holds."""

    @property
    def length(self) -> int: ...

    @property
    def nbytes(self) -> int: ...


@dataclass(frozen=True)
class CachedPrefix:
    """The first `length` tokens of a stored sequence's KV, which a row continues from."""

    kv: StoredKv
    length: int


@dataclass(frozen=True)
class PrefillWork(Generic[RowKey]):
    """One prefill forward: several fresh prompts together (nothing cached, each fed whole),
    or the next chunk of one row, continuing from its own KV or, on its first chunk, from
    `start`, a cached prefix."""

    rows: tuple[RowKey, ...]
    tokens: tuple[tuple[int, ...], ...]  # per row, the ids fed
    start: CachedPrefix | None = None
    completes: bool = True  # every row's prompt is fed by the end of this forward

    def __post_init__(self) -> None:
        if len(self.rows) != len(self.tokens) or not self.rows:
            raise ValueError("a prefill needs one token list per row, and at least one row")
        if len(self.rows) > 1 and (self.start is not None or not self.completes):
            raise ValueError("only a single row's chunk may continue from a cached prefix or leave ids unfed")


@dataclass(frozen=True)
class DecodeOutcome(Generic[RowKey]):
    """One decode forward's rows and either their logits [rows, vocab] or why it failed. A
    failed forward's rows hold no KV any more."""

    rows: list[RowKey]
    logits: np.ndarray | None = None
    error: BaseException | None = None


class KvReleaseFailed(Exception):
    """Releasing rows failed (their KV could not be taken out of shared storage): the rows
    asked for are gone without KV, and so are `casualties`, rows that shared the storage."""

    def __init__(self, casualties: Sequence[object], cause: BaseException) -> None:
        super().__init__(f"releasing KV failed: {type(cause).__name__}: {cause}")
        self.casualties = list(casualties)
        self.cause = cause


class KvExecutor(Protocol[RowKey]):
    """Runs a plan's forwards on one KV layout and keeps every running row's KV."""

    @property
    def mixes_prompt_lengths(self) -> bool:
        """Whether fresh prompts of different lengths may share one prefill forward."""
        ...

    def reservation_bytes(self, reserved_tokens: Sequence[int]) -> int:
        """What rows that may grow to `reserved_tokens` each can need at most in this layout,
        a step's working copies included: what admission holds the budget to."""
        ...

    def prefill(self, work: PrefillWork[RowKey]) -> np.ndarray:
        """Runs one prefill forward; returns each row's last-position logits [rows, vocab].
        The rows' KV stays here, prefilling, until `start_decoding` or `release`. Raises when
        the forward fails (the caller then discards the rows)."""
        ...

    def start_decoding(self, rows: Sequence[RowKey]) -> None:
        """Rows whose prompt is fully fed join the decode set (raises on failure)."""
        ...

    def decode(self, rows: Sequence[RowKey], last_tokens: Sequence[int]) -> Iterator[DecodeOutcome[RowKey]]:
        """Feeds each decoding row its newest token: one outcome per forward, produced lazily so
        the caller samples one forward's rows while the next runs."""
        ...

    def release(self, rows: Sequence[RowKey], keep: Sequence[RowKey]) -> dict[RowKey, StoredKv | None]:
        """Rows leave: returns the KV of those in `keep` (a copy of just their tokens, which
        this executor can read back as a `CachedPrefix`), None for the others. Raises
        KvReleaseFailed."""
        ...

    def discard(self, rows: Iterable[RowKey]) -> None:
        """Rows leave after a fault; their KV is dropped. Rows it does not hold are ignored."""
        ...

    def clear(self) -> None:
        """Drops every row's KV."""
        ...

    def probe(self) -> None:
        """A one-token forward from nothing, after a failed step: raises when the model cannot run."""
        ...

    def held(self) -> list[StoredKv]:
        """Every KV object the running rows keep alive, each once (thread-safe)."""
        ...

    def held_tokens(self) -> int:
        """Tokens of KV the running rows hold (thread-safe)."""
        ...
