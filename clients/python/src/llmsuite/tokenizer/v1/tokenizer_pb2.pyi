import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from llmsuite.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Truncation(_message.Message):
    __slots__ = ("max_length", "side")
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    SIDE_FIELD_NUMBER: _ClassVar[int]
    max_length: int
    side: _common_pb2.TruncationSide
    def __init__(self, max_length: _Optional[int] = ..., side: _Optional[_Union[_common_pb2.TruncationSide, str]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("model", "texts", "add_special_tokens", "return_offsets", "truncation")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RETURN_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    add_special_tokens: bool
    return_offsets: bool
    truncation: Truncation
    def __init__(self, model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., add_special_tokens: _Optional[bool] = ..., return_offsets: _Optional[bool] = ..., truncation: _Optional[_Union[Truncation, _Mapping]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("encodings", "content_hash")
    ENCODINGS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    encodings: _containers.RepeatedCompositeFieldContainer[_common_pb2.Encoding]
    content_hash: str
    def __init__(self, encodings: _Optional[_Iterable[_Union[_common_pb2.Encoding, _Mapping]]] = ..., content_hash: _Optional[str] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeRequest(_message.Message):
    __slots__ = ("model", "sequences", "skip_special_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    sequences: _containers.RepeatedCompositeFieldContainer[TokenIds]
    skip_special_tokens: bool
    def __init__(self, model: _Optional[str] = ..., sequences: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ..., skip_special_tokens: _Optional[bool] = ...) -> None: ...

class DecodeResponse(_message.Message):
    __slots__ = ("texts", "content_hash")
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    content_hash: str
    def __init__(self, texts: _Optional[_Iterable[str]] = ..., content_hash: _Optional[str] = ...) -> None: ...

class CountTokensRequest(_message.Message):
    __slots__ = ("model", "texts", "add_special_tokens")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    model: str
    texts: _containers.RepeatedScalarFieldContainer[str]
    add_special_tokens: bool
    def __init__(self, model: _Optional[str] = ..., texts: _Optional[_Iterable[str]] = ..., add_special_tokens: _Optional[bool] = ...) -> None: ...

class CountTokensResponse(_message.Message):
    __slots__ = ("counts", "total", "content_hash")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    total: int
    content_hash: str
    def __init__(self, counts: _Optional[_Iterable[int]] = ..., total: _Optional[int] = ..., content_hash: _Optional[str] = ...) -> None: ...

class ApplyChatTemplateRequest(_message.Message):
    __slots__ = ("model", "messages", "add_generation_prompt", "tokenize", "chat_template", "template_variables", "tools", "continue_final_message")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ADD_GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZE_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    TEMPLATE_VARIABLES_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    CONTINUE_FINAL_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    add_generation_prompt: bool
    tokenize: bool
    chat_template: str
    template_variables: _struct_pb2.Struct
    tools: _containers.RepeatedCompositeFieldContainer[_common_pb2.Tool]
    continue_final_message: bool
    def __init__(self, model: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., add_generation_prompt: _Optional[bool] = ..., tokenize: _Optional[bool] = ..., chat_template: _Optional[str] = ..., template_variables: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., tools: _Optional[_Iterable[_Union[_common_pb2.Tool, _Mapping]]] = ..., continue_final_message: _Optional[bool] = ...) -> None: ...

class ApplyChatTemplateResponse(_message.Message):
    __slots__ = ("text", "token_ids", "content_hash")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    content_hash: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., content_hash: _Optional[str] = ...) -> None: ...

class DecodeStreamStart(_message.Message):
    __slots__ = ("model", "request_id", "skip_special_tokens", "prefix_token_ids")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SKIP_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    model: str
    request_id: str
    skip_special_tokens: bool
    prefix_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model: _Optional[str] = ..., request_id: _Optional[str] = ..., skip_special_tokens: _Optional[bool] = ..., prefix_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DecodeStreamRequest(_message.Message):
    __slots__ = ("start", "token_ids")
    START_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    start: DecodeStreamStart
    token_ids: TokenIds
    def __init__(self, start: _Optional[_Union[DecodeStreamStart, _Mapping]] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ...) -> None: ...

class DecodeStreamResponse(_message.Message):
    __slots__ = ("request_id", "sequence_number", "text", "consumed_tokens", "final")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_NUMBER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CONSUMED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    sequence_number: int
    text: str
    consumed_tokens: int
    final: bool
    def __init__(self, request_id: _Optional[str] = ..., sequence_number: _Optional[int] = ..., text: _Optional[str] = ..., consumed_tokens: _Optional[int] = ..., final: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[TokenizerInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[TokenizerInfo, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class GetModelInfoResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: TokenizerInfo
    def __init__(self, info: _Optional[_Union[TokenizerInfo, _Mapping]] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ("model", "directory")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    model: str
    directory: str
    def __init__(self, model: _Optional[str] = ..., directory: _Optional[str] = ...) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("info", "previous_content_hash")
    INFO_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    info: TokenizerInfo
    previous_content_hash: str
    def __init__(self, info: _Optional[_Union[TokenizerInfo, _Mapping]] = ..., previous_content_hash: _Optional[str] = ...) -> None: ...

class GetTokenizerFilesRequest(_message.Message):
    __slots__ = ("model", "known_content_hash")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KNOWN_CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    model: str
    known_content_hash: str
    def __init__(self, model: _Optional[str] = ..., known_content_hash: _Optional[str] = ...) -> None: ...

class TokenizerFile(_message.Message):
    __slots__ = ("name", "content")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    name: str
    content: bytes
    def __init__(self, name: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class GetTokenizerFilesResponse(_message.Message):
    __slots__ = ("content_hash", "files")
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    content_hash: str
    files: _containers.RepeatedCompositeFieldContainer[TokenizerFile]
    def __init__(self, content_hash: _Optional[str] = ..., files: _Optional[_Iterable[_Union[TokenizerFile, _Mapping]]] = ...) -> None: ...

class SpecialToken(_message.Message):
    __slots__ = ("content", "id")
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    content: str
    id: int
    def __init__(self, content: _Optional[str] = ..., id: _Optional[int] = ...) -> None: ...

class SpecialTokens(_message.Message):
    __slots__ = ("bos", "eos", "pad", "unk", "additional")
    BOS_FIELD_NUMBER: _ClassVar[int]
    EOS_FIELD_NUMBER: _ClassVar[int]
    PAD_FIELD_NUMBER: _ClassVar[int]
    UNK_FIELD_NUMBER: _ClassVar[int]
    ADDITIONAL_FIELD_NUMBER: _ClassVar[int]
    bos: SpecialToken
    eos: SpecialToken
    pad: SpecialToken
    unk: SpecialToken
    additional: _containers.RepeatedCompositeFieldContainer[SpecialToken]
    def __init__(self, bos: _Optional[_Union[SpecialToken, _Mapping]] = ..., eos: _Optional[_Union[SpecialToken, _Mapping]] = ..., pad: _Optional[_Union[SpecialToken, _Mapping]] = ..., unk: _Optional[_Union[SpecialToken, _Mapping]] = ..., additional: _Optional[_Iterable[_Union[SpecialToken, _Mapping]]] = ...) -> None: ...

class TokenizerInfo(_message.Message):
    __slots__ = ("name", "vocab_size", "special_tokens", "model_max_length", "has_chat_template", "content_hash", "directory", "loaded_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODEL_MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    HAS_CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_HASH_FIELD_NUMBER: _ClassVar[int]
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    vocab_size: int
    special_tokens: SpecialTokens
    model_max_length: int
    has_chat_template: bool
    content_hash: str
    directory: str
    loaded_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., special_tokens: _Optional[_Union[SpecialTokens, _Mapping]] = ..., model_max_length: _Optional[int] = ..., has_chat_template: _Optional[bool] = ..., content_hash: _Optional[str] = ..., directory: _Optional[str] = ..., loaded_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
