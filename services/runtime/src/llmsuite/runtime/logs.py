"""Structured logs that carry the request id of the RPC they belong to, and
the trace and span ids of the active span (when tracing is on), so a log line
leads to its trace and back."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
import uuid

from opentelemetry import trace

# Metadata key carrying the request id both ways: clients may send one, and
# every response carries it (with the first message, or in the trailers).
REQUEST_ID_HEADER = "x-request-id"

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("llmsuite_request_id", default=None)

# LogRecord attributes that are not "extra" fields.
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def current_request_id() -> str | None:
    return _request_id.get()


def set_request_id(request_id: str) -> contextvars.Token[str | None]:
    return _request_id.set(request_id)


def new_request_id() -> str:
    return uuid.uuid4().hex


def _context_fields() -> dict[str, str]:
    """request_id, trace_id and span_id of the current RPC, those that are set."""
    fields = {}
    rid = current_request_id()
    if rid:
        fields["request_id"] = rid
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        fields["trace_id"] = trace.format_trace_id(span.trace_id)
        fields["span_id"] = trace.format_span_id(span.span_id)
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_context_fields())
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(f"{k}={v}" for k, v in _context_fields().items())
        extras = " ".join(
            f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")
        )
        line = f"{self.formatTime(record)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if context:
            line += " " + context
        if extras:
            line += " " + extras
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
