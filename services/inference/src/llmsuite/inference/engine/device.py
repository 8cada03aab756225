"""Choosing the onnxruntime execution provider, and proving it is the one in use.

onnxruntime-gpu silently falls back to CPU when CUDA cannot start (missing libraries,
no device), so the only trustworthy answer is `session.get_providers()` after the session
exists. "cuda" is a promise the operator asked for: break it loudly at load. "auto" is a
preference: fall back with a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from llmsuite.inference.engine.errors import ModelLoadError
from llmsuite.inference.engine.types import EngineSettings

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

_OPTIMIZATION_LEVELS = {
    "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass(frozen=True)
class Placement:
    """Where a session runs: the provider in use and the OrtValue device for its tensors."""

    execution_provider: str
    device_type: str  # "cpu" or "cuda", as OrtValue / IOBinding name it
    device_id: int

    @property
    def description(self) -> str:
        return "cpu" if self.device_type == "cpu" else f"cuda:{self.device_id}"


def parse_device(device: str) -> tuple[str, int]:
    """"cuda:1" -> ("cuda", 1); "auto", "cpu", "cuda" -> (kind, 0)."""
    kind, _, index = device.partition(":")
    return kind, int(index or 0)


def session_options(settings: EngineSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.intra_op_threads
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = _OPTIMIZATION_LEVELS[settings.graph_optimization]
    return options


def _requested_providers(kind: str, device_id: int) -> list[Any]:
    if kind == "cpu":
        return [CPU_PROVIDER]
    return [(CUDA_PROVIDER, {"device_id": device_id}), CPU_PROVIDER]


def create_session(model_path: Path, settings: EngineSettings) -> tuple[ort.InferenceSession, Placement]:
    """Creates the session on the device `settings.device` asks for; raises ModelLoadError.

    Returns the placement actually in effect, which is what ModelInfo reports.
    """
    kind, device_id = parse_device(settings.device)
    available = ort.get_available_providers()
    if kind == "cuda" and CUDA_PROVIDER not in available:
        raise ModelLoadError(
            f"device {settings.device!r} was requested but this onnxruntime build has no "
            f"{CUDA_PROVIDER} (available: {', '.join(available)}); install onnxruntime-gpu "
            "or use device 'cpu' / 'auto'"
        )
    if kind == "auto" and CUDA_PROVIDER not in available:
        logger.warning("device 'auto': this onnxruntime build has no %s; running %s on CPU", CUDA_PROVIDER, model_path)
        kind = "cpu"
    try:
        session = ort.InferenceSession(
            str(model_path),
            sess_options=session_options(settings),
            providers=_requested_providers(kind, device_id),
        )
    except Exception as exc:  # onnxruntime raises its own untyped errors; keep the reason
        raise ModelLoadError(f"onnxruntime could not load {model_path}: {exc}") from exc

    active = session.get_providers()
    if kind == "cpu":
        return session, Placement(CPU_PROVIDER, "cpu", 0)
    if CUDA_PROVIDER in active:
        return session, Placement(CUDA_PROVIDER, "cuda", device_id)
    if kind == "cuda":
        raise ModelLoadError(
            f"device {settings.device!r} was requested but onnxruntime fell back to "
            f"{', '.join(active)} (CUDA libraries or the GPU are not usable here); "
            "check the CUDA/cuDNN installation or use device 'cpu' / 'auto'"
        )
    logger.warning(
        "device 'auto': %s is installed but did not start for %s; running on CPU", CUDA_PROVIDER, model_path
    )
    return session, Placement(CPU_PROVIDER, "cpu", 0)
