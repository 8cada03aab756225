"""Stop strings applied to detokenized text as it streams.

The gateway sees text deltas, not tokens, so a stop string can arrive split
across any number of deltas. `StopStringMatcher` emits text as soon as it can
no longer become part of a stop string and holds back only the shortest
suffix that still could.

Which stop wins: the first one to *complete* in the text. Generation ends the
moment any stop string has appeared, so a longer stop string that started
earlier but would only complete later never gets the chance. When several
complete at the same character (`"b"` and `"ab"` on text `"ab"`), the
longest one, which starts earliest, wins. The output is the text before the
winning stop string; the stop string itself is emitted only when the caller
asked for it (`include_matched`, vLLM's include_stop_str_in_output).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llmsuite.runtime.errors import InvalidArgument

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256


@dataclass(frozen=True)
class StopScan:
    """What one `feed` released: `emit` is safe to send to the caller now."""

    emit: str
    stopped: bool = False
    matched: str | None = None


def validate_stop_strings(stop: Sequence[str], *, field_path: str = "sampling.stop_strings",
                          max_count: int = MAX_STOP_STRINGS,
                          max_chars: int = MAX_STOP_STRING_CHARS) -> tuple[str, ...]:
    """Check a request's stop strings; return them in order with duplicates dropped.

    Raises `InvalidArgument` (reason INVALID_STOP_STRING) naming the offending
    entry as `field_path[i]`, or `field_path` itself when there are too many.
    """
    if len(stop) > max_count:
        raise InvalidArgument.for_field(
            field_path, f"at most {max_count} stop strings are allowed, got {len(stop)}",
            reason="INVALID_STOP_STRING", limit=str(max_count))
    for i, s in enumerate(stop):
        if not s:
            raise InvalidArgument.for_field(f"{field_path}[{i}]", "stop strings must not be empty",
                                            reason="INVALID_STOP_STRING")
        if len(s) > max_chars:
            raise InvalidArgument.for_field(
                f"{field_path}[{i}]", f"stop strings are limited to {max_chars} characters, got {len(s)}",
                reason="INVALID_STOP_STRING", limit=str(max_chars))
    return tuple(dict.fromkeys(stop))


def _effective_stops(stop: Sequence[str]) -> tuple[str, ...]:
    """Drop stop strings that can never win.

    If `t` occurs inside `s` anywhere but as a suffix, `t` completes before `s`
    can, so `s` never ends a generation. Keeping it would only make the matcher
    hold back text that is certain to be emitted.
    """
    unique = tuple(dict.fromkeys(stop))
    return tuple(s for s in unique if not any(t != s and t in s[:-1] for t in unique))


class StopStringMatcher:
    """Finds stop strings in a stream of text deltas (one generation, not thread-safe).

    `feed` returns the text that can be released now; once a stop string has
    completed it reports `stopped` and every later `feed` releases nothing.
    `flush` releases the held-back tail when the stream ends without a stop.
    """

    def __init__(self, stop: Sequence[str], *, include_matched: bool = False) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._include_matched = include_matched
        self._stops = _effective_stops(stop)
        # Every proper prefix of a live stop string: a suffix of the text in this
        # set may still grow into a stop string and must be held back.
        self._prefixes = frozenset(s[:i] for s in self._stops for i in range(1, len(s)))
        self._longest_prefix = max((len(s) - 1 for s in self._stops), default=0)
        self._pending = ""
        self._matched: str | None = None

    @property
    def stopped(self) -> bool:
        return self._matched is not None

    @property
    def held_back(self) -> str:
        """Text received but not yet released (it might start a stop string)."""
        return self._pending

    def feed(self, delta: str) -> StopScan:
        if self._matched is not None:
            return StopScan("", stopped=True, matched=self._matched)
        if not self._stops:
            return StopScan(delta)
        text = self._pending + delta
        hit = self._first_completed(text)
        if hit is not None:
            start, matched = hit
            self._pending = ""
            self._matched = matched
            end = start + len(matched) if self._include_matched else start
            return StopScan(text[:end], stopped=True, matched=matched)
        keep = self._partial_suffix_len(text)
        self._pending = text[len(text) - keep:] if keep else ""
        return StopScan(text[:len(text) - keep])

    def flush(self) -> str:
        """End of stream: release what was held back (nothing after a stop)."""
        rest, self._pending = self._pending, ""
        return "" if self._matched is not None else rest

    def _first_completed(self, text: str) -> tuple[int, str] | None:
        # The pending prefix never contains a complete stop string, so any hit
        # ends inside the new delta; str.find's earliest start is also the
        # earliest end for a given stop string.
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for s in self._stops:
            start = text.find(s)
            if start >= 0:
                key = (start + len(s), -len(s), s)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        end, neg_len, matched = best
        return end + neg_len, matched

    def _partial_suffix_len(self, text: str) -> int:
        for n in range(min(len(text), self._longest_prefix), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0
