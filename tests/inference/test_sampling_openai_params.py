"""The OpenAI-style sampling parameters (presence and frequency penalties, logit_bias, min_p,
min_tokens) against a straightforward numpy reference written from their definitions."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsuite.inference.engine.sampling import TokenSampler, candidate_distribution, choose_batch
from llmsuite.inference.engine.types import SamplingParams

VOCAB = 40
EOS = 3


def random_logits(seed: int, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(VOCAB) * scale).astype(np.float32)


def reference_adjusted(logits: np.ndarray, output: list[int], presence: float, frequency: float,
                       bias: dict[int, float]) -> np.ndarray:
    """OpenAI's documented formula, one token at a time."""
    expected = logits.astype(np.float64).copy()
    counts = Counter(output)
    for token in range(VOCAB):
        expected[token] -= counts[token] * frequency + (1.0 if counts[token] > 0 else 0.0) * presence
        expected[token] += bias.get(token, 0.0)
    return expected


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int, min_p: float) -> np.ndarray:
    """Probabilities over the whole vocabulary: softmax(logits / T), keep the top k, drop what is
    below min_p times the best, renormalize."""
    scaled = logits.astype(np.float64) / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    keep = np.ones(VOCAB, dtype=bool)
    if top_k:
        keep[np.argsort(-probs, kind="stable")[top_k:]] = False
    keep &= probs >= min_p * probs.max()
    kept = np.where(keep, probs, 0.0)
    return kept / kept.sum()


def as_dense(ids: np.ndarray, probs: np.ndarray) -> np.ndarray:
    dense = np.zeros(VOCAB)
    dense[ids] = probs
    return dense


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), presence=st.floats(-2, 2), frequency=st.floats(-2, 2),
       output=st.lists(st.integers(0, VOCAB - 1), max_size=30),
       bias=st.dictionaries(st.integers(0, VOCAB - 1), st.floats(-100, 100), max_size=6))
def test_penalties_and_bias_match_the_openai_formula(seed: int, presence: float, frequency: float, output: list[int],
                                                     bias: dict[int, float]) -> None:
    logits = random_logits(seed)
    params = SamplingParams(temperature=0.0, presence_penalty=presence, frequency_penalty=frequency,
                            logit_bias=tuple(sorted(bias.items())))
    sampler = TokenSampler(params, VOCAB)
    # Feed the output through the sampler as if it had chosen it: a logit row that forces each token.
    for token in output:
        forcing = np.full(VOCAB, -1e4, dtype=np.float32)
        forcing[token] = 1e4
        assert sampler.choose(forcing).token_id == token
    untouched = logits.copy()
    adjusted = sampler.adjusted_logits(logits)
    np.testing.assert_array_equal(logits, untouched)  # the batch's logits are never written
    np.testing.assert_allclose(adjusted, reference_adjusted(logits, output, presence, frequency, bias),
                               rtol=1e-5, atol=1e-3)


def test_the_prompt_does_not_count_for_presence_or_frequency() -> None:
    logits = random_logits(1)
    sampler = TokenSampler(SamplingParams(presence_penalty=2.0, frequency_penalty=2.0), VOCAB,
                           context_token_ids=range(VOCAB))
    np.testing.assert_array_equal(sampler.adjusted_logits(logits), logits)


def test_a_frequency_penalty_steers_greedy_away_from_repeats() -> None:
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[7], logits[8] = 1.0, 0.5
    plain = TokenSampler(SamplingParams(temperature=0.0), VOCAB)
    penalized = TokenSampler(SamplingParams(temperature=0.0, frequency_penalty=0.6), VOCAB)
    assert [plain.choose(logits).token_id for _ in range(3)] == [7, 7, 7]
    # 7 (1.0) then 8 (0.5 > 1.0 - 0.6), then 7 again (0.4 > 0.5 - 0.6).
    assert [penalized.choose(logits).token_id for _ in range(3)] == [7, 8, 7]


def test_a_logit_bias_of_100_forces_and_of_minus_100_bans() -> None:
    logits = random_logits(2)
    best = int(np.argmax(logits))
    forced = TokenSampler(SamplingParams(temperature=1.0, seed=5, logit_bias=((11, 100.0),)), VOCAB)
    assert {forced.choose(logits).token_id for _ in range(50)} == {11}
    banned = TokenSampler(SamplingParams(temperature=0.0, logit_bias=((best, -100.0),)), VOCAB)
    assert banned.choose(logits).token_id != best


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), temperature=st.sampled_from([0.3, 1.0, 2.5]),
       top_k=st.sampled_from([0, 1, 5, 20]), min_p=st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]))
def test_min_p_distribution_matches_the_reference(seed: int, temperature: float, top_k: int, min_p: float) -> None:
    logits = random_logits(seed)
    ids, probs = candidate_distribution(logits, temperature, top_k, 1.0, min_p)
    np.testing.assert_allclose(as_dense(ids, probs), reference_distribution(logits, temperature, top_k, min_p),
                               atol=1e-5)


def test_min_p_samples_stay_above_the_threshold() -> None:
    logits = random_logits(3, scale=1.0)
    probs = np.exp(logits - logits.max())
    allowed = set(np.flatnonzero(probs >= 0.3).tolist())
    draws = {TokenSampler(SamplingParams(seed=seed, min_p=0.3), VOCAB).choose(logits).token_id
             for seed in range(400)}
    assert draws == allowed  # every allowed token is drawn at least once in 400, and nothing else


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_holds_back_the_stop_ids_until_reached(temperature: float) -> None:
    logits = np.zeros(VOCAB, dtype=np.float32)
    logits[EOS] = 50.0  # the model wants to stop at once
    logits[9] = 10.0
    params = SamplingParams(temperature=temperature, seed=1, min_tokens=3)
    sampler = TokenSampler(params, VOCAB, stop_token_ids=(EOS, 20))
    chosen = [sampler.choose(logits).token_id for _ in range(4)]
    assert EOS not in chosen[:3] and 20 not in chosen[:3]
    assert chosen[3] == EOS


def test_min_tokens_lets_a_row_end_when_the_grammar_allows_only_a_stop_id() -> None:
    class OnlyEos:
        def allowed(self) -> np.ndarray:
            mask = np.zeros(VOCAB, dtype=bool)
            mask[EOS] = True
            return mask

    sampler = TokenSampler(SamplingParams(temperature=0.0, min_tokens=5), VOCAB, grammar=OnlyEos(),
                           stop_token_ids=(EOS,))
    assert sampler.choose(random_logits(4)).token_id == EOS


def test_greedy_rows_with_min_tokens_join_the_fast_path_once_reached() -> None:
    sampler = TokenSampler(SamplingParams(temperature=0.0, min_tokens=2), VOCAB, stop_token_ids=(EOS,))
    logits = random_logits(5)
    logits[EOS] = 99.0
    assert not sampler.plain_greedy
    assert [token.token_id for token in choose_batch([sampler], logits[None, :])] != [EOS]
    sampler.choose(logits)
    assert sampler.plain_greedy
    assert choose_batch([sampler], logits[None, :])[0] == TokenSampler(SamplingParams(temperature=0.0), VOCAB
                                                                       ).choose(logits)
    for params in (SamplingParams(temperature=0.0, presence_penalty=0.5), SamplingParams(temperature=0.0,
                   frequency_penalty=-0.5), SamplingParams(temperature=0.0, logit_bias=((1, 2.0),))):
        assert not TokenSampler(params, VOCAB).plain_greedy


def test_each_row_of_a_batch_keeps_its_own_settings() -> None:
    """Rows with different penalties, biases, min_p and min_tokens, next to plain greedy rows,
    pick exactly what their sampler picks alone."""
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((6, VOCAB)).astype(np.float32)
    settings_per_row = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5),
        SamplingParams(temperature=0.8, seed=3, logit_bias=((2, 5.0), (4, -100.0))),
        SamplingParams(temperature=1.2, seed=4, min_p=0.2, top_k=10),
        SamplingParams(temperature=0.0, min_tokens=4),
        SamplingParams(temperature=0.0),
    ]
    batched = [TokenSampler(p, VOCAB, stop_token_ids=(EOS,)) for p in settings_per_row]
    alone = [TokenSampler(p, VOCAB, stop_token_ids=(EOS,)) for p in settings_per_row]
    for step in range(6):
        step_logits = logits + step  # a shift keeps argmax but changes nothing else that matters
        step_logits[:, EOS] += 3.0
        together = choose_batch(batched, step_logits)
        for row, sampler in enumerate(alone):
            assert together[row] == sampler.choose(step_logits[row])
