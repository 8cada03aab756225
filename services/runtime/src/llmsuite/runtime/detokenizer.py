"""Incremental detokenization for streamed generation.

Why not `tokenizers.decoders.DecodeStream`: it has no flush, so text held back at the
end of a stream (ids that really end mid-character) is lost and the streamed text no
longer equals a one-shot decode; and it holds back a whole token's text while any
part of it is incomplete. The algorithm here is the same sliding window (decode a few
already-emitted ids for context, emit what the new ids add) with those two fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHARACTER = "\ufffd"
# Ids of already-emitted text kept as decoding context. Decoders that depend on the
# previous token (a word-start space, a byte run that completes a character) need at
# most a character's worth of byte tokens, which is 4.
CONTEXT_IDS = 4
# Ids that may pile up without completing a character before the window is flushed
# as it is. Real text completes a character within a few ids; only a stream of stray
# bytes gets here, and without the bound every push would decode the whole, ever
# longer, window (quadratic work on the event loop).
MAX_PENDING_IDS = 256

DecodeFn = Callable[[Sequence[int]], str]


def _stable_length(text: str) -> int:
    """Length of `text` without its trailing U+FFFD run: those may still be bytes of a
    character whose remaining bytes have not arrived."""
    return len(text.rstrip(REPLACEMENT_CHARACTER))


def _common_prefix_length(first: str, second: str) -> int:
    for position, (a, b) in enumerate(zip(first, second, strict=False)):
        if a != b:
            return position
    return min(len(first), len(second))


class IncrementalDetokenizer:
    """Turns a stream of ids into text deltas that never split a character.

    Invariant: the concatenation of every `push()` result and `finish()` equals the
    one-shot decode of all pushed ids. With prefix ids it equals the decode of
    prefix + pushed minus the prefix's own text, except that a character the prefix
    left incomplete is emitted whole once the stream completes it. A `push()` result
    never ends in U+FFFD (that may be a character still missing bytes); `finish()`
    flushes it. Not thread-safe: one per stream.

    Each push decodes the ids since the last fully settled point plus the context, so
    cost stays constant per id. A run of text that is nothing but U+FFFD (stray bytes)
    grows the window until real text follows, up to MAX_PENDING_IDS ids: then what is
    held back is emitted as it is and the window restarts, so such a stream costs
    bounded work per id; only there may the deltas differ from a one-shot decode (a
    character completed right after the flush is lost rather than duplicated).
    """

    def __init__(
        self,
        decode: DecodeFn,
        *,
        prefix_ids: Sequence[int] = (),
        check_ids: Callable[[Sequence[int]], None] | None = None,
    ) -> None:
        """`decode` turns ids into text (one-shot); `check_ids` validates each pushed
        chunk before it joins the stream, raising to reject it."""
        self._decode = decode
        self._check_ids = check_ids
        # The window: context ids whose text is already out, then ids not yet settled.
        self._window: list[int] = list(prefix_ids[-CONTEXT_IDS:])
        context_text = decode(self._window) if self._window else ""
        # Characters at the start of the window's text that are already out (or are
        # the prefix's own text).
        self._emitted_chars = _stable_length(context_text)
        # A prefix ending in U+FFFD is ambiguous until more text arrives: either the
        # next ids complete a character (emit it whole) or the U+FFFD was final and
        # belongs to the prefix (never re-emit it).
        self._unresolved_prefix = context_text if self._emitted_chars < len(context_text) else None
        self._finished = False

    def push(self, ids: Sequence[int]) -> str:
        """Adds `ids` and returns the text that became stable (often "")."""
        if self._finished:
            raise RuntimeError("push() after finish()")
        if not ids:
            return ""
        if self._check_ids is not None:
            self._check_ids(ids)
        self._window.extend(ids)
        text = self._decode(self._window)
        stable = _stable_length(text)
        if self._unresolved_prefix is not None:
            self._resolve_prefix(text, stable)
        delta = text[self._emitted_chars : stable] if stable > self._emitted_chars else ""
        self._emitted_chars = max(self._emitted_chars, stable)
        if stable == len(text):
            self._slide()
        elif len(self._window) > CONTEXT_IDS + MAX_PENDING_IDS:
            delta += text[self._emitted_chars :]
            self._unresolved_prefix = None
            self._emitted_chars = len(text)
            self._slide()
        return delta

    def finish(self) -> str:
        """Returns whatever is still held back; U+FFFD here means the ids really end
        mid-character."""
        if self._finished:
            return ""
        self._finished = True
        text = self._decode(self._window)
        if self._unresolved_prefix is not None and text.startswith(self._unresolved_prefix):
            return text[len(self._unresolved_prefix) :]
        return text[self._emitted_chars :]

    def _resolve_prefix(self, text: str, stable: int) -> None:
        prefix = self._unresolved_prefix
        assert prefix is not None
        if text.startswith(prefix):
            if stable > len(prefix):
                # Text arrived after the prefix's U+FFFD run unchanged: the run was final.
                self._unresolved_prefix = None
                self._emitted_chars = len(prefix)
            return
        # The run changed, so the new ids completed a character; whatever of the run
        # is unchanged still belongs to the prefix.
        self._unresolved_prefix = None
        self._emitted_chars = max(self._emitted_chars, _common_prefix_length(text, prefix))

    def _slide(self) -> None:
        # Everything is emitted: keep only the last few ids as context, so each push
        # decodes a short window rather than the whole stream.
        if len(self._window) <= CONTEXT_IDS:
            return
        self._window = self._window[-CONTEXT_IDS:]
        context_text = self._decode(self._window)
        self._emitted_chars = len(context_text)
