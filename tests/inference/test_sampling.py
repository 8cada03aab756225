"""The numpy sampler on synthetic logits: filters, temperature, seeds, penalty, logprobs."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsuite.inference.engine.sampling import (
    NonFiniteLogits,
    TokenSampler,
    apply_repetition_penalty,
    candidate_distribution,
    choose_batch,
    log_softmax,
)
from llmsuite.inference.engine.types import SamplingParams

VOCAB = 50
DRAWS = 3000


def random_logits(seed: int, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(VOCAB) * scale).astype(np.float32)


def draw(logits: np.ndarray, n: int = DRAWS, context: tuple[int, ...] = (), **params: object) -> list[int]:
    """n independent first-token draws (fresh sampler per draw so penalty state does not build up)."""
    base = SamplingParams(**params)  # type: ignore[arg-type]
    seeds = np.random.default_rng(0).integers(2**32, size=n)
    return [TokenSampler(replace(base, seed=int(seed)), VOCAB, context).choose(logits).token_id for seed in seeds]


def entropy(samples: list[int]) -> float:
    counts = np.array(list(Counter(samples).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def test_temperature_zero_is_argmax() -> None:
    logits = random_logits(1)
    sampler = TokenSampler(SamplingParams(temperature=0.0), VOCAB)
    assert {sampler.choose(logits).token_id for _ in range(20)} == {int(np.argmax(logits))}


@pytest.mark.parametrize("seed", range(5))
def test_top_k_one_is_greedy(seed: int) -> None:
    logits = random_logits(seed)
    assert set(draw(logits, 200, temperature=5.0, top_k=1)) == {int(np.argmax(logits))}


def test_top_k_never_samples_outside_the_top_k() -> None:
    logits = random_logits(2, scale=0.3)  # nearly flat: every top-k token gets drawn
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert set(draw(logits, temperature=1.0, top_k=5)) == top5


def test_top_p_keeps_only_the_nucleus() -> None:
    probs = np.array([0.5, 0.3, 0.1, 0.05] + [0.05 / (VOCAB - 4)] * (VOCAB - 4))
    logits = np.log(probs).astype(np.float32)
    assert set(draw(logits, temperature=1.0, top_p=0.45)) == {0}
    assert set(draw(logits, temperature=1.0, top_p=0.75)) == {0, 1}
    nucleus = draw(logits, temperature=1.0, top_p=0.85)
    assert set(nucleus) == {0, 1, 2}
    # Renormalized inside the nucleus: 0.5 / 0.9 of the draws are token 0.
    assert nucleus.count(0) / len(nucleus) == pytest.approx(0.5 / 0.9, abs=0.03)


def test_sampling_frequencies_follow_the_tempered_softmax() -> None:
    logits = random_logits(3, scale=1.0)
    for temperature in (0.5, 1.0, 2.0):
        expected = np.exp(log_softmax(logits / temperature))
        counts = Counter(draw(logits, 6000, temperature=temperature))
        observed = np.array([counts[i] for i in range(VOCAB)]) / 6000
        assert np.abs(observed - expected).max() < 0.025


def test_higher_temperature_means_higher_entropy() -> None:
    logits = random_logits(4)
    cold, warm, hot = (entropy(draw(logits, temperature=t)) for t in (0.2, 1.0, 3.0))
    assert cold < warm - 0.3 and warm < hot - 0.3


def test_a_seed_reproduces_the_sequence() -> None:
    logits = [random_logits(seed) for seed in range(40)]

    def run(seed: int) -> list[int]:
        sampler = TokenSampler(SamplingParams(temperature=1.0, seed=seed), VOCAB)
        return [sampler.choose(row).token_id for row in logits]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_unseeded_samplers_differ() -> None:
    logits = random_logits(5, scale=0.1)
    assert len({TokenSampler(SamplingParams(), VOCAB).choose(logits).token_id for _ in range(30)}) > 1


def test_repetition_penalty_is_hf_semantics() -> None:
    logits = np.array([2.0, -2.0, 1.0, -1.0], dtype=np.float32)
    seen = np.array([True, True, False, False])
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 2.0), [1.0, -4.0, 1.0, -1.0])
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_repetition_penalty_steers_greedy_away_from_seen_tokens() -> None:
    logits = np.array([5.0, 4.0, 1.0] + [0.0] * (VOCAB - 3), dtype=np.float32)
    sampler = TokenSampler(SamplingParams(temperature=0.0, repetition_penalty=2.0), VOCAB, context_token_ids=[0])
    # 5/2 < 4: token 1 wins, then it is seen too: 4/2 < 2.5 so token 0 comes back.
    assert [sampler.choose(logits).token_id for _ in range(2)] == [1, 0]


def test_logprobs_come_from_raw_logits() -> None:
    logits = random_logits(6)
    expected = log_softmax(logits)
    params = SamplingParams(temperature=0.3, top_k=3, repetition_penalty=5.0, logprobs=True, top_logprobs=4, seed=1)
    token = TokenSampler(params, VOCAB, context_token_ids=[int(np.argmax(logits))]).choose(logits)
    assert token.logprob == pytest.approx(expected[token.token_id])
    assert [t.token_id for t in token.top_logprobs] == np.argsort(-expected)[:4].tolist()
    assert all(a.logprob >= b.logprob for a, b in zip(token.top_logprobs, token.top_logprobs[1:], strict=False))
    assert np.exp(expected).sum() == pytest.approx(1.0)


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    temperature=st.floats(0.05, 5.0),
    top_k=st.integers(0, VOCAB + 5),
    top_p=st.floats(0.01, 1.0),
)
def test_sampled_token_always_satisfies_the_filters(seed: int, temperature: float, top_k: int, top_p: float) -> None:
    logits = random_logits(seed)
    candidates, probs = candidate_distribution(logits, temperature, top_k, top_p)
    assert len(candidates) >= 1 and probs.sum() == pytest.approx(1.0)
    ranked = np.argsort(-logits, kind="stable")
    if 0 < top_k < VOCAB:
        assert set(candidates.tolist()) <= set(ranked[:top_k].tolist())
    # The candidates are a prefix of the ranking (in ranking order when top_p cut it) whose mass
    # before the last token is short of top_p.
    if top_p < 1.0:
        assert candidates.tolist() == ranked[: len(candidates)].tolist()
    else:
        assert sorted(candidates.tolist()) == sorted(ranked[: len(candidates)].tolist())
    full = np.exp(log_softmax(logits[ranked[: max(top_k, 0) or VOCAB]].astype(np.float64) / temperature))
    assert full[: len(candidates) - 1].sum() < top_p + 1e-6  # float32 sampler, float64 reference
    token = TokenSampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed), VOCAB)
    assert token.choose(logits).token_id in set(candidates.tolist())


# ---- logits that cannot give a distribution ----------------------------------------------------

ROW_SETTINGS = [
    SamplingParams(temperature=0.0),  # plain greedy: the batch's shared argmax
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=0.7, seed=3),
    SamplingParams(temperature=1.2, top_k=5, top_p=0.8, seed=4),
    SamplingParams(temperature=0.9, top_p=0.5, seed=6, logprobs=True, top_logprobs=3),
]


def fresh_samplers() -> list[TokenSampler]:
    return [TokenSampler(params, VOCAB, (1, 2, 3)) for params in ROW_SETTINGS]


def spoiled(row: np.ndarray, how: str) -> np.ndarray:
    row = row.copy()
    if how == "nan":
        row[11] = np.nan
    elif how == "+inf":
        row[11] = np.inf
    else:
        row[:] = -np.inf
    return row


@pytest.mark.parametrize("how, described", [("nan", "NaN"), ("+inf", "+inf"), ("all -inf", "only -inf")])
@pytest.mark.parametrize("bad_row", range(len(ROW_SETTINGS)))
def test_a_non_finite_row_ends_alone_and_every_other_row_draws_as_it_would_alone(bad_row: int, how: str,
                                                                                  described: str) -> None:
    logits = np.stack([random_logits(20 + r) for r in range(len(ROW_SETTINGS))])
    alone = [sampler.choose(logits[r]) for r, sampler in enumerate(fresh_samplers())]
    logits[bad_row] = spoiled(logits[bad_row], how)
    batch = choose_batch(fresh_samplers(), logits)
    for row, token in enumerate(batch):
        if row == bad_row:
            assert isinstance(token, NonFiniteLogits) and described in str(token)
        else:
            assert token == alone[row]


def test_minus_inf_on_some_tokens_is_a_mask_not_a_fault() -> None:
    logits = random_logits(30)
    logits[::2] = -np.inf
    for sampler in fresh_samplers():
        token = choose_batch([sampler], logits[None, :])[0]
        assert not isinstance(token, NonFiniteLogits) and token.token_id % 2 == 1


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-38, top_p=0.9, seed=1),  # values validation now refuses, sampled anyway
    SamplingParams(temperature=0.0, repetition_penalty=1e-45),
    SamplingParams(temperature=1.0, top_p=0.9, repetition_penalty=1e-45, seed=1),
], ids=["tiny-temperature", "tiny-penalty-greedy", "tiny-penalty-top-p"])
def test_overflowing_settings_raise_non_finite_logits_never_index_error(params: SamplingParams) -> None:
    logits = random_logits(40, scale=5.0)
    sampler = TokenSampler(params, VOCAB, tuple(range(VOCAB)))
    with pytest.raises(NonFiniteLogits):
        sampler.choose(logits)
    assert isinstance(choose_batch([sampler], logits[None, :])[0], NonFiniteLogits)
