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
    or "cuda:N" (fail at load unless CUDA is really active). intra_op_threads 0 = the CPUs
    this process may use (affinity mask and cgroup quota), not every core of the host;
    intra_op_spinning lets ONNX Runtime threads busy-wait briefly between operators (they
    still sleep when there is no work); measured beside the gateway and tokenizer on 2
    cores it is the faster setting (docs/performance.md), so it is on by default.

    Admission is by KV memory: the rows running in the batch (prefilling or decoding)
    reserve the KV bytes they can grow to (prompt + max_new_tokens, padded to the batch's
    longest), and together with the prefix cache they must fit kv_cache_bytes (0 = sized
    at load from the process's memory limits, see engine/memory.py); the bytes counted are
    those of the tensors really held. max_memory_bytes bounds the whole process's resident
    memory: new requests are refused (RESOURCE_EXHAUSTED, MEMORY_PRESSURE) while the
    resident size plus what running requests may still grow by would pass it (None =
    derived from the cgroup limit or RLIMIT_AS, off when there is none; 0 = off).
    max_running caps the rows of one forward (latency), max_queued the requests waiting
    for room; beyond the queue requests are refused with ENGINE_OVERLOADED. With
    prefix_cache, every ended turn's KV stays cached and later requests starting with the
    same ids reuse it; entries are evicted least recently used when room is needed, and
    after session_idle_timeout_s unused. max_sessions caps open multi-turn sessions.
    prefill_chunk_tokens bounds the prompt tokens fed per scheduler step, so running
    streams keep receiving tokens while a long prompt is processed. warmup runs forwards
    at load through the path each model is served by (engine/warmup.py) and measures
    prefill speed for deadline checks.

    max_model_len caps the context a generation model serves (0 = the model's own): prompt
    plus output never pass it, and it is the length a KV slot reserves. slot_kv serves
    fused exports whose past and present share one buffer (genai_config.json's
    past_present_share_buffer) from a preallocated slot buffer (engine/slot_kv.py): as many
    slots of max_model_len tokens as kv_cache_bytes holds, at most max_running, the rest of
    the budget left to the prefix cache; off, they batch through the padded path, equal
    lengths only.

    A step that fails (a forward raising, an allocation failing) ends only the rows it
    was computing; the engine then checks its model still runs with a one-token forward,
    up to max_step_failures tries, and so many scheduler steps failing in a row outside
    any forward count the same way. Past that the engine gives up: every turn fails with
    UNAVAILABLE ENGINE_FAILED and the service reports NOT_SERVING and exits.

    Embedding models (engine/embedding.py) pack queued inputs into forwards of at most
    embed_batch_tokens padded tokens and hold at most embed_max_queued_inputs inputs
    waiting; pooling overrides the model files' pooling per model name.
    """

    device: str = "auto"
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    intra_op_spinning: bool = True
    graph_optimization: str = "all"
    max_running: int = 32
    max_queued: int = 64
    max_sessions: int = 256
    kv_cache_bytes: int = 0
    max_memory_bytes: int | None = None
    prefix_cache: bool = True
    prefill_chunk_tokens: int = 256
    session_idle_timeout_s: float = 300.0
    warmup: bool = True
    embed_batch_tokens: int = 8192
    embed_max_queued_inputs: int = 4096
    pooling: tuple[tuple[str, str], ...] = ()  # (model name, "MODE[:normalize|:no-normalize]")
    max_step_failures: int = 3
    max_model_len: int = 0
    slot_kv: bool = True

    def __post_init__(self) -> None:
        if not _DEVICE_PATTERN.match(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.graph_optimization not in GRAPH_OPTIMIZATION_LEVELS:
            raise ValueError(f"graph_optimization must be one of {GRAPH_OPTIMIZATION_LEVELS}")
        for name in ("intra_op_threads", "inter_op_threads", "max_queued", "kv_cache_bytes", "max_model_len"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_memory_bytes is not None and self.max_memory_bytes < 0:
            raise ValueError("max_memory_bytes must be >= 0 (0 = off)")
        for name in ("max_running", "max_sessions", "prefill_chunk_tokens", "embed_batch_tokens",
                     "embed_max_queued_inputs", "max_step_failures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_model_len == 1:
            raise ValueError("max_model_len must be 0 (the model's context) or at least 2 (a prompt and an output "
                             "token)")
        if self.session_idle_timeout_s <= 0:
            raise ValueError("session_idle_timeout_s must be > 0")


class ConstraintKind(enum.Enum):
    """Which grammar language a Constraint's text is in."""

    JSON_SCHEMA = "json_schema"
    JSON_OBJECT = "json_object"
    REGEX = "regex"
    GRAMMAR = "grammar"  # llguidance's Lark dialect, or GBNF
    CHOICE = "choice"


@dataclass(frozen=True)
class Constraint:
    """What the output must match (constrained decoding, engine/constraints.py).

    `text` holds the schema, regex or grammar (empty for JSON_OBJECT); `choices` the
    alternatives of CHOICE.
    """

    kind: ConstraintKind
    text: str = ""
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token of one turn.

    temperature 0 is greedy. top_k 0, top_p 1.0 and repetition_penalty 1.0 switch those
    filters off. The same seed gives the same tokens (None: a fresh random seed). Generation
    stops at any of stop_token_ids and, unless ignore_eos, at the model's eos ids. logprobs
    and top_logprobs > 0 report log-softmax of the model's raw logits (before penalty,
    temperature and filtering) for the chosen token and the top_logprobs most likely ones.
    constraint restricts every step to the tokens its grammar allows (logprobs still
    describe the unconstrained model).

    presence_penalty and frequency_penalty are OpenAI's (0 = off): subtracted from the logit
    of every token of this turn's output, once (presence) and per occurrence (frequency).
    logit_bias adds (token id, bias) pairs to the logits. min_p (0 = off) drops tokens less
    likely than min_p times the most likely one, after temperature. min_tokens masks the
    stop ids (eos included unless ignore_eos) until that many tokens were generated.
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
    constraint: Constraint | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_p: float = 0.0
    min_tokens: int = 0


class FinishReason(enum.Enum):
    """Why a turn ended."""

    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop id or an eos id was generated (it is the last token yielded)
    CANCELLED = "cancelled"  # cancel() or the consumer stopped iterating
    TIME_LIMIT = "time_limit"  # the deadline passed mid-generation
    CONTEXT_FULL = "context_full"  # a session reached the model's context length
    GRAMMAR = "grammar"  # the constraint's grammar was complete: no token could extend the output


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
    """The turn's context (session history and new ids) split in two: prompt_tokens were
    prefilled by this turn, cached_tokens came from the prefix cache. Their sum is the
    whole context the output was conditioned on."""

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
    directory: Path  # where the tokenizer files it pairs with are
    kind: str = "generation"  # or "embedding"
    embedding_dimensions: int = 0  # embedding models: the vector length
    pooling: str = ""  # embedding models: "cls", "mean" or "last"
    normalize: bool = False  # embedding models: vectors are L2-normalised
    layout: str = "optimum"  # "optimum" or "onnxruntime-genai"
    precision: str = "fp32"  # of the weights: fp32, fp16, bf16, int8, int4
    quantization: str = "none"
    attention: str = "unfused"  # the fused attention operator, if any
    kv_slots: int = 0  # slots of the preallocated KV buffer (slot_kv.py); 0 on the padded path
    kv_slot_tokens: int = 0  # tokens one slot holds (max_model_len or the context); 0 without slots


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of one model's load and memory; counters are totals since load."""

    model: str
    running: int  # rows admitted to the batch: prefilling or decoding
    queued: int
    sessions: int  # open multi-turn sessions
    cached_tokens: int  # KV tokens held right now (true lengths, no padding): running rows + prefix cache
    kv_bytes: int  # KV bytes held right now, padding included
    kv_budget_bytes: int  # what kv_cache_bytes resolved to
    kv_reserved_bytes: int  # what admitted rows reserve in their layout (a step's copy included) + the prefix cache
    prefix_cache_entries: int
    total_requests: int  # turns accepted
    completed: int
    cancelled: int
    time_limited: int
    rejected_overloaded: int
    prefix_cache_evictions: int  # entries dropped for room or after the idle timeout
    prefix_cache_hit_tokens: int  # prompt tokens whose KV came from the cache
    prefix_cache_query_tokens: int  # prompt tokens of admitted turns (hit rate = hit / query)
    steps: int  # scheduler steps that ran at least one forward
    decode_rows: int  # rows in the most recent decode forward
    free_kv_slots: int = 0  # slots of the KV buffer no row holds; 0 on the padded path (no slots)


@dataclass(frozen=True)
class StepReport:
    """What one scheduler step did; passed to the engine's step observer (metrics)."""

    model: str
    decode_rows: int  # rows in this step's decode forward(s), 0 if none
    decode_forwards: int  # >1 only for exports that cannot be left-padded (one forward per length)
    prefill_tokens: int  # prompt tokens fed this step
    seconds: float  # wall time of the step's model work
    prefill_forwards: int = 0  # prefill forwards run this step (fresh prompts share one)
