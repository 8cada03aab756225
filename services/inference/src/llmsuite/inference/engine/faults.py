"""What callers are told when the model or the engine, not their request, failed."""

from __future__ import annotations

from llmsuite.runtime.errors import Internal, LlmsuiteError, ResourceExhausted, Unavailable

# How ONNX Runtime and CUDA word an allocation that failed (their errors are RuntimeErrors,
# not MemoryError): such a failure is capacity (OUT_OF_MEMORY), not a broken model.
_ALLOCATION_FAILURE_WORDS = ("failed to allocate", "bad_alloc", "out of memory")


def caller_error(model: str, error: BaseException) -> LlmsuiteError:
    """What a caller sees for a fault of the model or the engine: OUT_OF_MEMORY when an
    allocation failed (capacity: a retry may fit), MODEL_ERROR for anything else."""
    if isinstance(error, LlmsuiteError):
        return error
    if isinstance(error, MemoryError) or any(w in str(error).lower() for w in _ALLOCATION_FAILURE_WORDS):
        return ResourceExhausted(
            f"model {model!r} ran out of memory computing this request; retry later or send less",
            reason="OUT_OF_MEMORY", retry_after_s=5.0, metadata={"model": model})
    return Internal(f"model {model!r} failed computing this request ({type(error).__name__}); the "
                    "server's log has the details; other requests are not affected",
                    reason="MODEL_ERROR", metadata={"model": model})


def engine_failed(model: str) -> Unavailable:
    """Every caller's error once the engine gave up on the model (the process is exiting)."""
    return Unavailable(f"model {model!r} on this replica cannot run its model any more and is restarting; "
                       "retry on another replica", reason="ENGINE_FAILED", retry_after_s=1.0,
                       metadata={"model": model})
