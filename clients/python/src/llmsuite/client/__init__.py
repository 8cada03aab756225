"""Python SDK for the llmsuite gateway (docs/clients.md).

    from llmsuite.client import LlmsuiteClient

    with LlmsuiteClient("localhost:50050", api_key="...") as client:
        print(client.generate("Hello", max_new_tokens=8).text)
        stream = client.generate_stream("Hello")
        for chunk in stream:
            print(chunk.text, end="", flush=True)
        print(stream.completion.usage)

`AsyncLlmsuiteClient` is the asyncio twin. Failed calls raise
`LlmsuiteError` subclasses carrying the status code, reason and field
violations the server sent.
"""

from llmsuite.client.async_client import AsyncChatReply, AsyncChatSession, AsyncLlmsuiteClient, AsyncTextStream
from llmsuite.client.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InternalError,
    InvalidRequest,
    LlmsuiteError,
    NotFound,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)
from llmsuite.client.results import (
    ChatMessage,
    Completion,
    Constraint,
    Embeddings,
    Encoding,
    GenerateOptions,
    ModelInfo,
    PositionLogprobs,
    SamplingOptions,
    TextChunk,
    Timings,
    TokenCounts,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolChoice,
    Usage,
)
from llmsuite.client.sync_client import ChatReply, ChatSession, LlmsuiteClient, TextStream

__all__ = [
    "AsyncChatReply",
    "AsyncChatSession",
    "AsyncLlmsuiteClient",
    "AsyncTextStream",
    "Cancelled",
    "ChatMessage",
    "ChatReply",
    "ChatSession",
    "Completion",
    "Constraint",
    "DeadlineExceeded",
    "Embeddings",
    "Encoding",
    "FailedPrecondition",
    "FieldViolation",
    "GenerateOptions",
    "InternalError",
    "InvalidRequest",
    "LlmsuiteClient",
    "LlmsuiteError",
    "ModelInfo",
    "NotFound",
    "PermissionDenied",
    "PositionLogprobs",
    "RateLimited",
    "SamplingOptions",
    "TextChunk",
    "TextStream",
    "Timings",
    "TokenCounts",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
