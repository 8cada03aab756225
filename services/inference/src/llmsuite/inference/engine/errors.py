"""Errors of the engine itself, as opposed to a caller's mistakes (those are llmsuite.runtime.errors)."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model directory cannot be served: missing files, an unsupported layout, or the
    requested device is not really available. Raised at startup, never to a caller."""
