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

from collections.abc import Iterable

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
    shifted = logits.astype(np.float64) - np.max(logits)
    return shifted - np.log(np.sum(np.exp(shifted)))


def candidate_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Returns (token ids, probabilities) that sampling draws from, after temperature, top-k, top-p.

    top_p keeps the smallest set of most likely tokens whose probability reaches top_p
    (always at least one). Ids come in descending probability order.
    """
    vocab = logits.shape[0]
    if 0 < top_k < vocab:
        candidates = np.argpartition(-logits, top_k - 1)[:top_k]
    else:
        candidates = np.arange(vocab)
    scaled = logits[candidates].astype(np.float64) / temperature
    order = np.argsort(-scaled, kind="stable")
    candidates, scaled = candidates[order], scaled[order]
    probs = np.exp(scaled - scaled[0])
    probs /= probs.sum()
    if top_p < 1.0:
        # Keep a token while the mass before it is still short of top_p.
        mass_before = np.cumsum(probs) - probs
        keep = int(np.count_nonzero(mass_before < top_p))
        candidates, probs = candidates[:keep], probs[:keep] / probs[:keep].sum()
    return candidates, probs


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

    def choose(self, logits: np.ndarray) -> GeneratedToken:
        """Samples one token from a row of raw logits and records it as seen."""
        params = self.params
        adjusted = apply_repetition_penalty(logits, self._seen, params.repetition_penalty)
        if params.temperature == 0.0:
            token_id = int(np.argmax(adjusted))
        else:
            candidates, probs = candidate_distribution(adjusted, params.temperature, params.top_k, params.top_p)
            cumulative = np.cumsum(probs)
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
