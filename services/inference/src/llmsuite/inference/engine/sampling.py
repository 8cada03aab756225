"""Choosing the next token from a row of logits, in numpy.

The order is Hugging Face's: repetition penalty, then (unless greedy) temperature,
top-k and top-p, then one draw from the remaining distribution. Each turn owns a
`TokenSampler` with its own numpy Generator, so a seed reproduces a turn's tokens no
matter what other requests run beside it.

Reported logprobs are log-softmax of the model's raw logits, before the penalty,
temperature and filters: they describe the model, not the sampling settings, which is
what callers comparing or scoring continuations need.

A row whose logits cannot give a distribution (a NaN or +inf anywhere, or nothing but
-inf, from the model itself or from a penalty or temperature that overflowed float32)
yields `NonFiniteLogits` for that row instead of a token; the other rows are untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from llmsuite.inference.engine.types import GeneratedToken, SamplingParams, TokenLogprob


class NonFiniteLogits(ArithmeticError):
    """A row's logits (raw, or after penalty and temperature) hold NaN or +inf, or only -inf."""


def _describe(peak: float) -> str:
    if np.isnan(peak):
        return "NaN"
    return "+inf" if peak > 0 else "only -inf"


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF semantics: for tokens already seen, divide positive logits and multiply negative ones."""
    if penalty == 1.0 or not seen.any():
        return logits
    penalized = logits.copy()
    values = penalized[seen]
    with np.errstate(over="ignore"):  # an overflow is caught where it matters: NonFiniteLogits
        penalized[seen] = np.where(values > 0, values / penalty, values * penalty)
    return penalized


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, in float32 (numpy's pairwise sums keep 150k-entry rows accurate)."""
    x = logits.astype(np.float32, copy=False)
    shifted: np.ndarray = x - np.max(x, axis=-1, keepdims=True)
    normalized: np.ndarray = shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))
    return normalized


def candidate_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Returns (token ids, probabilities) that sampling draws from, after temperature, top-k, top-p.

    top_p keeps the smallest set of most likely tokens whose probability reaches top_p
    (always at least one), renormalized within top-k when both are set (Hugging Face's
    order); those ids come in descending probability order, ties by lower id. Without
    top_p the ids come in ascending id order: drawing needs a fixed order, not a sorted one.
    """
    ids, weights = _candidate_weights(logits, temperature, top_k, top_p)
    return ids, weights / weights.sum(dtype=np.float32)


def _candidate_weights(logits: np.ndarray, temperature: float, top_k: int, top_p: float
                       ) -> tuple[np.ndarray, np.ndarray]:
    """candidate_distribution's ids with unnormalized float32 weights.

    No full sort of the vocabulary: top-k is an argpartition, and top-p sorts only tokens
    heavy enough to possibly be in the nucleus (when the tokens below a weight w hold less
    than 1 - top_p of the mass, none of them is needed).
    """
    vocab = logits.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):  # checked below, as one scalar
        scaled = logits.astype(np.float32) / np.float32(temperature)
    if 0 < top_k < vocab:
        pool = np.sort(np.argpartition(-scaled, top_k - 1)[:top_k])
        scaled = scaled[pool]
    else:
        pool = None
    peak = scaled.max()  # NaN anywhere makes it NaN: one scalar check covers the whole row
    if not np.isfinite(peak):
        raise NonFiniteLogits(f"logits after temperature {temperature:g} hold {_describe(float(peak))}")
    # Every weight is now in [0, 1] and the peak's is 1: the sum is >= 1 and the nucleus never empty.
    weights = np.exp(scaled - peak)
    if top_p < 1.0:
        total = weights.sum(dtype=np.float64)
        heavy = np.flatnonzero(weights >= (1.0 - top_p) * total / weights.shape[0])
        ranked = heavy[np.argsort(-weights[heavy], kind="stable")]  # heavy is in id order: ties by id
        ranked_weights = weights[ranked]
        mass_before = (np.cumsum(ranked_weights, dtype=np.float64) - ranked_weights) / total
        keep = max(1, int(np.count_nonzero(mass_before < top_p)))
        chosen = ranked[:keep]
        return (pool[chosen] if pool is not None else chosen), ranked_weights[:keep]
    return (pool if pool is not None else np.arange(vocab)), weights


class AllowedTokens(Protocol):
    """A constrained row's grammar (engine/constraints.py): which tokens may come next."""

    def allowed(self) -> np.ndarray | None:
        """bool [vocab]; None when the grammar failed (the row ends before this token counts)."""


class TokenSampler:
    """Picks the tokens of one turn; remembers what it has seen for the repetition penalty.

    With a `grammar`, tokens it disallows are set to -inf after the penalty, before
    temperature and filtering (greedy too), so only a token it allows can be drawn.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, context_token_ids: Iterable[int] = (),
                 grammar: AllowedTokens | None = None) -> None:
        self.params = params
        self.grammar = grammar
        # PCG64(None) draws a fresh seed from the OS: unseeded turns differ from each other.
        self._rng = np.random.Generator(np.random.PCG64(params.seed))
        self._seen = np.zeros(vocab_size, dtype=bool)
        if params.repetition_penalty != 1.0:
            self._seen[np.fromiter(context_token_ids, dtype=np.int64)] = True
        self._top_logprobs = params.top_logprobs
        self._wants_logprobs = params.logprobs or params.top_logprobs > 0
        # Plain greedy rows of a batch are served by one argmax over the batch.
        self.plain_greedy = (params.temperature == 0.0 and params.repetition_penalty == 1.0
                             and not self._wants_logprobs and grammar is None)

    def choose(self, logits: np.ndarray) -> GeneratedToken:
        """Samples one token from a row of raw logits and records it as seen; raises
        NonFiniteLogits when the row cannot give a distribution."""
        params = self.params
        adjusted = apply_repetition_penalty(logits, self._seen, params.repetition_penalty)
        allowed = self.grammar.allowed() if self.grammar is not None else None
        if allowed is not None:
            adjusted = np.where(allowed, adjusted, np.float32(-np.inf))
        if params.temperature == 0.0:
            token_id = int(np.argmax(adjusted))  # argmax picks a NaN when there is one
            peak = float(adjusted[token_id])
            if not np.isfinite(peak):
                raise NonFiniteLogits(f"logits after the repetition penalty hold {_describe(peak)}")
        else:
            candidates, weights = _candidate_weights(adjusted, params.temperature, params.top_k, params.top_p)
            cumulative = np.cumsum(weights, dtype=np.float64)
            index = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
            token_id = int(candidates[min(index, len(candidates) - 1)])
        if params.repetition_penalty != 1.0:
            self._seen[token_id] = True
        if not self._wants_logprobs:
            return GeneratedToken(token_id)
        return self._with_logprobs(token_id, logits)

    def _with_logprobs(self, token_id: int, raw_logits: np.ndarray) -> GeneratedToken:
        logprobs = log_softmax(raw_logits)
        top: tuple[TokenLogprob, ...] = ()
        n = min(self._top_logprobs, logprobs.shape[0])
        if n:
            best = np.argpartition(-logprobs, n - 1)[:n]
            best = best[np.lexsort((best, -logprobs[best]))]
            top = tuple(TokenLogprob(int(i), float(logprobs[i])) for i in best)
        return GeneratedToken(token_id, float(logprobs[token_id]), top)


def choose_batch(samplers: Sequence[TokenSampler], logits: np.ndarray,
                 pool: ThreadPoolExecutor | None = None) -> list[GeneratedToken | NonFiniteLogits]:
    """One token per row of `logits` [rows, vocab], row r drawn by samplers[r]; a row whose
    logits cannot give a distribution gets NonFiniteLogits instead, and no other row notices.

    One argmax over the whole batch serves both the plain greedy rows (the common serving
    case) and the numeric check: a row's argmax lands on a NaN if it has one, on +inf if it
    has one, and on -inf only when every entry is -inf, so the row's peak is finite exactly
    when the row is usable. The remaining rows run their own sampler, which keeps per-row
    seeds, penalties and logprobs independent of whatever else is in the batch. Those rows
    run on `pool` when given: numpy releases the GIL, and the cores are idle between forwards.
    """
    rows = len(samplers)
    picks = np.argmax(logits, axis=1)
    peaks = logits[np.arange(rows), picks]
    usable = np.isfinite(peaks)
    tokens: list[GeneratedToken | NonFiniteLogits | None] = [None] * rows
    for row in np.flatnonzero(~usable).tolist():
        tokens[row] = NonFiniteLogits(f"the model's logits hold {_describe(float(peaks[row]))}")
    for row, (token_id, ok) in enumerate(zip(picks.tolist(), usable.tolist(), strict=True)):
        if ok and samplers[row].plain_greedy:
            tokens[row] = GeneratedToken(int(token_id))
    other_rows = [row for row, token in enumerate(tokens) if token is None]

    def choose(row: int) -> GeneratedToken | NonFiniteLogits:
        try:
            return samplers[row].choose(logits[row])
        except NonFiniteLogits as exc:  # finite logits that a penalty or temperature overflowed
            return exc

    if pool is not None and len(other_rows) > 1:
        for row, token in zip(other_rows, pool.map(choose, other_rows), strict=True):
            tokens[row] = token
    else:
        for row in other_rows:
            tokens[row] = choose(row)
    return tokens  # type: ignore[return-value]
