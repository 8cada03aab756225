"""Constrained decoding: token masks from a grammar, built by llguidance.

A `Constraint` (JSON Schema, any JSON object, regex, Lark/GBNF grammar, a list of choices)
is compiled once per model into an llguidance matcher over the model's own tokenizer
(tokenizer.json beside the model, read through llguidance's bundled Hugging Face
`tokenizers`, never `transformers`). Each constrained turn owns a copy of that matcher
(`RowGrammar`): before a token is sampled, the mask of tokens that keep the output a prefix
of an accepted text is applied to its logits; after, the matcher consumes the token.

What keeps this off the batch's critical path:
- compiling happens at submit, on the asyncio side, in a small thread pool, bounded by
  llguidance's own limits (lexer states, grammar size, per-step fuel) and a wall-clock
  timeout; compiled grammars are cached by content hash (bounded LRU), so a schema sent by
  every request compiles once;
- a row's next mask is computed on the mask pool as soon as its token is consumed, so it
  overlaps the next forward; llguidance releases the GIL while it computes. The sampler
  waits for it only if the forward finished first;
- a step that would exceed llguidance's per-step limits puts only that row's matcher in an
  error state: the row ends with CONSTRAINT_TOO_COMPLEX and the other rows go on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import llguidance
import numpy as np

from llmsuite.inference.engine.types import Constraint, ConstraintKind
from llmsuite.runtime.errors import InvalidArgument, ResourceExhausted

logger = logging.getLogger(__name__)

FIELD = "sampling.constraint"
MAX_CONSTRAINT_CHARS = 131_072  # one schema, regex or grammar; all choices together
MAX_CHOICES = 1024
COMPILE_TIMEOUT_S = 10.0
CACHE_ENTRIES = 64
COMPILE_THREADS = 2

# Compact JSON unless the schema's own "x-guidance" options ask for whitespace: with free
# whitespace a model (a random one for certain, real ones often enough) can spend every
# token on newlines and never close the object.
_JSON_OPTIONS: llguidance._lib.JsonCompileOptions = {"whitespace_flexible": False}

# llguidance's defaults, except fewer lexer states (each costs about 1-2 kB: this bounds one
# grammar's lexer to about 100 MB) and errors that do not echo parser internals.
_MAX_LEXER_STATES = 50_000

_TOO_COMPLEX_HINTS = ("limit", "too large", "too many", "too complex", "fuel", "exceeded")
_UNSUPPORTED_HINTS = ("unimplemented", "not supported", "unsupported", "unknown format")


def _refusal(kind: ConstraintKind, reason: str, description: str) -> InvalidArgument:
    return InvalidArgument.for_field(f"{FIELD}.{kind.value}", description, reason=reason)


def _describe(error: str) -> str:
    # "<non-verbose/>" marks where LLParserLimits(verbose_errors=False) left parser state out.
    return error.replace("<non-verbose/>", "").strip()[:1000]


def _classify(kind: ConstraintKind, error: str) -> InvalidArgument:
    """llguidance reports every problem as text; the hints sort it into our stable reasons."""
    error = _describe(error)
    lowered = error.lower()
    if any(hint in lowered for hint in _TOO_COMPLEX_HINTS):
        reason = "CONSTRAINT_TOO_COMPLEX"
    elif any(hint in lowered for hint in _UNSUPPORTED_HINTS):
        reason = "CONSTRAINT_UNSUPPORTED"
    else:
        reason = "CONSTRAINT_INVALID"
    return _refusal(kind, reason, error)


def check_constraint(constraint: Constraint) -> None:
    """Size checks that need no tokenizer (cheap, before anything is queued)."""
    kind = constraint.kind
    if kind is ConstraintKind.CHOICE:
        if not 1 <= len(constraint.choices) <= MAX_CHOICES:
            raise _refusal(kind, "CONSTRAINT_INVALID",
                           f"must list 1 to {MAX_CHOICES} options, got {len(constraint.choices)}")
        for index, option in enumerate(constraint.choices):
            if not option:
                raise InvalidArgument.for_field(f"{FIELD}.choice.options[{index}]", "must not be empty",
                                                reason="CONSTRAINT_INVALID")
        size = sum(len(option) for option in constraint.choices)
    else:
        size = len(constraint.text)
        if kind is not ConstraintKind.JSON_OBJECT and not constraint.text:
            raise _refusal(kind, "CONSTRAINT_INVALID", "must not be empty")
    if size > MAX_CONSTRAINT_CHARS:
        raise _refusal(kind, "CONSTRAINT_TOO_COMPLEX",
                       f"{size} characters exceeds the limit of {MAX_CONSTRAINT_CHARS}")


def grammar_text(constraint: Constraint) -> str:
    """The llguidance grammar for a constraint (not yet checked against a tokenizer)."""
    kind = constraint.kind
    try:
        if kind is ConstraintKind.JSON_SCHEMA:
            return llguidance.LLMatcher.grammar_from_json_schema(constraint.text, defaults=_JSON_OPTIONS)
        if kind is ConstraintKind.JSON_OBJECT:
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=_JSON_OPTIONS)
        if kind is ConstraintKind.REGEX:
            return llguidance.LLMatcher.grammar_from_regex(constraint.text)
        if kind is ConstraintKind.GRAMMAR:
            return llguidance.grammar_from("grammar", constraint.text)  # Lark, or GBNF converted to it
        return llguidance.grammar_from("choice", json.dumps(list(constraint.choices)))
    except ValueError as exc:  # not JSON, or GBNF that does not convert
        raise _classify(kind, str(exc)) from None


@dataclass
class _Compilation:
    """One constraint's compilation, shared by every request that sends the same content."""

    future: Future[CompiledGrammar] = field(default_factory=Future)  # resolved by the compiling thread
    started_at: float | None = None  # set by the compiling thread: time in the queue is not the grammar's fault


@dataclass(frozen=True)
class CompiledGrammar:
    """A matcher in its start state, copied for each turn, and the start state's mask."""

    matcher: llguidance.LLMatcher
    first_mask: np.ndarray  # bool [vocab]


class RowGrammar:
    """One turn's matcher. Used by one thread at a time: the scheduler thread consumes a
    token, then the mask pool computes the next mask, which the sampler waits for."""

    def __init__(self, matcher: llguidance.LLMatcher, first_mask: np.ndarray, pool: ThreadPoolExecutor,
                 kind: ConstraintKind) -> None:
        self._matcher = matcher
        self._pool = pool
        self._kind = kind
        self._vocab_size = first_mask.shape[0]
        self._next: Future[np.ndarray | None] | None = None
        self._mask: np.ndarray | None = first_mask
        self.failure: InvalidArgument | None = None

    def allowed(self) -> np.ndarray | None:
        """The tokens allowed next (bool [vocab]); None once the matcher failed (see `failure`)."""
        if self._next is not None:
            self._mask, self._next = self._next.result(), None
        return self._mask if self.failure is None else None

    def advance(self, token_id: int) -> bool:
        """Consumes a sampled token; True when the grammar is complete (nothing may follow).
        Otherwise the next mask starts computing at once, overlapping the next forward."""
        if not self._matcher.consume_token(token_id):
            self._fail()
            return False
        if self._matcher.is_stopped():
            return True
        self._next = self._pool.submit(self._compute_mask)
        return False

    def _compute_mask(self) -> np.ndarray | None:
        try:
            bits = self._matcher.compute_bitmask()  # llguidance releases the GIL here
        except Exception as exc:  # API misuse only (llguidance reports grammar trouble as state)
            logger.exception("grammar mask failed")
            self.failure = _refusal(self._kind, "CONSTRAINT_TOO_COMPLEX", f"failed while generating: {exc}")
            return None
        if self._matcher.is_error():
            self._fail()
            return None
        mask = unpack_mask(bits, self._vocab_size)
        if not mask.any():
            self._fail()
            return None
        return mask

    def _fail(self) -> None:
        # Masks offer only tokens the grammar accepts, so what fails mid-generation is a limit.
        error = _describe(self._matcher.get_error()) or "the grammar allows no next token"
        self.failure = _refusal(self._kind, "CONSTRAINT_TOO_COMPLEX", f"failed while generating: {error}")


def unpack_mask(bits: bytes, vocab_size: int) -> np.ndarray:
    """llguidance's bitmask (bit i of 32-bit little-endian word i // 32 = token i) as bools."""
    return np.unpackbits(np.frombuffer(bits, dtype=np.uint8), count=vocab_size, bitorder="little").view(np.bool_)


class ConstraintCompiler:
    """One model's grammars: compiles (cached by content hash) and hands each turn a RowGrammar.

    The llguidance tokenizer is built from the model directory's tokenizer.json on the
    first constrained request, so models that never see one pay nothing.
    """

    def __init__(self, model_dir: Path, vocab_size: int, eos_token_ids: Sequence[int], *, mask_threads: int,
                 cache_entries: int = CACHE_ENTRIES, compile_timeout_s: float = COMPILE_TIMEOUT_S) -> None:
        self._model_dir = Path(model_dir)
        self._vocab_size = vocab_size
        self._eos_token_ids = list(eos_token_ids)
        self._cache_entries = cache_entries
        self._timeout_s = compile_timeout_s
        self._lock = threading.Lock()  # the cache
        self._tokenizer_lock = threading.Lock()  # building the tokenizer takes up to a second
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._tokenizer_error: str | None = None
        # Finished compilations (successes and refusals) and those in flight, by content hash.
        self._compiled: OrderedDict[str, _Compilation] = OrderedDict()
        self._compile_pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar-compile")
        self._mask_pool = ThreadPoolExecutor(max(1, mask_threads), thread_name_prefix="grammar-mask")

    async def start_row(self, constraint: Constraint) -> RowGrammar:
        """Compiles (or finds cached) and returns a fresh row; raises InvalidArgument naming
        the field when the constraint is malformed, unsupported or too expensive."""
        check_constraint(constraint)
        compiling = self._compilation(constraint)
        try:
            compiled = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(compiling.future)), self._timeout_s)
        except TimeoutError:
            if compiling.started_at is not None:
                # Running, not queued. Its own thread times it too and caches the verdict that
                # later requests get: a refusal only when compiling alone took too long.
                raise _refusal(constraint.kind, "CONSTRAINT_TOO_COMPLEX",
                               f"did not compile within {self._timeout_s:g}s") from None
            # Still queued behind other constraints: not this one's fault.
            raise ResourceExhausted(f"constraints are compiling for other requests; {FIELD} waited "
                                    f"{self._timeout_s:g}s for its turn", reason="CONSTRAINT_COMPILER_BUSY",
                                    retry_after_s=1.0) from None
        return RowGrammar(compiled.matcher.deep_copy(), compiled.first_mask, self._mask_pool, constraint.kind)

    def close(self) -> None:
        self._compile_pool.shutdown(wait=False, cancel_futures=True)
        self._mask_pool.shutdown(wait=False, cancel_futures=True)

    def _compilation(self, constraint: Constraint) -> _Compilation:
        key = _content_key(constraint)
        with self._lock:
            found = self._compiled.get(key)
            if found is not None:
                self._compiled.move_to_end(key)
                return found
            compiling = _Compilation()
            self._compile_pool.submit(self._compile_into, constraint, compiling)
            self._compiled[key] = compiling
            while len(self._compiled) > self._cache_entries:
                self._compiled.popitem(last=False)
            return compiling

    def _compile_into(self, constraint: Constraint, compiling: _Compilation) -> None:
        compiling.started_at = time.monotonic()
        try:
            compiling.future.set_result(self._compile(constraint, compiling.started_at))
        except BaseException as exc:  # a refusal (InvalidArgument), or a bug the caller reports as INTERNAL
            compiling.future.set_exception(exc)

    def _compile(self, constraint: Constraint, started: float) -> CompiledGrammar:
        tokenizer = self._llg_tokenizer(constraint.kind)
        grammar = grammar_text(constraint)
        limits = llguidance.LLParserLimits(max_lexer_states=_MAX_LEXER_STATES, verbose_errors=False)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=limits)
        if matcher.is_error():
            raise _classify(constraint.kind, matcher.get_error())
        probe = matcher.deep_copy()
        first_mask = unpack_mask(probe.compute_bitmask(), self._vocab_size)
        if probe.is_error():
            raise _classify(constraint.kind, probe.get_error())
        if not first_mask.any():
            raise _refusal(constraint.kind, "CONSTRAINT_INVALID", "no output of this model's tokens can match it")
        first_mask.flags.writeable = False  # shared by every row that starts from this grammar
        elapsed = time.monotonic() - started
        if elapsed > self._timeout_s:
            # The caller already got CONSTRAINT_TOO_COMPLEX; the cache must keep saying so.
            raise _refusal(constraint.kind, "CONSTRAINT_TOO_COMPLEX",
                           f"did not compile within {self._timeout_s:g}s")
        return CompiledGrammar(matcher, first_mask)

    def _llg_tokenizer(self, kind: ConstraintKind) -> llguidance.LLTokenizer:
        with self._tokenizer_lock:
            if self._tokenizer is None and self._tokenizer_error is None:
                try:
                    source = (self._model_dir / "tokenizer.json").read_text(encoding="utf-8")
                    self._tokenizer = llguidance.LLTokenizer(source, n_vocab=self._vocab_size,
                                                             eos_token=self._eos_token_ids or None)
                except (OSError, ValueError) as exc:
                    logger.warning("constrained decoding is unavailable for %s: %s", self._model_dir, exc)
                    self._tokenizer_error = str(exc)
            if self._tokenizer is None:
                raise InvalidArgument.for_field(
                    FIELD, f"this model's tokenizer cannot drive constrained decoding: {self._tokenizer_error}",
                    reason="CONSTRAINT_UNSUPPORTED")
            return self._tokenizer


def _content_key(constraint: Constraint) -> str:
    payload = json.dumps([constraint.kind.value, constraint.text, list(constraint.choices)])
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()
