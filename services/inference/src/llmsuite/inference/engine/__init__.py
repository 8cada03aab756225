"""The inference engine: ONNX Runtime decoder models behind a small asyncio interface.

The servicer uses only what this package exports; onnxruntime stays behind it.
"""

from llmsuite.inference.engine.engine import GenerationSession, InferenceEngine
from llmsuite.inference.engine.errors import ModelLoadError
from llmsuite.inference.engine.types import (
    EngineSettings,
    EngineStats,
    FinishReason,
    GeneratedToken,
    ModelInfo,
    SamplingParams,
    TokenLogprob,
    TurnResult,
    TurnTimings,
    TurnUsage,
)

__all__ = [
    "EngineSettings",
    "EngineStats",
    "FinishReason",
    "GeneratedToken",
    "GenerationSession",
    "InferenceEngine",
    "ModelInfo",
    "ModelLoadError",
    "SamplingParams",
    "TokenLogprob",
    "TurnResult",
    "TurnTimings",
    "TurnUsage",
]
