"""Typed domain errors shared by every service.

Engines and servicers raise these; `llmsuite.runtime.status` turns them into a
`google.rpc.Status` with rich details in exactly one place. Anything that is not
an `LlmsuiteError` is a bug and becomes INTERNAL with no internals leaked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc


@dataclass(frozen=True)
class FieldViolation:
    """One bad field: `field` is the request field path (e.g. `sampling.top_p`)."""

    field: str
    description: str


@dataclass
class LlmsuiteError(Exception):
    """Base of every error a caller may see.

    `reason` is a stable UPPER_SNAKE identifier for ErrorInfo (clients switch on
    it); `message` is for humans; `metadata` lands in ErrorInfo.metadata.
    """

    message: str
    reason: str = "UNSPECIFIED"
    violations: tuple[FieldViolation, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN  # overridden by subclasses

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


@dataclass
class InvalidArgument(LlmsuiteError):
    """The request itself is wrong; retrying it unchanged will fail again."""

    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT

    @classmethod
    def for_field(cls, field_path: str, description: str, reason: str = "INVALID_FIELD",
                  **metadata: str) -> InvalidArgument:
        return cls(
            message=f"{field_path}: {description}",
            reason=reason,
            violations=(FieldViolation(field_path, description),),
            metadata={"field": field_path, **metadata},
        )


@dataclass
class NotFound(LlmsuiteError):
    code: grpc.StatusCode = grpc.StatusCode.NOT_FOUND


@dataclass
class FailedPrecondition(LlmsuiteError):
    """The request is well formed but the system is not in a state to run it."""

    code: grpc.StatusCode = grpc.StatusCode.FAILED_PRECONDITION


@dataclass
class ResourceExhausted(LlmsuiteError):
    """Capacity or quota is used up; `retry_after_s` feeds RetryInfo."""

    retry_after_s: float = 1.0
    code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass
class Unavailable(LlmsuiteError):
    """Transient: the service or an upstream cannot serve right now."""

    retry_after_s: float | None = None
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE


@dataclass
class DeadlineExceeded(LlmsuiteError):
    code: grpc.StatusCode = grpc.StatusCode.DEADLINE_EXCEEDED


@dataclass
class Unauthenticated(LlmsuiteError):
    code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED


@dataclass
class PermissionDenied(LlmsuiteError):
    """The caller is authenticated but may not do this (e.g. a key without the admin scope)."""

    code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED


@dataclass
class Internal(LlmsuiteError):
    """A fault on the server's side that has a name (the model produced NaN logits, a forward
    failed), as opposed to a bug: callers get its reason and message, never a traceback."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


@dataclass
class Cancelled(LlmsuiteError):
    code: grpc.StatusCode = grpc.StatusCode.CANCELLED
