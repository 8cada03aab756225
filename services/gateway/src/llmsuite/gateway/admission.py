"""Admission: what a request must pass before it may take a replica's slot.

The gateway's caps (prompt tokens, new tokens, characters per request, messages
per conversation) and the caller's rate limits. Generate, Chat and Embed all
admit through one `Admission`, so a cap or a rate means the same on every RPC.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.affinity import DEFAULT_KEY_CHARS
from llmsuite.gateway.metrics import GatewayMetrics
from llmsuite.gateway.rate_limit import RateLimiter
from llmsuite.gateway.stop_strings import validate_stop_strings
from llmsuite.runtime.auth import current_principal
from llmsuite.runtime.errors import InvalidArgument, ResourceExhausted
from llmsuite.runtime.messages import DEFAULT_MAX_NEW_TOKENS
from llmsuite.runtime.sampling_limits import check_sampling_values

# Room in a request for everything but its text (model name, sampling, stop strings: at most
# a few KiB), on top of the text's worst-case UTF-8 size.
RECEIVE_HEADROOM_BYTES = 1024 * 1024


@dataclass(frozen=True)
class GatewayLimits:
    max_prompt_tokens: int = 8192
    max_new_tokens: int = 2048
    max_chat_messages: int = 1024
    # How long before a request's deadline the gateway sends its own final
    # message (TIME_LIMIT); the replica's deadline is twice this much earlier.
    deadline_margin_s: float = 0.25
    # Characters of the input that pick a replica by prefix affinity (0 = plain round-robin).
    affinity_key_chars: int = DEFAULT_KEY_CHARS
    # Characters of text one request may carry (a prompt; Tokenize's or CountTokens' texts
    # together; a Chat conversation's messages together), checked before anything is forwarded.
    max_request_chars: int = 1_000_000
    # Tool-call format per model name (--tool-call-parser), where the chat template does not show it.
    tool_call_parsers: Mapping[str, str] = field(default_factory=dict)

    def max_receive_bytes(self, max_message_bytes: int) -> int:
        """The gRPC server's receive cap: the largest request `max_request_chars` allows (4 UTF-8
        bytes a character) plus room for its other fields, at most `max_message_bytes`. gRPC
        refuses a larger message from its length prefix, before buffering it, so what a request
        can make the gateway hold is bounded by this, however large the message sent."""
        return min(max_message_bytes, 4 * self.max_request_chars + RECEIVE_HEADROOM_BYTES)

    def check_request_chars(self, field_path: str, texts: Iterable[str]) -> None:
        total = sum(len(text) for text in texts)
        if total > self.max_request_chars:
            raise InvalidArgument.for_field(
                field_path, f"{total} characters exceed this gateway's limit of {self.max_request_chars} per request",
                reason="REQUEST_TOO_LARGE", limit=str(self.max_request_chars))


class Charge:
    """Tokens one request was charged up front; `settle` refunds what it did not use."""

    def __init__(self, limiter: RateLimiter, principal: str, tokens: int) -> None:
        self._limiter = limiter
        self._principal = principal
        self._tokens = tokens
        self._charged_at = time.monotonic()
        self._settled = False

    def settle(self, used_tokens: int) -> None:
        if not self._settled:
            self._settled = True
            self._limiter.give_back(self._principal, max(0, self._tokens - used_tokens), self._charged_at)


class Admission:
    """Checks requests against the gateway's limits and charges the caller's rate limits."""

    def __init__(self, limits: GatewayLimits, rate_limiter: RateLimiter, metrics: GatewayMetrics) -> None:
        self.limits = limits
        self._rate = rate_limiter
        self._metrics = metrics

    def check_sampling(self, sampling: common_pb2.SamplingParams) -> tuple[int, tuple[str, ...]]:
        """The request's max new tokens (its own, or the default) and its validated stop strings."""
        # The replica checks these too; refusing here spares a tokenizer call and a replica slot.
        check_sampling_values(
            temperature=sampling.temperature if sampling.HasField("temperature") else None,
            top_p=sampling.top_p if sampling.HasField("top_p") else None,
            repetition_penalty=sampling.repetition_penalty if sampling.HasField("repetition_penalty") else None,
            presence_penalty=sampling.presence_penalty if sampling.HasField("presence_penalty") else None,
            frequency_penalty=sampling.frequency_penalty if sampling.HasField("frequency_penalty") else None,
            min_p=sampling.min_p if sampling.HasField("min_p") else None, logit_bias=sampling.logit_bias)
        max_new = sampling.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        if max_new > self.limits.max_new_tokens:
            raise InvalidArgument.for_field("sampling.max_new_tokens",
                                            f"{max_new} exceeds this gateway's cap {self.limits.max_new_tokens}",
                                            reason="MAX_NEW_TOKENS_TOO_LARGE", limit=str(self.limits.max_new_tokens))
        return max_new, validate_stop_strings(sampling.stop_strings)

    def prompt_too_long(self, prompt_tokens: str) -> InvalidArgument:
        return InvalidArgument.for_field(
            "prompt", f"{prompt_tokens} tokens exceeds this gateway's cap {self.limits.max_prompt_tokens}",
            reason="PROMPT_TOO_LONG", limit=str(self.limits.max_prompt_tokens), prompt_tokens=prompt_tokens)

    async def admit(self, prompt_tokens: int, max_new: int) -> Charge:
        """Checks the prompt cap and charges the caller's rate limits; the
        returned Charge must be settled on every path (see Charge)."""
        if prompt_tokens > self.limits.max_prompt_tokens:
            raise self.prompt_too_long(str(prompt_tokens))
        principal = current_principal() or "anonymous"
        try:
            await self._rate.charge(principal, prompt_tokens + max_new)
        except (ResourceExhausted, InvalidArgument) as refusal:
            # A shared store that cannot decide (Unavailable) is counted by the limiter, not here.
            self._metrics.rate_limit_refused(refusal)
            raise
        return Charge(self._rate, principal, prompt_tokens + max_new)
