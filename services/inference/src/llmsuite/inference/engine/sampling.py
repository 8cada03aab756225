"""Choosing the next token from a row of logits, in numpy.

The order is Hugging Face's: repetition penalty, then (unless greedy) temperature,
top-k and top-p, then one draw from the remaining distribution. Each turn owns a
`TokenSampler` with its own numpy Generator, so a seed reproduces a turn's tokens no
matter what other requests run beside it.

Reported logprobs are log-softmax of the model's raw logits, before the penalty,
temperature and filters: they describe the model, not the sampling settings, which is
what callers comparing or scoring continuations need.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from llmsuite.inference.engine.types import GeneratedToken, SamplingParams, TokenLogprob


def apply_repetition_penalty(logits: np.ndarray, seen: np.ndarray, penalty: float) -> np.ndarray:
    """HF semantics: for tokens already seen, divide positive logits and multiply negative ones."""
    if penalty == 1.0 or not seen.any():
        return logits
    penalized = logits.copy()
    values = penalized[seen]
    penalized[seen] = np.where(values > 0, values / penalty, values * penalty)
    return penalized


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Along the last axis, in float32 (numpy's pairwise sums keep 150k-entry rows accurate)."""
    x = logits.astype(np.float32, copy=False)
    shifted = x - np.max(x, axis=-1, keepdims=True)
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _descending(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """`ids` ordered by value, highest first, ties by lower id: the same order every run."""
    return ids[np.lexsort((ids, -values[ids]))]


# The nucleus search starts from this many most likely tokens and widens 4x until the kept
# mass reaches top_p, so a peaked distribution never sorts the whole vocabulary.
_NUCLEUS_FIRST_GUESS = 64


def candidate_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Returns (token ids, probabilities) that sampling draws from, after temperature, top-k, top-p.

    top_p keeps the smallest set of most likely tokens whose probability reaches top_p
    (always at least one), renormalized within top-k when both are set (Hugging Face's
    order). Ids come in descending probability order, ties by id. float32 throughout, and
    argpartition instead of a full sort: the cost is a few passes over the vocabulary.
    """
    vocab = logits.shape[0]
    scaled = logits.astype(np.float32) / np.float32(temperature)
    if 0 < top_k < vocab:
        pool = np.argpartition(-scaled, top_k - 1)[:top_k]
    else:
        pool = np.arange(vocab)
    weights = np.exp(scaled[pool] - scaled[pool].max())
    total = weights.sum(dtype=np.float64)
    probs = np.zeros(vocab, dtype=np.float32)
    probs[pool] = weights / np.float32(total)
    if top_p >= 1.0:
        candidates = _descending(pool, probs)
        return candidates, probs[candidates]
    guess = min(_NUCLEUS_FIRST_GUESS, len(pool))
    while True:
        if guess < len(pool):
            best = pool[np.argpartition(-probs[pool], guess - 1)[:guess]]
        else:
            best = pool
        ranked = _descending(best, probs)
        mass = np.cumsum(probs[ranked], dtype=np.float64)
        if mass[-1] >= top_p or guess >= len(pool):
            break
        guess = min(len(pool), guess * 4)
    # Keep a token while the mass before it is still short of top_p.
    keep = max(1, int(np.count_nonzero(mass - probs[ranked] < top_p)))
    candidates = ranked[:keep]
    kept = probs[candidates]
    return candidates, kept / kept.sum(dtype=np.float32)


class TokenSampler:
    """Picks the tokens of one turn; remembers what it has seen for the repetition penalty."""

    def __init__(self, params: SamplingParams, vocab_size: int, context_token_ids: Iterable[int] = ()) -> None:
        self.params = params
        # PCG64(None) draws a fresh seed from the OS: unseeded turns differ from each other.
        self._rng = np.random.Generator(np.random.PCG64(params.seed))
        self._seen = np.zeros(vocab_size, dtype=bool)
        if params.repetition_penalty != 1.0:
            self._seen[np.fromiter(context_token_ids, dtype=np.int64)] = True
        self._top_logprobs = params.top_logprobs
        self._wants_logprobs = params.logprobs or params.top_logprobs > 0
        # Plain greedy rows of a batch are served by one argmax over the batch.
        self.plain_greedy = (params.temperature == 0.0 and params.repetition_penalty == 1.0
                             and not self._wants_logprobs)

    def choose(self, logits: np.ndarray) -> GeneratedToken:
        """Samples one token from a row of raw logits and records it as seen."""
        params = self.params
        adjusted = apply_repetition_penalty(logits, self._seen, params.repetition_penalty)
        if params.temperature == 0.0:
            token_id = int(np.argmax(adjusted))
        else:
            candidates, probs = candidate_distribution(adjusted, params.temperature, params.top_k, params.top_p)
            cumulative = np.cumsum(probs, dtype=np.float64)
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


def choose_batch(samplers: Sequence[TokenSampler], logits: np.ndarray) -> list[GeneratedToken]:
    """One token per row of `logits` [rows, vocab], row r drawn by samplers[r].

    Plain greedy rows (the common serving case) share one vectorized argmax; the rest run
    their own sampler, which keeps per-row seeds, penalties and logprobs independent of
    whatever else is in the batch.
    """
    greedy_rows = [row for row, sampler in enumerate(samplers) if sampler.plain_greedy]
    tokens: list[GeneratedToken | None] = [None] * len(samplers)
    if greedy_rows:
        picks = np.argmax(logits[greedy_rows], axis=1)
        for row, token_id in zip(greedy_rows, picks.tolist(), strict=True):
            tokens[row] = GeneratedToken(int(token_id))
    for row, sampler in enumerate(samplers):
        if tokens[row] is None:
            tokens[row] = sampler.choose(logits[row])
    return tokens  # type: ignore[return-value]
