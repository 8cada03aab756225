"""Constrained decoding in the engine: outputs match their grammar, other rows do not notice.

The property: with the random-weight default model, every output that completes (its
grammar finished, or it chose an end-of-sequence id the grammar allowed) under a generated
JSON Schema parses and validates against that schema, alone and in batches mixed with
unconstrained rows, whose tokens stay exactly what they get alone.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from json_schemas import SCHEMAS, Schema, check_output

from llmsuite.inference.engine import (
    EngineSettings,
    FinishReason,
    InferenceEngine,
    SamplingParams,
    TurnResult,
    constraints,
)
from llmsuite.inference.engine.constraints import MAX_CONSTRAINT_CHARS
from llmsuite.inference.engine.types import Constraint, ConstraintKind
from llmsuite.runtime.errors import InvalidArgument, ResourceExhausted

PROMPT = (5, 17, 42, 9)
COMPLETE = (FinishReason.GRAMMAR, FinishReason.STOP)
PROPERTY = settings(max_examples=12, derandomize=True, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[InferenceEngine]:
    engine = InferenceEngine.load({"tiny": tiny_model_dir}, EngineSettings(device="cpu", intra_op_threads=1))
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


def schema_constraint(schema: Schema) -> Constraint:
    return Constraint(ConstraintKind.JSON_SCHEMA, json.dumps(schema))


async def generate(engine: InferenceEngine, params: SamplingParams, prompt: Sequence[int] = PROMPT
                   ) -> tuple[list[int], TurnResult]:
    session = engine.open_session("tiny", multi_turn=False)
    ids: list[int] = []
    try:
        async for item in session.generate(prompt, params):
            if isinstance(item, TurnResult):
                return ids, item
            ids.append(item.token_id)
    finally:
        session.close()
    raise AssertionError("the stream ended without a TurnResult")


def run_all(engine: InferenceEngine, requests: Sequence[SamplingParams]) -> list[tuple[list[int], TurnResult]]:
    """Submits every request at once, so they share prefill and decode forwards."""

    async def together() -> list[tuple[list[int], TurnResult]]:
        return list(await asyncio.gather(*(generate(engine, params) for params in requests)))

    return asyncio.run(together())


def text_of(tokenizer: tokenizers.Tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def constrained(schema: Schema, seed: int | None, max_new_tokens: int = 160) -> SamplingParams:
    temperature = 0.0 if seed is None else 1.0
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                          constraint=schema_constraint(schema))


@PROPERTY
@given(schema=SCHEMAS)
def test_every_completed_output_validates_against_its_schema(engine: InferenceEngine,
                                                             tokenizer: tokenizers.Tokenizer, schema: Schema) -> None:
    results = run_all(engine, [constrained(schema, seed) for seed in (None, 0, 1, 2)])
    completed = [(ids, result) for ids, result in results if result.finish_reason in COMPLETE]
    assert completed, f"no output completed for {schema}: {[r.finish_reason for _, r in results]}"
    for ids, result in completed:
        check_output(text_of(tokenizer, ids), schema)
        if result.finish_reason is FinishReason.GRAMMAR:
            assert result.matched_stop_token_id is None
    for _ids, result in results:
        assert result.finish_reason in (*COMPLETE, FinishReason.LENGTH)


UNCONSTRAINED = [SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True),
                 SamplingParams(max_new_tokens=30, temperature=0.9, seed=11, ignore_eos=True),
                 SamplingParams(max_new_tokens=18, temperature=1.0, top_k=40, seed=5, ignore_eos=True, logprobs=True)]


@pytest.fixture(scope="module")
def unconstrained_alone(engine: InferenceEngine) -> list[list[int]]:
    return [asyncio.run(generate(engine, params))[0] for params in UNCONSTRAINED]


@settings(PROPERTY, max_examples=6)
@given(schema=SCHEMAS)
def test_mixed_batches_leave_unconstrained_rows_alone(engine: InferenceEngine, tokenizer: tokenizers.Tokenizer,
                                                       unconstrained_alone: list[list[int]], schema: Schema) -> None:
    constrained_rows = [constrained(schema, seed) for seed in (None, 3)]
    alone = [asyncio.run(generate(engine, params))[0] for params in constrained_rows]
    mixed = run_all(engine, [*UNCONSTRAINED, *constrained_rows])
    assert [ids for ids, _ in mixed[:len(UNCONSTRAINED)]] == unconstrained_alone
    assert [ids for ids, _ in mixed[len(UNCONSTRAINED):]] == alone
    for ids, result in mixed[len(UNCONSTRAINED):]:
        if result.finish_reason in COMPLETE:
            check_output(text_of(tokenizer, ids), schema)


def test_json_object_regex_choice_and_grammars(engine: InferenceEngine, tokenizer: tokenizers.Tokenizer) -> None:
    cases = [
        (Constraint(ConstraintKind.REGEX, r"[0-9]{3}-[a-z]{2,5}"),
         lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", text) is not None),
        (Constraint(ConstraintKind.CHOICE, choices=("yes", "no", 'say "maybe"\n')),
         lambda text: text in ("yes", "no", 'say "maybe"\n')),
        (Constraint(ConstraintKind.GRAMMAR, 'start: "(" /[a-c]{0,6}/ ")"'),
         lambda text: re.fullmatch(r"\([a-c]{0,6}\)", text) is not None),
        (Constraint(ConstraintKind.GRAMMAR, 'root ::= "<" [xy]+ ">"\n'),  # GBNF
         lambda text: re.fullmatch(r"<[xy]+>", text) is not None),
    ]
    for constraint, accepts in cases:
        requests = [SamplingParams(max_new_tokens=64, temperature=1.0, seed=seed, constraint=constraint)
                    for seed in range(4)]
        completed = [text_of(tokenizer, ids) for ids, result in run_all(engine, requests)
                     if result.finish_reason in COMPLETE]
        assert completed, constraint
        for text in completed:
            assert accepts(text), (constraint, text)


def test_json_object_writes_an_object(engine: InferenceEngine, tokenizer: tokenizers.Tokenizer) -> None:
    # Free keys and strings: a random model seldom closes them, so the prefix is checked too.
    requests = [SamplingParams(max_new_tokens=48, temperature=1.0, seed=seed,
                               constraint=Constraint(ConstraintKind.JSON_OBJECT)) for seed in range(4)]
    for ids, result in run_all(engine, requests):
        text = text_of(tokenizer, ids)
        assert text.startswith("{")
        if result.finish_reason in COMPLETE:
            assert isinstance(json.loads(text), dict)
        else:
            assert result.finish_reason is FinishReason.LENGTH


def test_a_grammar_that_is_complete_ends_the_turn_without_another_token(engine: InferenceEngine,
                                                                       tokenizer: tokenizers.Tokenizer) -> None:
    params = SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True,
                            constraint=Constraint(ConstraintKind.CHOICE, choices=("abc",)))
    ids, result = asyncio.run(generate(engine, params))
    assert text_of(tokenizer, ids) == "abc"
    assert result.finish_reason is FinishReason.GRAMMAR
    assert result.usage.completion_tokens == len(ids) < 50


def test_max_new_tokens_returns_the_prefix_so_far(engine: InferenceEngine, tokenizer: tokenizers.Tokenizer) -> None:
    schema = {"type": "object", "properties": {"text": {"type": "string", "minLength": 40}}, "required": ["text"]}
    ids, result = asyncio.run(generate(engine, constrained(schema, seed=None, max_new_tokens=12)))
    assert result.finish_reason is FinishReason.LENGTH and len(ids) == 12
    assert text_of(tokenizer, ids).startswith('{"text":"')


@pytest.mark.parametrize(("constraint", "field", "reason"), [
    (Constraint(ConstraintKind.JSON_SCHEMA, "{not json"), "sampling.constraint.json_schema", "CONSTRAINT_INVALID"),
    (Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "nope"}'), "sampling.constraint.json_schema",
     "CONSTRAINT_INVALID"),
    (Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "object", "not": {"required": ["a"]}}'),
     "sampling.constraint.json_schema", "CONSTRAINT_UNSUPPORTED"),
    (Constraint(ConstraintKind.JSON_SCHEMA, json.dumps({"enum": ["x" * MAX_CONSTRAINT_CHARS]})),
     "sampling.constraint.json_schema", "CONSTRAINT_TOO_COMPLEX"),
    (Constraint(ConstraintKind.JSON_SCHEMA, "[" * 300 + "]" * 300), "sampling.constraint.json_schema",
     "CONSTRAINT_TOO_COMPLEX"),
    (Constraint(ConstraintKind.REGEX, "(unclosed"), "sampling.constraint.regex", "CONSTRAINT_INVALID"),
    (Constraint(ConstraintKind.GRAMMAR, "start: undefined_rule"), "sampling.constraint.grammar",
     "CONSTRAINT_INVALID"),
    (Constraint(ConstraintKind.CHOICE), "sampling.constraint.choice", "CONSTRAINT_INVALID"),
    (Constraint(ConstraintKind.CHOICE, choices=("a", "")), "sampling.constraint.choice.options[1]",
     "CONSTRAINT_INVALID"),
])
def test_bad_constraints_are_refused_naming_the_field(engine: InferenceEngine, constraint: Constraint, field: str,
                                                      reason: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        asyncio.run(generate(engine, SamplingParams(constraint=constraint)))
    assert refused.value.reason == reason
    assert [v.field for v in refused.value.violations] == [field]
    # The engine still serves: a refusal holds no row and no lock.
    ids, result = asyncio.run(generate(engine, SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)))
    assert len(ids) == 3 and result.finish_reason is FinishReason.LENGTH


def test_a_refused_schema_is_refused_again_from_the_cache(engine: InferenceEngine) -> None:
    bad = Constraint(ConstraintKind.JSON_SCHEMA, '{"type": "object", "properties": {"a": {"$ref": "#/nope"}}}')
    for _ in range(2):
        with pytest.raises(InvalidArgument) as refused:
            asyncio.run(generate(engine, SamplingParams(constraint=bad)))
        assert refused.value.reason == "CONSTRAINT_INVALID"


def test_compile_time_is_bounded_and_the_verdict_is_cached(tiny_model_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Two compilations stuck past the timeout fill the compile threads: their callers get
    CONSTRAINT_TOO_COMPLEX, one queued behind them CONSTRAINT_COMPILER_BUSY (retryable), and
    once they end, the verdicts their own threads measured are what later requests get."""
    release, entered = threading.Event(), threading.Semaphore(0)
    real_grammar_text = constraints.grammar_text

    def slow_grammar_text(constraint: Constraint) -> str:
        if constraint.text.startswith("slow"):
            entered.release()
            release.wait()
        return real_grammar_text(constraint)

    monkeypatch.setattr(constraints, "grammar_text", slow_grammar_text)
    compiler = constraints.ConstraintCompiler(tiny_model_dir, 1024, [2, 6], mask_threads=1, compile_timeout_s=0.5)
    slow = [Constraint(ConstraintKind.REGEX, f"slow{i}") for i in range(constraints.COMPILE_THREADS)]
    try:
        for constraint in slow:
            compiler._compilation(constraint)  # start it, then wait until it is really running
            entered.acquire()
        for constraint in slow:
            with pytest.raises(InvalidArgument) as refused:
                asyncio.run(compiler.start_row(constraint))
            assert refused.value.reason == "CONSTRAINT_TOO_COMPLEX"
        fine = Constraint(ConstraintKind.REGEX, "fine")
        with pytest.raises(ResourceExhausted) as busy:
            asyncio.run(compiler.start_row(fine))
        assert busy.value.reason == "CONSTRAINT_COMPILER_BUSY"
        release.set()
        assert asyncio.run(compiler.start_row(fine)).allowed() is not None
        with pytest.raises(InvalidArgument) as refused:
            asyncio.run(compiler.start_row(slow[0]))
        assert refused.value.reason == "CONSTRAINT_TOO_COMPLEX"
    finally:
        release.set()
        compiler.close()


def test_a_grammar_failing_mid_generation_ends_only_its_row(engine: InferenceEngine,
                                                            unconstrained_alone: list[list[int]],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A step over llguidance's per-step limits puts one matcher in an error state: that
    turn fails with CONSTRAINT_TOO_COMPLEX after the tokens it had, the batch goes on."""
    real_compute_mask = constraints.RowGrammar._compute_mask
    masks_computed = 0

    def failing_after_three(self: constraints.RowGrammar) -> Any:
        nonlocal masks_computed
        masks_computed += 1
        if masks_computed > 3:
            self.failure = InvalidArgument.for_field("sampling.constraint.regex", "step limit",
                                                     reason="CONSTRAINT_TOO_COMPLEX")
            return None
        return real_compute_mask(self)

    monkeypatch.setattr(constraints.RowGrammar, "_compute_mask", failing_after_three)
    constrained_row = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True,
                                     constraint=Constraint(ConstraintKind.REGEX, "[a-z]{30,}"))
    delivered: list[int] = []

    async def constrained_turn() -> BaseException | None:
        session = engine.open_session("tiny", multi_turn=False)
        try:
            async for item in session.generate(PROMPT, constrained_row):
                if not isinstance(item, TurnResult):
                    delivered.append(item.token_id)
        except InvalidArgument as exc:
            return exc
        finally:
            session.close()
        return None

    async def together() -> tuple[BaseException | None, list[list[int]]]:
        failure, *others = await asyncio.gather(constrained_turn(), *(generate(engine, p) for p in UNCONSTRAINED))
        return failure, [ids for ids, _ in others]  # type: ignore[misc]

    failure, others = asyncio.run(together())
    assert isinstance(failure, InvalidArgument) and failure.reason == "CONSTRAINT_TOO_COMPLEX"
    assert len(delivered) == 4  # the first mask came from compiling, three more from the pool
    assert others == unconstrained_alone
