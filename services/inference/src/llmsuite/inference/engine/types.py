"""Domain types of the inference engine: what goes in, what comes out, how it is configured.

Nothing here imports onnxruntime; the servicer converts between these and protobuf.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

GRAPH_OPTIMIZATION_LEVELS = ("none", "basic", "extended", "all")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


@dataclass(frozen=True)
class EngineSettings:
    """How the engine loads models and how much work it accepts.

    device: "auto" (CUDA when it really works, else CPU with a warning), "cpu", "cuda"
    or "cuda:N" (fail at load unless CUDA is really active). Threads 0 = onnxruntime's
    default. max_running sequences share a model at once; up to max_queued more wait
    (FIFO), beyond that requests are refused with ENGINE_OVERLOADED. Retained sessions
    are capped by max_sessions, and the KV tokens held per model by max_cached_tokens
    (least recently used idle sessions are evicted first). An idle session's KV is
    dropped after session_idle_timeout_s; its history stays, so the next turn recomputes.
    warmup runs a forward at load and measures prefill speed for deadline checks.
    """

    device: str = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    graph_optimization: str = "all"
    max_running: int = 8
    max_queued: int = 64
    max_sessions: int = 256
    max_cached_tokens: int = 262144
    session_idle_timeout_s: float = 300.0
    warmup: bool = True

    def __post_init__(self) -> None:
        if not _DEVICE_PATTERN.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise ValueError(f"graph_optimization must be one of {GRAPH_OPTIMIZATION_LEVELS}")
        for name in ("intra_op_threads", "inter_op_threads", "max_queued", "max_cached_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        for name in ("max_running", "max_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.session_idle_timeout_s <= 0:
            raise ValueError("session_idle_timeout_s must be > 0")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one turn.

    temperature 0 is greedy. top_k 0, top_p 1.0 and repetition_penalty 1.0 switch those
    filters off. The same seed gives the same tokens (None: a fresh random seed). Generation
    stops at any of stop_token_ids and, unless ignore_eos, at the model's eos ids. logprobs
    and top_logprobs > 0 report log-softmax of the model's raw logits (before penalty,
    temperature and filtering) for the chosen token and the top_logprobs most likely ones.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0


class FinishReason(enum.Enum):
    """Why a turn ended."""

    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop id or an eos id was generated (it is the last token yielded)
    CANCELLED = "cancelled"  # cancel() or the consumer stopped iterating
    TIME_LIMIT = "time_limit"  # the deadline passed mid-generation
    CONTEXT_FULL = "context_full"  # a session reached the model's context length


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class GeneratedToken:
    """One sampled token; logprob fields are filled only when the request asked for them."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class TurnUsage:
    """prompt_tokens: this turn's new ids; cached_tokens: tokens whose KV was reused, not recomputed."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class TurnTimings:
    """Seconds, measured from the moment the turn was submitted.

    queue_s: until its first forward started; prefill_s: time spent in its prefill
    forwards; decode_s: from the first token to the last; mean_inter_token_s: decode_s
    per token after the first.
    """

    queue_s: float
    prefill_s: float
    time_to_first_token_s: float
    decode_s: float
    mean_inter_token_s: float
    total_s: float


@dataclass(frozen=True)
class TurnResult:
    """The last item of every generate() stream."""

    finish_reason: FinishReason
    matched_stop_token_id: int | None
    usage: TurnUsage
    timings: TurnTimings


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model is and where it runs; all read from the export, nothing assumed."""

    name: str
    architecture: str
    execution_provider: str
    device: str
    context_length: int
    vocab_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: str
    uses_position_ids: bool
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    tokenizer_hash: str
    directory: Path


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of one model's load and memory; counters are totals since load."""

    model: str
    running: int
    queued: int
    sessions: int  # open sessions that retain KV between turns
    cached_tokens: int  # KV tokens held right now, running and idle
    kv_bytes: int
    total_requests: int  # turns accepted
    completed: int
    cancelled: int
    time_limited: int
    rejected_overloaded: int
    evicted_sessions: int  # idle-session KV dropped for the idle timeout or the token cap
