"""The one place where an upstream's failure becomes the gateway caller's error.

Every call the gateway makes to the tokenizer or an inference replica goes
through `llmsuite.gateway.upstreams`, which hands any `AioRpcError` to
`from_upstream` here. The rules:

- The caller's own mistakes, as an upstream judged them (INVALID_ARGUMENT,
  NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE, RESOURCE_EXHAUSTED,
  DEADLINE_EXCEEDED), keep their code, ErrorInfo reason and metadata, field
  violations (renamed to the gateway request's fields) and RetryInfo delay.
- An upstream refusing the gateway's own credentials (UNAUTHENTICATED,
  PERMISSION_DENIED) is the operator's problem, never the caller's bad key:
  UNAVAILABLE with reason UPSTREAM_AUTH_FAILED. UNAVAILABLE rather than
  INTERNAL because this instance cannot serve until it is reconfigured while
  another gateway instance may (health reports it NOT_SERVING too), and
  INTERNAL is reserved for bugs.
- An upstream that is down or broken: UNAVAILABLE. When the upstream itself
  said why (an llmsuite ErrorInfo, e.g. LOADING with a retry delay), that
  reason and delay travel on; transport errors become UPSTREAM_UNAVAILABLE
  with a generic message, since grpc's own text names internal addresses.
- An upstream bug (INTERNAL) stays INTERNAL and points at the request id,
  which the gateway forwards upstream, so the upstream's log line is findable.
  A replica's named model faults (NUMERIC_ERROR, MODEL_ERROR: this request's
  rows failed, the replica serves on) keep their reason and message, so the
  caller can tell them apart; they are not spilled over, since another replica
  of the same model would compute the same thing.
- A replica whose engine gave up (UNAVAILABLE ENGINE_FAILED) is going away: like
  any UNAVAILABLE before the first message, the request spills over.
  An INTERNAL without an llmsuite ErrorInfo came from the transport, not a
  handler (a call racing the replica's shutdown): UNAVAILABLE, and before the
  first message the gateway spills it over to another replica.
"""

from __future__ import annotations

import logging

import grpc

from llmsuite.client.errors import error_details
from llmsuite.runtime.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    LlmsuiteError,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from llmsuite.runtime.logs import current_request_id

log = logging.getLogger("llmsuite.gateway.upstreams")

# Upstream request field paths -> the gateway request's own.
FIELD_RENAMES = (("start.sampling.", "sampling."), ("turn.sampling.", "sampling."), ("sampling.", "sampling."),
                 ("prompt_token_ids", "prompt"), ("texts[0]", "prompt"), ("start.model", "model"),
                 ("template_variables", "start.chat_template_kwargs"),
                 ("continue_final_message", "start.continue_final_message"),
                 ("sequences[0].token_ids", "token_ids"), ("sequences", "token_ids"))  # Decode, for Detokenize
# Codes that describe the request, not the upstream's health.
_CALLERS_OWN: dict[grpc.StatusCode, type[LlmsuiteError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
}
# INTERNAL reasons an inference replica gives for one request's rows (docs/errors.md).
MODEL_FAULT_REASONS = frozenset({"NUMERIC_ERROR", "MODEL_ERROR"})
_CREDENTIALS_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
DEFAULT_RETRY_AFTER_S = 1.0


def _rename(field: str) -> str:
    for old, new in FIELD_RENAMES:
        if field.startswith(old):
            return new + field[len(old):]
    return field


def _renamed_message(message: str) -> str:
    for old, new in FIELD_RENAMES:
        message = message.replace(old, new)
    return message


def from_upstream(exc: grpc.aio.AioRpcError, upstream: str) -> LlmsuiteError:
    """The error the gateway's caller sees for `exc`, an upstream call's failure.
    `upstream` names the service in messages ("tokenizer", "inference")."""
    code = exc.code()
    details = error_details(exc)
    reason = details.get("reason")  # set only when an llmsuite service produced the status
    retry_after_s = details.get("retry_after_s")
    metadata = dict(details.get("metadata", {}))
    if code in _CALLERS_OWN:
        error = _CALLERS_OWN[code](
            _renamed_message(exc.details() or code.name.lower()), reason=reason or code.name,
            violations=tuple(FieldViolation(_rename(f), d) for f, d in details.get("field_violations", [])),
            metadata=metadata)
        error.code = code  # OUT_OF_RANGE stays OUT_OF_RANGE
        if retry_after_s is not None and isinstance(error, ResourceExhausted):
            error.retry_after_s = retry_after_s
        return error
    log.warning("upstream failure", extra={"upstream": upstream, "code": code.name, "reason": reason or "",
                                           "detail": exc.details()})
    if code in _CREDENTIALS_REFUSED:
        return Unavailable(
            f"the {upstream} service refused this gateway's own credentials; the gateway's operator must fix "
            "its upstream configuration (--upstream-api-key, --upstream-tls-*); your API key is not the problem",
            reason="UPSTREAM_AUTH_FAILED", metadata={"upstream": upstream, "upstream_code": code.name})
    if is_transport_failure(exc):
        return unavailable(upstream)
    if code is grpc.StatusCode.INTERNAL and reason in MODEL_FAULT_REASONS:
        return Internal(f"{exc.details()} (request id {current_request_id() or 'unknown'})", reason=reason,
                        metadata={**metadata, "upstream": upstream})
    if code is grpc.StatusCode.INTERNAL:
        error = LlmsuiteError(
            f"the {upstream} service failed with an internal error; its logs name request id "
            f"{current_request_id() or 'unknown'}", reason="UPSTREAM_INTERNAL", metadata={"upstream": upstream})
        error.code = grpc.StatusCode.INTERNAL
        return error
    if code is grpc.StatusCode.UNAVAILABLE and reason:
        return Unavailable(_renamed_message(exc.details() or "unavailable"), reason=reason,
                           metadata={**metadata, "upstream": upstream},
                           retry_after_s=retry_after_s if retry_after_s is not None else DEFAULT_RETRY_AFTER_S)
    return unavailable(upstream)


def is_transport_failure(exc: grpc.aio.AioRpcError) -> bool:
    """An INTERNAL that no llmsuite handler produced: every status our servers raise carries
    an ErrorInfo, so one without it came from the transport (grpc-core answers a call that
    races a server's shutdown with INTERNAL "Internal error from Core"). It says nothing
    about the request: the replica is going away, like UNAVAILABLE."""
    return exc.code() is grpc.StatusCode.INTERNAL and "reason" not in error_details(exc)


def unavailable(upstream: str, *, reason: str = "UPSTREAM_UNAVAILABLE") -> Unavailable:
    return Unavailable(f"the {upstream} service is unavailable; retry shortly", reason=reason,
                       retry_after_s=DEFAULT_RETRY_AFTER_S, metadata={"upstream": upstream})


def ended_early(upstream: str) -> Unavailable:
    """An upstream stream that ended (status OK) before the message it owed:
    the same error on every path that reads a stream."""
    log.warning("upstream stream ended early", extra={"upstream": upstream})
    return Unavailable(f"the {upstream} service ended the stream before it was complete; retry shortly",
                       reason="UPSTREAM_PROTOCOL_ERROR", retry_after_s=DEFAULT_RETRY_AFTER_S,
                       metadata={"upstream": upstream})
