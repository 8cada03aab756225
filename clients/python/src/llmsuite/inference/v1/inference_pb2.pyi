from llmsuite.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("start", "turn", "cancel")
    START_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    CANCEL_FIELD_NUMBER: _ClassVar[int]
    start: GenerateStart
    turn: GenerateTurn
    cancel: GenerateCancel
    def __init__(self, start: _Optional[_Union[GenerateStart, _Mapping]] = ..., turn: _Optional[_Union[GenerateTurn, _Mapping]] = ..., cancel: _Optional[_Union[GenerateCancel, _Mapping]] = ...) -> None: ...

class StreamOptions(_message.Message):
    __slots__ = ("flush_every_tokens",)
    FLUSH_EVERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    flush_every_tokens: int
    def __init__(self, flush_every_tokens: _Optional[int] = ...) -> None: ...

class GenerateStart(_message.Message):
    __slots__ = ("request_id", "model", "prompt_token_ids", "sampling", "session", "truncate_prompt", "stream_options", "expected_tokenizer_hash")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    STREAM_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    session: bool
    truncate_prompt: bool
    stream_options: StreamOptions
    expected_tokenizer_hash: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., session: _Optional[bool] = ..., truncate_prompt: _Optional[bool] = ..., stream_options: _Optional[_Union[StreamOptions, _Mapping]] = ..., expected_tokenizer_hash: _Optional[str] = ...) -> None: ...

class GenerateTurn(_message.Message):
    __slots__ = ("token_ids", "sampling", "keep_history_tokens")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    KEEP_HISTORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: _common_pb2.SamplingParams
    keep_history_tokens: int
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., keep_history_tokens: _Optional[int] = ...) -> None: ...

class GenerateCancel(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "sequence_number", "turn", "tokens", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sequence_number: int
    turn: int
    tokens: GeneratedTokens
    final: GenerateFinal
    def __init__(self, request_id: _Optional[str] = ..., sequence_number: _Optional[int] = ..., turn: _Optional[int] = ..., tokens: _Optional[_Union[GeneratedTokens, _Mapping]] = ..., final: _Optional[_Union[GenerateFinal, _Mapping]] = ...) -> None: ...

class GeneratedTokens(_message.Message):
    __slots__ = ("token_ids", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedCompositeFieldContainer[_common_pb2.PositionLogprobs]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[_Union[_common_pb2.PositionLogprobs, _Mapping]]] = ...) -> None: ...

class GenerateFinal(_message.Message):
    __slots__ = ("finish_reason", "usage", "timings", "matched_stop_token_id")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    MATCHED_STOP_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    finish_reason: _common_pb2.FinishReason
    usage: _common_pb2.Usage
    timings: _common_pb2.Timings
    matched_stop_token_id: int
    def __init__(self, finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ..., timings: _Optional[_Union[_common_pb2.Timings, _Mapping]] = ..., matched_stop_token_id: _Optional[int] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: ModelInfo
    def __init__(self, info: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "architecture", "execution_provider", "device", "context_length", "vocab_size", "num_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "kv_cache_dtype", "uses_position_ids", "eos_token_ids", "bos_token_id", "tokenizer_content_hash", "stats", "kind", "embedding_dimensions", "pooling", "layout", "precision", "quantization", "attention", "kv_cache_slots", "kv_cache_slot_tokens")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KEY_VALUE_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    USES_POSITION_IDS_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    POOLING_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_SLOT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    execution_provider: str
    device: str
    context_length: int
    vocab_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    kv_cache_dtype: str
    uses_position_ids: bool
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    bos_token_id: int
    tokenizer_content_hash: str
    stats: ModelStats
    kind: _common_pb2.ModelKind
    embedding_dimensions: int
    pooling: _common_pb2.PoolingInfo
    layout: str
    precision: str
    quantization: str
    attention: str
    kv_cache_slots: int
    kv_cache_slot_tokens: int
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., execution_provider: _Optional[str] = ..., device: _Optional[str] = ..., context_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_attention_heads: _Optional[int] = ..., num_key_value_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., kv_cache_dtype: _Optional[str] = ..., uses_position_ids: _Optional[bool] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., bos_token_id: _Optional[int] = ..., tokenizer_content_hash: _Optional[str] = ..., stats: _Optional[_Union[ModelStats, _Mapping]] = ..., kind: _Optional[_Union[_common_pb2.ModelKind, str]] = ..., embedding_dimensions: _Optional[int] = ..., pooling: _Optional[_Union[_common_pb2.PoolingInfo, _Mapping]] = ..., layout: _Optional[str] = ..., precision: _Optional[str] = ..., quantization: _Optional[str] = ..., attention: _Optional[str] = ..., kv_cache_slots: _Optional[int] = ..., kv_cache_slot_tokens: _Optional[int] = ...) -> None: ...

class ModelStats(_message.Message):
    __slots__ = ("running", "queued", "sessions", "cached_tokens", "kv_cache_bytes", "requests_total", "cancelled_total", "time_limited_total", "kv_cache_budget_bytes", "kv_cache_reserved_bytes", "rejected_total", "prefix_cache_evictions_total", "decode_batch_rows", "steps_total", "prefix_cache_entries", "prefix_cache_hit_tokens_total", "prefix_cache_query_tokens_total", "kv_cache_free_slots")
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TIME_LIMITED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    REJECTED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_EVICTIONS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DECODE_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_HIT_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREFIX_CACHE_QUERY_TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_FREE_SLOTS_FIELD_NUMBER: _ClassVar[int]
    running: int
    queued: int
    sessions: int
    cached_tokens: int
    kv_cache_bytes: int
    requests_total: int
    cancelled_total: int
    time_limited_total: int
    kv_cache_budget_bytes: int
    kv_cache_reserved_bytes: int
    rejected_total: int
    prefix_cache_evictions_total: int
    decode_batch_rows: int
    steps_total: int
    prefix_cache_entries: int
    prefix_cache_hit_tokens_total: int
    prefix_cache_query_tokens_total: int
    kv_cache_free_slots: int
    def __init__(self, running: _Optional[int] = ..., queued: _Optional[int] = ..., sessions: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ..., requests_total: _Optional[int] = ..., cancelled_total: _Optional[int] = ..., time_limited_total: _Optional[int] = ..., kv_cache_budget_bytes: _Optional[int] = ..., kv_cache_reserved_bytes: _Optional[int] = ..., rejected_total: _Optional[int] = ..., prefix_cache_evictions_total: _Optional[int] = ..., decode_batch_rows: _Optional[int] = ..., steps_total: _Optional[int] = ..., prefix_cache_entries: _Optional[int] = ..., prefix_cache_hit_tokens_total: _Optional[int] = ..., prefix_cache_query_tokens_total: _Optional[int] = ..., kv_cache_free_slots: _Optional[int] = ...) -> None: ...

class EmbedRequest(_message.Message):
    __slots__ = ("request_id", "model", "inputs", "dimensions", "truncate", "expected_tokenizer_hash")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    DIMENSIONS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATE_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TOKENIZER_HASH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenIds]
    dimensions: int
    truncate: bool
    expected_tokenizer_hash: str
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[_common_pb2.TokenIds, _Mapping]]] = ..., dimensions: _Optional[int] = ..., truncate: _Optional[bool] = ..., expected_tokenizer_hash: _Optional[str] = ...) -> None: ...

class EmbedResponse(_message.Message):
    __slots__ = ("request_id", "embeddings", "usage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    embeddings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Embedding]
    usage: _common_pb2.Usage
    def __init__(self, request_id: _Optional[str] = ..., embeddings: _Optional[_Iterable[_Union[_common_pb2.Embedding, _Mapping]]] = ..., usage: _Optional[_Union[_common_pb2.Usage, _Mapping]] = ...) -> None: ...
