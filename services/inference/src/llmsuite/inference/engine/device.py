"""Choosing the onnxruntime execution provider, and proving it is the one in use.

onnxruntime-gpu silently falls back to CPU when CUDA cannot start (missing libraries,
no device), so the only trustworthy answer is `session.get_providers()` after the session
exists. "cuda" is a promise the operator asked for: break it loudly at load. "auto" is a
preference: fall back with a warning.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from llmsuite.inference.engine.errors import ModelLoadError
from llmsuite.inference.engine.ort_memory import share_cpu_arena
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

    def providers(self) -> list[Any]:
        """The provider list that puts another session (KV operations) on this same device."""
        return _requested_providers(self.device_type, self.device_id)


def parse_device(device: str) -> tuple[str, int]:
    """"cuda:1" -> ("cuda", 1); "auto", "cpu", "cuda" -> (kind, 0)."""
    kind, _, index = device.partition(":")
    return kind, int(index or 0)


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota.

    onnxruntime's own default is every physical core of the host, which in a container
    limited to 2 CPUs (or beside the gateway and tokenizer) oversubscribes and spins.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_cpu_quota() -> float | None:
    try:  # cgroup v2: "max 100000" or "<quota> <period>"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # cgroup v1
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def intra_op_threads(settings: EngineSettings) -> int:
    return settings.intra_op_threads or available_cores()


def session_options(settings: EngineSettings) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads(settings)
    options.inter_op_num_threads = settings.inter_op_threads
    options.graph_optimization_level = _OPTIMIZATION_LEVELS[settings.graph_optimization]
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.intra_op_spinning else "0")
    share_cpu_arena(options)
    return options


def gpu_free_bytes(device_id: int) -> int | None:
    """Free memory of a CUDA device as nvidia-smi reports it; None when it cannot be read."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        logger.warning("cannot read free GPU memory (nvidia-smi is not on PATH)")
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", str(device_id)],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(out.strip().splitlines()[0]) * 1024 * 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        logger.warning("cannot read free GPU memory from nvidia-smi")
        return None


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
