"""Choosing the next token from a row of logits, in numpy.

The order, on one row's logits:
1. the repetition penalty (Hugging Face's: multiplicative, over prompt and output);
2. OpenAI's presence and frequency penalties (additive, over this turn's output only,
   as OpenAI and vLLM count them);
3. logit_bias, added last among the logit edits so a caller's explicit bias is exactly
   what it says whatever penalties ran;
4. the masks: the grammar's allowed tokens, and while fewer than min_tokens were
   generated, the stop ids (unless the grammar allows nothing else: a finished grammar
   must still be able to end);
5. greedy: argmax. Otherwise temperature, top-k, min_p, top-p (min_p and top-k commute,
   as both compare against the most likely token, which each keeps), then one draw.

Each turn owns a `TokenSampler` with its own numpy Generator, so a seed reproduces a
turn's tokens no matter what other requests run beside it.

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


def apply_openai_penalties(logits: np.ndarray, output_counts: dict[int, int], presence: float,
                           frequency: float) -> np.ndarray:
    """OpenAI semantics: logit[j] -= frequency * count[j] + presence * (count[j] > 0), where
    count[j] is how often j occurs in the output so far. Returns a new array when it changes any."""
    if not output_counts or (presence == 0.0 and frequency == 0.0):
        return logits
    ids = np.fromiter(output_counts.keys(), dtype=np.int64, count=len(output_counts))
    counts = np.fromiter(output_counts.values(), dtype=np.float32, count=len(output_counts))
    penalized = logits.copy()
    penalized[ids] -= np.float32(frequency) * counts + np.float32(presence)
    return penalized


def apply_logit_bias(logits: np.ndarray, bias_ids: np.ndarray, bias_values: np.ndarray) -> np.ndarray:
    """logit[id] += bias for each pair; a new array when there is any pair."""
    if not bias_ids.size:
        return logits
    biased = logits.copy()
    biased[bias_ids] += bias_values
    return biased


def candidate_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float = 0.0
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Returns (token ids, probabilities) that sampling draws from, after temperature, top-k,
    min_p and top-p.

    min_p drops tokens whose probability is below min_p times the most likely one's. top_p
    keeps the smallest set of most likely tokens whose probability reaches top_p (always at
    least one), renormalized within what top-k and min_p kept (Hugging Face's order); those
    ids come in descending probability order, ties by lower id. Without top_p the ids come
    in ascending id order: drawing needs a fixed order, not a sorted one.
    """
    ids, weights = _candidate_weights(logits, temperature, top_k, top_p, min_p)
    return ids, weights / weights.sum(dtype=np.float32)


def _candidate_weights(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float = 0.0
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
    if min_p > 0.0:
        # A weight is the token's probability over the peak's, so min_p compares against it directly.
        kept = np.flatnonzero(weights >= np.float32(min_p))
        pool = pool[kept] if pool is not None else kept
        weights = weights[kept]
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
    """Picks the tokens of one turn; remembers what it has seen for the penalties.

    With a `grammar`, tokens it disallows are set to -inf after the penalties and the bias,
    before temperature and filtering (greedy too), so only a token it allows can be drawn.
    While fewer than params.min_tokens tokens were chosen, `stop_token_ids` (the turn's
    stop ids, eos included unless ignore_eos) are masked the same way.
    """

    def __init__(self, params: SamplingParams, vocab_size: int, context_token_ids: Iterable[int] = (),
                 grammar: AllowedTokens | None = None, stop_token_ids: Iterable[int] = ()) -> None:
        self.params = params
        self.grammar = grammar
        # PCG64(None) draws a fresh seed from the OS: unseeded turns differ from each other.
        self._rng = np.random.Generator(np.random.PCG64(params.seed))
        self._seen = np.zeros(vocab_size, dtype=bool)
        if params.repetition_penalty != 1.0:
            self._seen[np.fromiter(context_token_ids, dtype=np.int64)] = True
        self._counts_output = params.presence_penalty != 0.0 or params.frequency_penalty != 0.0
        self._output_counts: dict[int, int] = {}
        self._bias_ids = np.array([token_id for token_id, _ in params.logit_bias], dtype=np.int64)
        self._bias_values = np.array([bias for _, bias in params.logit_bias], dtype=np.float32)
        self._held_back = (np.array(sorted(set(stop_token_ids)), dtype=np.int64) if params.min_tokens
                           else np.zeros(0, dtype=np.int64))
        self._chosen = 0
        self._top_logprobs = params.top_logprobs
        self._wants_logprobs = params.logprobs or params.top_logprobs > 0
        self._greedy_as_is = (params.temperature == 0.0 and params.repetition_penalty == 1.0
                              and not self._counts_output and not self._bias_ids.size
                              and not self._wants_logprobs and grammar is None)

    @property
    def plain_greedy(self) -> bool:
        """Whether this row's next token is the argmax of its raw logits, so one argmax over
        the batch serves it (min_tokens holds a greedy row off that path only until reached)."""
        return self._greedy_as_is and self._chosen >= self.params.min_tokens

    def adjusted_logits(self, logits: np.ndarray) -> np.ndarray:
        """The row's logits after the penalties, the bias and the masks (steps 1-4 of the
        module docstring); `logits` itself is never written."""
        params = self.params
        adjusted = apply_repetition_penalty(logits, self._seen, params.repetition_penalty)
        adjusted = apply_openai_penalties(adjusted, self._output_counts, params.presence_penalty,
                                          params.frequency_penalty)
        adjusted = apply_logit_bias(adjusted, self._bias_ids, self._bias_values)
        allowed = self.grammar.allowed() if self.grammar is not None else None
        if allowed is not None:
            adjusted = np.where(allowed, adjusted, np.float32(-np.inf))
        if self._chosen < params.min_tokens and self._held_back.size:
            held = adjusted[self._held_back]
            masked = adjusted.copy() if adjusted is logits else adjusted
            masked[self._held_back] = -np.inf
            if np.isneginf(masked.max()):  # nothing but a stop id is allowed: let the row end
                masked[self._held_back] = held
            adjusted = masked
        return adjusted

    def choose(self, logits: np.ndarray) -> GeneratedToken:
        """Samples one token from a row of raw logits and records it as seen; raises
        NonFiniteLogits when the row cannot give a distribution."""
        params = self.params
        adjusted = self.adjusted_logits(logits)
        if params.temperature == 0.0:
            token_id = int(np.argmax(adjusted))  # argmax picks a NaN when there is one
            peak = float(adjusted[token_id])
            if not np.isfinite(peak):
                raise NonFiniteLogits(f"logits after the penalties hold {_describe(peak)}")
        else:
            candidates, weights = _candidate_weights(adjusted, params.temperature, params.top_k, params.top_p,
                                                     params.min_p)
            cumulative = np.cumsum(weights, dtype=np.float64)
            index = int(np.searchsorted(cumulative, self._rng.random() * cumulative[-1], side="right"))
            token_id = int(candidates[min(index, len(candidates) - 1)])
        self._chosen += 1
        if params.repetition_penalty != 1.0:
            self._seen[token_id] = True
        if self._counts_output:
            self._output_counts[token_id] = self._output_counts.get(token_id, 0) + 1
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
