"""Request checks that need only the request and the model's sizes.

Each failure names the request field (as the proto spells it) so the caller can fix it;
the servicer passes these errors through unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llmsuite.inference.engine.types import SamplingParams
from llmsuite.runtime.errors import InvalidArgument
from llmsuite.runtime.sampling_limits import check_sampling_values

MAX_TOP_LOGPROBS = 20
_MAX_SEED = 2**64


def validate_prompt(token_ids: Sequence[int], vocab_size: int, *, allow_empty: bool) -> list[int]:
    """Returns the ids as a plain list; empty is allowed only to continue an existing session."""
    ids = [int(token_id) for token_id in token_ids]
    if not ids and not allow_empty:
        raise InvalidArgument.for_field("prompt_token_ids", "must contain at least one token id", reason="EMPTY_PROMPT")
    if ids:
        array = np.asarray(ids, dtype=np.int64)
        bad = np.flatnonzero((array < 0) | (array >= vocab_size))
        if bad.size:
            index = int(bad[0])
            raise InvalidArgument.for_field(
                f"prompt_token_ids[{index}]",
                f"token id {ids[index]} is outside the model's vocabulary [0, {vocab_size})",
                reason="TOKEN_ID_OUT_OF_RANGE",
                token_id=str(ids[index]),
                vocab_size=str(vocab_size),
            )
    return ids


def validate_sampling(params: SamplingParams, *, vocab_size: int, context_length: int) -> None:
    """Rejects values that are negative, absurd, impossible for this model, or that cannot give
    a distribution to sample from (llmsuite.runtime.sampling_limits says which and why)."""

    def bad(field: str, description: str, reason: str = "INVALID_FIELD") -> InvalidArgument:
        return InvalidArgument.for_field(f"sampling.{field}", description, reason=reason)

    check_sampling_values(temperature=params.temperature, top_p=params.top_p,
                          repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
                          frequency_penalty=params.frequency_penalty, min_p=params.min_p,
                          logit_bias=dict(params.logit_bias))
    if params.top_k < 0:
        raise bad("top_k", f"must be >= 0 (0 = off), got {params.top_k}")
    if not (1 <= params.max_new_tokens <= context_length):
        raise bad(
            "max_new_tokens", f"must be in [1, {context_length}] (the model's context), got {params.max_new_tokens}"
        )
    if not (0 <= params.top_logprobs <= MAX_TOP_LOGPROBS):
        raise bad("top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {params.top_logprobs}")
    if params.seed is not None and not (0 <= params.seed < _MAX_SEED):
        raise bad("seed", f"must be in [0, 2^64), got {params.seed}")
    if not (0 <= params.min_tokens <= params.max_new_tokens):
        raise bad("min_tokens", f"must be in [0, max_new_tokens = {params.max_new_tokens}], got {params.min_tokens}")
    for index, token_id in enumerate(params.stop_token_ids):
        if not (0 <= token_id < vocab_size):
            raise bad(
                f"stop_token_ids[{index}]",
                f"token id {token_id} is outside the model's vocabulary [0, {vocab_size})",
                reason="TOKEN_ID_OUT_OF_RANGE",
            )
    for token_id, _ in params.logit_bias:
        if not (0 <= token_id < vocab_size):
            raise bad(f"logit_bias[{token_id}]",
                      f"token id {token_id} is outside the model's vocabulary [0, {vocab_size})",
                      reason="TOKEN_ID_OUT_OF_RANGE")


def tokens_to_drop(prior_tokens: int, new_tokens: int, max_new_tokens: int, context_length: int, *,
                   retained_session: bool, truncate_prompt: bool) -> int:
    """How many of the oldest context tokens (history, then new ids) to drop so the turn fits.

    A single-turn request must fit prompt + max_new_tokens. A retained session only needs
    room for one more token: it may run until the context is full (CONTEXT_FULL). When
    the turn does not fit, truncate_prompt keeps the most recent context_length -
    max_new_tokens tokens; otherwise the request is refused with PROMPT_TOO_LONG.
    """
    prompt = prior_tokens + new_tokens
    room_needed = 1 if retained_session else max_new_tokens
    if prompt + room_needed <= context_length:
        return 0
    keep = context_length - max_new_tokens
    if truncate_prompt and keep > 0:
        return prompt - keep
    metadata = {
        "prompt_tokens": str(prompt),
        "max_new_tokens": str(max_new_tokens),
        "context_length": str(context_length),
    }
    if truncate_prompt:
        description = (
            f"max_new_tokens {max_new_tokens} leaves no room for any prompt token in the model's "
            f"context of {context_length} tokens"
        )
    elif retained_session:
        description = (
            f"the session's {prior_tokens} tokens of history plus {new_tokens} new tokens leave no room to "
            f"generate within the model's context of {context_length} tokens; set truncate_prompt or start "
            "a new session"
        )
    else:
        description = (
            f"the prompt has {prompt} tokens and max_new_tokens is {max_new_tokens}: {prompt + max_new_tokens} "
            f"exceeds the model's context of {context_length} tokens; shorten the prompt, lower "
            "max_new_tokens or set truncate_prompt"
        )
    raise InvalidArgument.for_field("prompt_token_ids", description, reason="PROMPT_TOO_LONG", **metadata)
