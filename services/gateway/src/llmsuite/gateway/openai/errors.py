"""Failures as OpenAI reports them: `{"error": {"message", "type", "param",
"code"}}` with the matching HTTP status.

This is the one place where a gateway status (an `LlmsuiteError` from the
SDK) or a rejected request body becomes an HTTP error. The gateway's field
paths (`sampling.top_p`) are renamed to the request's own parameter names
(`top_p`), its stable reasons become lowercase codes, and RetryInfo becomes
`Retry-After`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from pydantic import ValidationError
from starlette.responses import JSONResponse

from llmsuite.client.errors import LlmsuiteError
from llmsuite.runtime.errors import InvalidArgument


@dataclass
class ApiError(Exception):
    """An HTTP error response in OpenAI's shape."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = dict(self.headers)
        if request_id:
            headers["x-request-id"] = request_id
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# gRPC status -> (HTTP status, OpenAI error type)
_BY_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "server_error"),
    grpc.StatusCode.CANCELLED: (503, "server_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "server_error"),
}
# Reasons whose OpenAI code has its own well-known name; the rest are lowercased.
_OPENAI_CODES = {
    "PROMPT_TOO_LONG": "context_length_exceeded",
    "RATE_LIMITED": "rate_limit_exceeded",
}
_GRPC_TO_OPENAI_PARAM = (
    (re.compile(r"^(start|turn)\."), ""),
    (re.compile(r"^sampling\.stop_strings(\[\d+\])?"), "stop"),
    (re.compile(r"^sampling\.max_new_tokens"), "max_tokens"),
    (re.compile(r"^sampling\."), ""),
    (re.compile(r"^prompt_token_ids"), "prompt"),  # a replica's name for the prompt the gateway encoded
)
# Advice in gateway and replica messages that speaks gRPC: the HTTP API has no prompt
# truncation and no sessions, so that advice goes, and gRPC names become the HTTP ones.
_GRPC_ADVICE = (
    (re.compile(r", lower max_new_tokens or set truncate_prompt"), " or lower max_new_tokens"),
    (re.compile(r"; set truncate_prompt or start a new session"), ""),
    (re.compile(r" or set truncate_prompt"), ""),
)
_GRPC_WORD = re.compile(r"\b(max_new_tokens|stop_strings|prompt_token_ids)\b")


def http_words(message: str, renames: Mapping[str, str]) -> str:
    """A gateway message with its gRPC field names written as this request's (`max_new_tokens`
    -> `max_tokens` or `max_completion_tokens`), and advice it cannot follow over HTTP dropped."""
    for pattern, replacement in _GRPC_ADVICE:
        message = pattern.sub(replacement, message)
    return _GRPC_WORD.sub(lambda m: openai_param(f"sampling.{m.group(1)}" if m.group(1) != "prompt_token_ids"
                                                 else m.group(1), renames), message)


def openai_param(field_path: str, renames: Mapping[str, str]) -> str:
    """A gateway field path as this request calls it (`sampling.top_p` -> `top_p`)."""
    name = field_path
    for pattern, replacement in _GRPC_TO_OPENAI_PARAM:
        name = pattern.sub(replacement, name)
    return renames.get(name, name)


def from_gateway(error: LlmsuiteError, renames: Mapping[str, str] = {}) -> ApiError:
    """The HTTP error for a failed gateway call. `renames` maps the gateway's
    names for this request's fields to the caller's (e.g. `prompt` ->
    `messages` for chat)."""
    if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not error.reason:
        # Every llmsuite refusal names its reason; one without came from gRPC's message-size
        # limit (the gateway's receive cap, docs/errors.md): the request is too large, not a rate.
        return ApiError(413, f"The request is larger than the gateway accepts: {error.message}",
                        code="request_too_large")
    status, kind = _BY_CODE.get(error.code, (500, "server_error"))
    message = error.message
    param = None
    if error.field_violations:
        gateway_path = error.field_violations[0].field
        param = openai_param(gateway_path, renames)
        message = message.replace(gateway_path, param)
    message = http_words(message, renames)
    if error.code == grpc.StatusCode.NOT_FOUND:
        param = "model"
    code = _OPENAI_CODES.get(error.reason, error.reason.lower() or None)
    headers = {}
    if error.retry_after_s is not None and status in (429, 503):
        # Retry-After takes whole seconds; retry-after-ms (read by the openai client) keeps the precision.
        headers["retry-after"] = str(max(1, math.ceil(error.retry_after_s)))
        headers["retry-after-ms"] = str(max(1, round(error.retry_after_s * 1000)))
    return ApiError(status, message, kind, param, code, headers)


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def from_validation(error: ValidationError) -> ApiError:
    """The 400 for a body that is not JSON, not an object, or not a valid request."""
    first = error.errors(include_url=False)[0]
    kind, param = first["type"], _location(first["loc"]) or None
    if kind == "json_invalid":
        return ApiError(400, f"The request body is not valid JSON: {first['ctx']['error']}", code="invalid_json")
    if kind in ("model_type", "dict_type") and param is None:
        return ApiError(400, "The request body must be a JSON object.", code="invalid_json")
    if kind == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if kind == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    reason = first["msg"].removeprefix("Value error, ")
    return ApiError(400, f"Invalid value for '{param}': {reason}", param=param, code="invalid_value")


def invalid_field(error: InvalidArgument) -> ApiError:
    """The 400 for a value the adapter refuses itself, shaped as the gateway's own refusal would be."""
    param = error.violations[0].field if error.violations else None
    return ApiError(400, error.message, param=param, code=error.reason.lower())


def unsupported(fields: list[tuple[str, str]]) -> ApiError:
    param, why = fields[0]
    return ApiError(400, why, param=param, code="unsupported_parameter")
