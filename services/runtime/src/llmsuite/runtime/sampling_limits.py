"""The ranges sampling values must fall in, shared by every service that checks them.

The inference engine checks them on every turn; the gateway checks them before it spends a
tokenizer call and a replica on a request that will be refused; the HTTP adapter checks them
on the caller's JSON numbers before they are narrowed to the protos' float32 (where 1e-50
would silently become 0, i.e. greedy, and 1e39 would become inf). One function, so the
three cannot drift apart. Pure Python: the gateway never imports numpy.

Why these limits (docs/errors.md says the same to callers):
- temperature is 0 (greedy) or in [0.01, 100]. Sampling divides the logits by it; below
  0.01 a logit gap of 1 is already a factor e^100 (~1e43), so the draw is greedy in all but
  name, and a smaller divisor only adds float32 overflow (inf - inf = NaN, every candidate
  lost). vLLM clamps to the same 0.01 with a warning; a clear refusal tells the caller instead.
- repetition_penalty is in [0.01, 10]: it divides (or multiplies) logits just like a
  temperature, with the same overflow below 0.01.
- top_p is in (0, 1]: the sampler always keeps at least the most likely token, so a tiny
  positive top_p is greedy, never an empty set.
- presence_penalty and frequency_penalty are in [-2, 2], OpenAI's own range: they are
  subtracted from logits (frequency once per earlier occurrence), so the bound also bounds
  how far a long output can push a logit.
- a logit_bias value is in [-100, 100] (OpenAI's range: -100 bans a token, 100 forces it),
  with at most 1024 entries, so one request cannot make every step copy a huge map.
- min_p is in [0, 1]: a fraction of the most likely token's probability.
- every value must be finite: NaN fails every comparison, so it is named explicitly.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping

from llmsuite.runtime.errors import InvalidArgument

MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 10.0
MAX_PRESENCE_PENALTY = 2.0  # and frequency_penalty; both are symmetric around 0
MAX_LOGIT_BIAS = 100.0  # symmetric around 0
MAX_LOGIT_BIAS_ENTRIES = 1024


def _float32(value: float) -> float:
    return float(struct.unpack("f", struct.pack("f", value))[0])


# The floors as float32 holds them: a gRPC caller who sends exactly 0.01 sends float32(0.01),
# which is a hair below the float64 0.01 and must still pass.
_MIN_TEMPERATURE_F32 = _float32(MIN_TEMPERATURE)
_MIN_REPETITION_PENALTY_F32 = _float32(MIN_REPETITION_PENALTY)


def check_sampling_values(*, temperature: float | None, top_p: float | None, repetition_penalty: float | None,
                          presence_penalty: float | None = None, frequency_penalty: float | None = None,
                          min_p: float | None = None, logit_bias: Mapping[int, float] | None = None,
                          field_prefix: str = "sampling.") -> None:
    """Raises InvalidArgument (reason INVALID_FIELD, metadata `minimum`/`maximum`) for the first
    value that cannot give a distribution to sample from. None means unset (the default applies).
    The field is named `field_prefix + name`, so each service names it as its caller spelled it."""

    def bad(name: str, description: str, minimum: str, maximum: str) -> InvalidArgument:
        return InvalidArgument.for_field(field_prefix + name, description, reason="INVALID_FIELD",
                                         minimum=minimum, maximum=maximum)

    if temperature is not None:
        if not math.isfinite(temperature) or not (
                temperature == 0.0 or _MIN_TEMPERATURE_F32 <= temperature <= MAX_TEMPERATURE):
            raise bad("temperature",
                      f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {temperature:g}; "
                      f"below {MIN_TEMPERATURE:g} sampling is greedy in all but name and overflows float32",
                      str(MIN_TEMPERATURE), str(MAX_TEMPERATURE))
    if top_p is not None and not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise bad("top_p", f"must be in (0, 1] (1 = off), got {top_p:g}", "0 (exclusive)", "1")
    if repetition_penalty is not None and not (
            math.isfinite(repetition_penalty)
            and _MIN_REPETITION_PENALTY_F32 <= repetition_penalty <= MAX_REPETITION_PENALTY):
        raise bad("repetition_penalty",
                  f"must be in [{MIN_REPETITION_PENALTY:g}, {MAX_REPETITION_PENALTY:g}] (1 = off), "
                  f"got {repetition_penalty:g}",
                  str(MIN_REPETITION_PENALTY), str(MAX_REPETITION_PENALTY))
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if value is not None and not (math.isfinite(value) and abs(value) <= MAX_PRESENCE_PENALTY):
            raise bad(name, f"must be in [-{MAX_PRESENCE_PENALTY:g}, {MAX_PRESENCE_PENALTY:g}] (0 = off), "
                      f"got {value:g}", str(-MAX_PRESENCE_PENALTY), str(MAX_PRESENCE_PENALTY))
    if min_p is not None and not (math.isfinite(min_p) and 0.0 <= min_p <= 1.0):
        raise bad("min_p", f"must be in [0, 1] (0 = off), got {min_p:g}", "0", "1")
    if logit_bias:
        if len(logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise InvalidArgument.for_field(
                field_prefix + "logit_bias", f"has {len(logit_bias)} entries; at most {MAX_LOGIT_BIAS_ENTRIES}",
                reason="INVALID_FIELD", maximum=str(MAX_LOGIT_BIAS_ENTRIES))
        for token_id, bias in logit_bias.items():
            if not (math.isfinite(bias) and abs(bias) <= MAX_LOGIT_BIAS):
                raise bad(f"logit_bias[{token_id}]",
                          f"must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}], got {bias:g}",
                          str(-MAX_LOGIT_BIAS), str(MAX_LOGIT_BIAS))
