"""TEST ONLY: a fault injected into a decoder, so tests can check how a real process contains it.

Off unless the hidden `--test-only-break-on-token-id` flag is given (it is left out of
`--help`; docs/reliability.md describes it). Nothing in production uses this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmsuite.inference.engine.onnx_model import OnnxDecoder


class BreakOnToken:
    """Once a forward is asked to read `token_id`, that forward and every later one raises,
    like a device that was lost mid-request: the engine's check forwards fail too, so it gives up."""

    def __init__(self, token_id: int) -> None:
        self.token_id = token_id
        self.broken = False

    def __call__(self, decoder: OnnxDecoder) -> None:
        decoder.run = self._breaking(decoder.run)  # type: ignore[method-assign]
        decoder.run_in_place = self._breaking(decoder.run_in_place)  # type: ignore[method-assign]

    def _breaking(self, forward: Callable[..., Any]) -> Callable[..., Any]:
        """`forward` (a decoder's padded or in-place forward), broken from the token on."""

        def broken_after_token(input_ids: Any, *args: Any) -> Any:
            if self.broken or bool((input_ids == self.token_id).any()):
                self.broken = True
                raise RuntimeError(f"fault injected for tests: the decoder broke on token id {self.token_id}")
            return forward(input_ids, *args)

        return broken_after_token
