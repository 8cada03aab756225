"""Client-side errors: every failed call raises an `LlmsuiteError` subclass.

`rpc_errors()` is the one place where a `grpc.RpcError` becomes one of these;
the rich status (ErrorInfo reason, BadRequest field violations, RetryInfo) is
decoded by `error_details`, so callers switch on
`reason` and `field_violations` instead of parsing messages.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True)
class FieldViolation:
    """One rejected request field; `field` is its path, e.g. `sampling.top_p`."""

    field: str
    description: str


class LlmsuiteError(Exception):
    """A failed call. `code` is the gRPC status code; `reason` the stable
    UPPER_SNAKE identifier from docs/errors.md (empty when the server sent none)."""

    default_code = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        field_violations: Sequence[FieldViolation] = (),
        retry_after_s: float | None = None,
        request_id: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code or self.default_code
        self.message = message
        self.reason = reason
        self.field_violations = tuple(field_violations)
        self.retry_after_s = retry_after_s
        self.request_id = request_id
        self.metadata = dict(metadata or {})

    def __str__(self) -> str:
        notes = []
        if self.reason:
            notes.append(f"reason {self.reason}")
        if self.retry_after_s is not None:
            notes.append(f"retry after {self.retry_after_s:g}s")
        suffix = f" [{', '.join(notes)}]" if notes else ""
        return f"{self.code.name}: {self.message}{suffix}"


class InvalidRequest(LlmsuiteError):
    """The request is wrong (a field out of range, a missing prompt); sending
    it again unchanged fails again. `field_violations` names the fields."""

    default_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LlmsuiteError):
    """Unknown model (reason MODEL_NOT_FOUND); the message lists the loaded ones."""

    default_code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(LlmsuiteError):
    """Well formed but impossible now, e.g. chat with a model without a template."""

    default_code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(LlmsuiteError):
    """Missing, malformed or wrong API key."""

    default_code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(LlmsuiteError):
    default_code = grpc.StatusCode.PERMISSION_DENIED


class RateLimited(LlmsuiteError):
    """Over capacity or over a rate limit; `retry_after_s` says when to come back."""

    default_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LlmsuiteError):
    """The service or one of its upstreams is down; worth retrying later."""

    default_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LlmsuiteError):
    default_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(LlmsuiteError):
    default_code = grpc.StatusCode.CANCELLED


class InternalError(LlmsuiteError):
    """A server bug (or a broken protocol); the message names the request id to
    look for in the server logs."""

    default_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[LlmsuiteError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: RateLimited,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
    grpc.StatusCode.INTERNAL: InternalError,
    grpc.StatusCode.UNKNOWN: InternalError,
    grpc.StatusCode.DATA_LOSS: InternalError,
}


def header_value(metadata: object, key: str) -> str | None:
    """A metadata value from either API's metadata (sync tuples or aio Metadata)."""
    for k, v in metadata or ():  # type: ignore[attr-defined]
        if k == key:
            return v.decode("latin-1") if isinstance(v, bytes) else str(v)
    return None


def from_rpc_error(error: grpc.RpcError) -> LlmsuiteError:
    code = error.code() if hasattr(error, "code") else None
    code = code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN
    try:
        details = error_details(error)
    except Exception:  # a malformed details trailer must not hide the status itself
        details = {}
    message = (error.details() if hasattr(error, "details") else None) or code.name.lower()
    request_id = _request_id(error)
    cls = _BY_CODE.get(code, LlmsuiteError)
    converted = cls(
        message,
        code=code,
        reason=details.get("reason", ""),
        field_violations=[FieldViolation(f, d) for f, d in details.get("field_violations", ())],
        retry_after_s=details.get("retry_after_s"),
        request_id=request_id,
        metadata=details.get("metadata"),
    )
    converted.rpc_error = error  # type: ignore[attr-defined]
    return converted


def _request_id(error: grpc.RpcError) -> str | None:
    # A call that fails before its first response message carries the id only
    # in its trailers (headers would have kept gRPC from retrying it).
    for getter in ("initial_metadata", "trailing_metadata"):
        try:
            found = header_value(getattr(error, getter)(), REQUEST_ID_HEADER)
        except Exception:  # aio calls may not have that metadata to give
            found = None
        if found:
            return found
    return None


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Re-raise any `grpc.RpcError` inside the block as an `LlmsuiteError`
    (the original stays on `.rpc_error`). Works around awaits too."""
    try:
        yield
    except grpc.RpcError as exc:
        raise from_rpc_error(exc) from None


def error_details(error: grpc.RpcError) -> dict[str, Any]:
    """Decodes a failed call's rich status into plain values
    (`reason`, `metadata`, `field_violations`, `retry_after_s`)."""
    out: dict[str, Any] = {"code": error.code(), "message": error.details()}
    trailing = error.trailing_metadata() or ()
    raw = next((v for k, v in trailing if k == "grpc-status-details-bin"), None)
    if raw is None:
        return out
    status = status_pb2.Status.FromString(raw)
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out["reason"] = info.reason
            out["metadata"] = dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out["field_violations"] = [(v.field, v.description) for v in bad.field_violations]
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            out["retry_after_s"] = retry.retry_delay.ToMilliseconds() / 1000
    return out
