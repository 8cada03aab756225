"""Protobuf helpers and API defaults that more than one service needs.

The gateway and the inference service both fill `common.v1` messages; what
they share lives here so the gateway never imports the inference package.
"""

from __future__ import annotations

from google.protobuf import duration_pb2

# `SamplingParams.max_new_tokens` when the caller leaves it 0 (documented in common.proto).
DEFAULT_MAX_NEW_TOKENS = 16


def duration(seconds: float) -> duration_pb2.Duration:
    """A non-negative protobuf Duration from seconds (negative clock skew becomes 0)."""
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(max(0.0, seconds) * 1e9))
    return d
