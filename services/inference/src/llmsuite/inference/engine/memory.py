"""The process's memory: the limits it runs under, what it holds now, and the budgets that follow.

Three numbers come from here:
  * the automatic KV budget (`--kv-cache-bytes auto`), sized from the tightest of the
    limits this process really has (RLIMIT_AS, the cgroup's memory.max, `--max-memory`),
    or from the host's memory when it has none, after the model weights and a reserve for
    ONNX Runtime's working memory are taken off; on CUDA from the device's free memory;
  * the process memory limit (`--max-memory`, by default derived from the same limits),
    which the MemoryGuard keeps to by refusing new requests before it is reached;
  * the resident set size, read from /proc/self/statm.

A step's copies are inside the KV budget: an Optimum export returns the whole present
(past + the new column) as new tensors, so during a decode step the batch's KV exists twice,
and admission reserves that copy (padded_executor.py). Inside a limit of its own the KV
budget still takes only half of what the weights and the reserve leave: the other half is
margin for what no budget sees, ONNX Runtime's arena keeping its high-water mark and
fragmenting (docs/design.md, "Memory").
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from llmsuite.runtime.errors import ResourceExhausted

logger = logging.getLogger(__name__)

MIB = 1024**2
# ONNX Runtime's activations, arenas and the interpreter itself: measured on the tiny and
# bench presets at 64 concurrent streams (docs/reliability.md), with room to spare.
WORKING_MEMORY_RESERVE_BYTES = 512 * MIB
# The KV's share of what is left after the weights and the reserve.
KV_SHARE_OF_OWN_LIMIT = 0.5  # a limit set for this process: the other half is margin (see above)
KV_SHARE_OF_SHARED_HOST = 0.25  # no limit: the host's memory is shared with other services
KV_SHARE_OF_FREE_GPU_MEMORY = 0.5
FALLBACK_GPU_KV_BYTES = 2 * 1024**3
# The derived --max-memory stays this far below the process's own limit, so that refusals
# start before the kernel (or a failed allocation) acts.
MAX_MEMORY_SHARE_OF_LIMIT = 0.9

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _statm() -> tuple[int, int] | None:
    """(virtual, resident) bytes of this process, or None off Linux."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            virtual, resident = statm.read().split()[:2]
    except (OSError, ValueError):
        return None
    return int(virtual) * _PAGE_BYTES, int(resident) * _PAGE_BYTES


def resident_bytes() -> int:
    """This process's resident set size (0 where /proc is not available)."""
    sizes = _statm()
    return sizes[1] if sizes is not None else 0


@dataclass(frozen=True)
class MemoryLimits:
    """The memory this process may use, each in resident bytes; None where there is no such limit."""

    host_bytes: int
    cgroup_bytes: int | None
    address_space_bytes: int | None  # RLIMIT_AS, as the resident size it still allows

    @classmethod
    def detect(cls) -> MemoryLimits:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return cls(host_bytes=host, cgroup_bytes=_cgroup_limit_bytes(host), address_space_bytes=_address_space_limit())

    def own_limit(self) -> tuple[int, str] | None:
        """The tightest limit set for this process, and its name; None when only the host bounds it."""
        limits = [(value, name) for value, name in ((self.cgroup_bytes, "cgroup memory limit"),
                                                    (self.address_space_bytes, "RLIMIT_AS"))
                  if value is not None]
        return min(limits) if limits else None


def _address_space_limit() -> int | None:
    """RLIMIT_AS bounds virtual size, not residency: the resident bytes it still allows are
    today's resident size plus the address space left (thread stacks and arenas' reserved
    but untouched pages already count against it)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    sizes = _statm()
    if sizes is None:
        return int(soft)
    virtual, resident = sizes
    return max(0, resident + int(soft) - virtual)


def _cgroup_limit_bytes(host_bytes: int) -> int | None:
    """The smallest memory limit on this process's cgroup and its ancestors (v2), or the v1 limit."""
    limits: list[int] = []
    for path in _cgroup_v2_dirs():
        value = _read_limit(path / "memory.max")
        if value is not None:
            limits.append(value)
    v1 = _read_limit(Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))
    if v1 is not None:
        limits.append(v1)
    # v1 reports "no limit" as a huge number; anything at or above the host's memory is no limit.
    limits = [value for value in limits if value < host_bytes]
    return min(limits) if limits else None


def _cgroup_v2_dirs() -> list[Path]:
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return [root]
    relative = next((line.split(":", 2)[2] for line in lines if line.startswith("0::")), "/")
    current = root / relative.lstrip("/")
    dirs = [current, *current.parents]
    return [d for d in dirs if d == root or root in d.parents]


def _read_limit(path: Path) -> int | None:
    try:
        raw = path.read_text().strip()
    except OSError:
        return None
    return int(raw) if raw.isdigit() else None


@dataclass(frozen=True)
class KvBudgetChoice:
    """How `--kv-cache-bytes auto` was resolved, for the log and for operators."""

    budget_bytes: int  # for all models together
    basis: str
    limit_bytes: int
    weights_bytes: int
    reserve_bytes: int
    share: float

    def describe(self) -> str:
        if self.basis.startswith("fallback"):
            return f"{self.budget_bytes / MIB:.0f} MiB, the {self.basis}"
        if self.basis == "free GPU memory":
            return f"{self.share:.0%} of {self.limit_bytes / MIB:.0f} MiB free GPU memory after loading"
        return (f"{self.share:.0%} of ({self.basis} {self.limit_bytes / MIB:.0f} MiB - weights "
                f"{self.weights_bytes / MIB:.0f} MiB - working reserve {self.reserve_bytes / MIB:.0f} MiB)")


def automatic_kv_budget(*, on_gpu: bool, limits: MemoryLimits, max_memory_bytes: int | None,
                        weights: int, gpu_free_bytes: int | None) -> KvBudgetChoice:
    """The KV budget when the operator set none, for all models together (the caller splits it).

    Raises ValueError when the limit leaves nothing for the KV cache.
    """
    if on_gpu:
        # Measured after the session loaded, so the weights are already off the free memory.
        if gpu_free_bytes is None:
            return KvBudgetChoice(FALLBACK_GPU_KV_BYTES, "fallback (free GPU memory unknown)",
                                  FALLBACK_GPU_KV_BYTES, weights, 0, 1.0)
        free = gpu_free_bytes
        return KvBudgetChoice(int(free * KV_SHARE_OF_FREE_GPU_MEMORY), "free GPU memory", free, weights, 0,
                              KV_SHARE_OF_FREE_GPU_MEMORY)
    candidates = [(limits.host_bytes, "host memory", KV_SHARE_OF_SHARED_HOST)]
    own = limits.own_limit()
    if own is not None:
        candidates.append((own[0], own[1], KV_SHARE_OF_OWN_LIMIT))
    if max_memory_bytes:
        candidates.append((max_memory_bytes, "--max-memory", KV_SHARE_OF_OWN_LIMIT))
    limit, basis, share = min(candidates, key=lambda c: (c[0] - weights - WORKING_MEMORY_RESERVE_BYTES) * c[2])
    left = limit - weights - WORKING_MEMORY_RESERVE_BYTES
    if left <= 0:
        raise ValueError(
            f"the {basis} of {limit / MIB:.0f} MiB leaves no room for a KV cache after the weights "
            f"({weights / MIB:.0f} MiB) and ONNX Runtime's working memory ({WORKING_MEMORY_RESERVE_BYTES / MIB:.0f} "
            "MiB): raise the limit or set --kv-cache-bytes")
    return KvBudgetChoice(int(left * share), basis, limit, weights, WORKING_MEMORY_RESERVE_BYTES, share)


def resolve_max_memory(setting: int | None, limits: MemoryLimits) -> tuple[int | None, str]:
    """`--max-memory`: the operator's value (0 = off), else 90% of the process's own limit, else off."""
    if setting is not None:
        return (setting or None), ("--max-memory" if setting else "off (--max-memory 0)")
    own = limits.own_limit()
    if own is None:
        return None, "off (no cgroup memory limit or RLIMIT_AS)"
    return int(own[0] * MAX_MEMORY_SHARE_OF_LIMIT), f"{MAX_MEMORY_SHARE_OF_LIMIT:.0%} of the {own[1]}"


class MemoryGuard:
    """Refuses new requests while the process's memory is near `limit_bytes` (thread-safe).

    The resident size is read from /proc at most every `refresh_s`, never per token.
    """

    def __init__(self, limit_bytes: int, refresh_s: float = 0.05) -> None:
        self.limit_bytes = limit_bytes
        self._refresh_s = refresh_s
        self._lock = threading.Lock()
        self._resident = 0
        self._read_at = -float("inf")
        self.refused = 0

    def resident(self) -> int:
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self._refresh_s:
                self._resident, self._read_at = resident_bytes(), now
            return self._resident

    def admit(self, model: str, reservation_bytes: int, growth_to_come_bytes: int) -> None:
        """Raises ResourceExhausted (MEMORY_PRESSURE) when the resident size, plus what admitted
        requests may still grow by, plus this request's reservation, would pass the limit."""
        resident = self.resident()
        projected = resident + growth_to_come_bytes + reservation_bytes
        if projected <= self.limit_bytes:
            return
        with self._lock:
            self.refused += 1
        raise ResourceExhausted(
            f"the inference process holds {resident / MIB:.0f} MiB and its running requests may grow by "
            f"{growth_to_come_bytes / MIB:.0f} MiB; this request's {reservation_bytes / MIB:.1f} MiB of KV would "
            f"pass --max-memory ({self.limit_bytes / MIB:.0f} MiB); retry later",
            reason="MEMORY_PRESSURE",
            metadata={"model": model, "resident_bytes": str(resident), "max_memory_bytes": str(self.limit_bytes),
                      "needed_bytes": str(reservation_bytes)},
            retry_after_s=1.0,
        )
