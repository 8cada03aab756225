"""The request bodies the HTTP API accepts, as strict pydantic models.

Strict on purpose: a wrong type (`"temperature": "hot"`, `"stream": 1`) or a
field nobody here knows is a 400 naming it, never silently coerced. The
policy for fields (docs/openai.md, Unknown fields): a field is honoured; or
it is known not to change what is generated (`store`, `metadata`, ...) and is
accepted, ignored and counted (`IGNORED_FIELDS`); or it would change the
answer and llmsuite cannot honour it, and is declared so that its neutral
value passes and anything else is refused by name (`unsupported_fields`: `best_of`, `suffix`, ...); a
field on none of these lists may change the answer, so it is refused too. Value ranges the
gateway checks (stop strings, caps) are left to it. Temperature, top_p and
repetition_penalty are checked here too, with the gateway's own function
(`llmsuite.runtime.sampling_limits`): JSON numbers are float64 and the protos
hold float32, so 1e-50 would reach the gateway as 0 (greedy) and 1e39 as inf.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmsuite.gateway.openai.tools import ToolCallParam, ToolChoiceParam, ToolParam, parse_tool_choice
from llmsuite.runtime.sampling_limits import check_sampling_values

# Choices one request may ask for: n times the number of prompts (each is one generation).
MAX_CHOICES = 64
_MAX_TOKEN_ID = 2**32 - 1


def _is_token_id(key: str) -> bool:
    return key.isascii() and key.isdigit() and int(key) <= _MAX_TOKEN_ID


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    # Fields accepted and ignored: they do not change what is generated (counted in
    # llmsuite_openai_ignored_fields_total). Each is declared on the model, typed Any.
    IGNORED_FIELDS: ClassVar[tuple[str, ...]] = ()

    def ignored_fields(self) -> list[str]:
        """The ignored fields this request sent."""
        return [name for name in self.IGNORED_FIELDS if name in self.model_fields_set]


class StreamOptions(_Strict):
    IGNORED_FIELDS: ClassVar[tuple[str, ...]] = ("include_obfuscation",)

    include_usage: bool | None = None
    # vLLM's: with include_usage, every chunk carries the usage so far (guidellm sends it).
    continuous_usage_stats: bool | None = None
    include_obfuscation: Any = None  # random padding against side channels: nothing to hide on this API


class _Sampling(_Strict):
    """What both endpoints share."""

    model: str = Field(min_length=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # llmsuite extensions, named as vLLM names them (send them with the openai client's extra_body).
    top_k: int | None = Field(default=None, ge=-1)  # -1 (vLLM) and 0 both mean off
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    min_p: float | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None

    # Accepted and ignored (see IGNORED_FIELDS): the caller's bookkeeping, OpenAI's storage and
    # routing hints, vLLM's scheduling priority; `prediction` (predicted outputs) only speeds
    # OpenAI up, the answer is the same.
    IGNORED_FIELDS: ClassVar[tuple[str, ...]] = (
        "user", "store", "metadata", "service_tier", "priority", "prediction", "prompt_cache_key", "safety_identifier")
    user: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    priority: Any = None
    prediction: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    # Would change the answer and are not supported: refused unless null (see unsupported_fields).
    prompt_logprobs: Any = None

    @field_validator("stop", mode="plain")
    @classmethod
    def _stop(cls, value: Any) -> str | list[str] | None:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value
        raise ValueError("must be a string or a list of strings")

    def check_sampling_values(self) -> None:
        """Raises llmsuite.runtime's InvalidArgument naming the parameter as sent (`temperature`)."""
        check_sampling_values(temperature=self.temperature, top_p=self.top_p,
                              repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, min_p=self.min_p,
                              logit_bias=self.token_biases(), field_prefix="")

    def token_biases(self) -> dict[int, float] | None:
        """logit_bias with its keys (JSON object keys, so strings) as token ids; keys that
        are not ids are refused by `unsupported_fields`."""
        if not self.logit_bias:
            return None
        return {int(key): bias for key, bias in self.logit_bias.items() if _is_token_id(key)}

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """(field, why) for every OpenAI field set to something llmsuite cannot do."""
        refused = []
        for key in self.logit_bias or {}:
            if not _is_token_id(key):
                refused.append(("logit_bias", f"key {key!r} is not a token id (a decimal integer)"))
        for index, token_id in enumerate(self.stop_token_ids or ()):
            if token_id < 0:
                refused.append((f"stop_token_ids[{index}]", "token ids are >= 0"))
        if self.stream_options is not None and not self.stream:
            refused.append(("stream_options", "stream_options is only allowed when stream is true"))
        if self.prompt_logprobs is not None:
            refused.append(("prompt_logprobs", "prompt_logprobs is not supported"))
        return refused

    def ignored_fields(self) -> list[str]:
        ignored = super().ignored_fields()
        if self.stream_options is not None:
            ignored += [f"stream_options.{name}" for name in self.stream_options.ignored_fields()]
        return ignored

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)


class CompletionRequest(_Sampling):
    """POST /v1/completions."""

    # A string, a list of strings, a list of token ids, or a list of token-id lists: normalized
    # by the validator to a list of prompts, each a string or a list of ids, one per choice group.
    prompt: list[str | list[int]]
    logprobs: int | None = Field(default=None, ge=0)
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="plain")
    @classmethod
    def _prompt(cls, value: Any) -> list[str | list[int]]:
        def is_ids(item: Any) -> bool:
            return (isinstance(item, list) and bool(item)
                    and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= _MAX_TOKEN_ID for i in item))

        if isinstance(value, str):
            return [value]
        if is_ids(value):
            return [value]
        if isinstance(value, list) and value and all(isinstance(item, str) or is_ids(item) for item in value):
            return list(value)
        raise ValueError("must be a string, a list of strings, a list of token ids or a list of token-id lists "
                         "(none empty, ids >= 0)")

    def unsupported_fields(self) -> list[tuple[str, str]]:
        refused = super().unsupported_fields()
        if len(self.prompt) * (self.n or 1) > MAX_CHOICES:
            refused.append(("n" if self.n not in (None, 1) else "prompt",
                            f"{len(self.prompt)} prompts x n={self.n or 1} asks for more than {MAX_CHOICES} choices"))
        if self.echo and any(not isinstance(prompt, str) for prompt in self.prompt):
            refused.append(("echo", "echo of a token-id prompt is not supported: the adapter has no tokenizer"))
        if self.echo and self.logprobs is not None:
            refused.append(("echo", "echo with logprobs needs the prompt's logprobs, which llmsuite does not compute"))
        if self.best_of not in (None, 1):
            refused.append(("best_of", "only best_of=1 is supported"))
        if self.suffix:
            refused.append(("suffix", "suffix (insertion) is not supported"))
        return refused


class ChatMessage(_Strict):
    # "developer" is what newer OpenAI models call the system message.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str = ""  # also a list of text parts, joined by the validator
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("content", mode="plain")
    @classmethod
    def _content(cls, value: Any) -> str:
        if value is None or isinstance(value, str):
            return value or ""
        if isinstance(value, list):
            texts = []
            for part in value:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                        and set(part) == {"type", "text"}):
                    raise ValueError("content parts must be {\"type\": \"text\", \"text\": ...}; "
                                     "images, audio and files are not supported")
                texts.append(part["text"])
            return "\n".join(texts)
        raise ValueError("must be a string or a list of text parts")

    @property
    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class JsonSchemaFormat(_Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    # Accepted either way: the engine enforces every schema as strictly as OpenAI's strict mode.
    strict: bool | None = None


class ResponseFormat(_Strict):
    """`json_object` and `json_schema` become the gateway's sampling constraint, enforced
    token by token by the inference engine."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0)
    response_format: ResponseFormat | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    # Accepted; a forced call (required, named) is one call, `auto` replies may hold several.
    parallel_tool_calls: bool | None = None
    # vLLM's chat extensions (extra_body): how the chat template renders the conversation.
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None
    continue_final_message: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    # Chat only. Ignored: parallel_tool_calls (see above), and ["text"] modalities is what is
    # generated anyway. Refused unless null: audio output, reasoning and
    # verbosity controls, web search.
    IGNORED_FIELDS: ClassVar[tuple[str, ...]] = (*_Sampling.IGNORED_FIELDS, "parallel_tool_calls", "modalities")
    modalities: list[str] | None = None
    audio: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    _tool_choice = field_validator("tool_choice", mode="plain")(parse_tool_choice)

    def unsupported_fields(self) -> list[tuple[str, str]]:
        refused = super().unsupported_fields()
        if self.functions:
            refused.append(("functions", "the legacy functions parameter is not supported: send tools"))
        if self.function_call not in (None, "none"):
            refused.append(("function_call", "the legacy function_call parameter is not supported: send tool_choice"))
        response_format = self.response_format
        if response_format is not None and (response_format.type == "json_schema") != (
                response_format.json_schema is not None):
            refused.append(("response_format", "json_schema goes with type json_schema, and only with it"))
        elif response_format is not None and response_format.json_schema is not None \
                and response_format.json_schema.schema_ is None:
            refused.append(("response_format.json_schema.schema", "the schema is required"))
        if self.continue_final_message and self.add_generation_prompt is not False:
            refused.append(("continue_final_message", "continuing the last message needs add_generation_prompt: false"))
        if self.modalities is not None and set(self.modalities) != {"text"}:
            refused.append(("modalities", "only text output is supported: modalities [\"text\"]"))
        for name in ("audio", "reasoning_effort", "verbosity", "web_search_options"):
            if getattr(self, name) is not None:
                refused.append((name, f"{name} is not supported"))
        if self.top_logprobs and not self.logprobs:
            refused.append(("top_logprobs", "top_logprobs requires logprobs: true"))
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
            refused.append(("max_completion_tokens", "max_tokens and max_completion_tokens disagree; send one"))
        return refused

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_param(self) -> str:
        """The name the caller used for the token cap (error messages say it back)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"


def generation_options(req: CompletionRequest | ChatCompletionRequest, max_new_tokens: int | None, logprobs: bool,
                       top_logprobs: int | None) -> dict[str, Any]:
    """The SDK's generation options (gateway SamplingParams and request flags) for one request,
    from the HTTP fields; None leaves the gateway's default."""
    return dict(
        max_new_tokens=max_new_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed, stop=req.stop,
        top_k=None if req.top_k == -1 else req.top_k, repetition_penalty=req.repetition_penalty,
        ignore_eos=bool(req.ignore_eos), logprobs=logprobs, top_logprobs=top_logprobs or None,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
        logit_bias=req.token_biases(), min_p=req.min_p, min_tokens=req.min_tokens,
        stop_token_ids=req.stop_token_ids, include_stop_str_in_output=req.include_stop_str_in_output,
        keep_special_tokens=req.skip_special_tokens is False,
    )


def chat_rendering(req: ChatCompletionRequest, keep_special_tokens: bool) -> dict[str, Any]:
    """The SDK chat() options for how the conversation is rendered and the reply decoded."""
    return dict(chat_template_kwargs=req.chat_template_kwargs, add_generation_prompt=req.add_generation_prompt,
                continue_final_message=bool(req.continue_final_message), keep_special_tokens=keep_special_tokens)
