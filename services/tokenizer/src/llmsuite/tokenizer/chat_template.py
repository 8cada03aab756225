"""Chat templates rendered the way Hugging Face `apply_chat_template` renders them.

Model templates are written against transformers' Jinja environment, so we copy its
semantics (sandbox, trim_blocks/lstrip_blocks, loopcontrols, a non-escaping `tojson`,
`raise_exception`, `strftime_now`, the `{% generation %}` tag) or real templates
would render differently here than in the library they were written for.

The Jinja sandbox stops a template from reaching Python internals, not from using
time or memory: the service renders in template worker processes
(`llmsuite.tokenizer.template_pool`), which is where those limits hold. What is here
bounds the output as it is produced and turns runaway recursion or allocation into
typed errors.
"""

from __future__ import annotations

import datetime
import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llmsuite.runtime.errors import FailedPrecondition, InvalidArgument

# Names the renderer always sets; a caller's extra context may not replace them.
RESERVED_CONTEXT_KEYS = frozenset({"messages", "add_generation_prompt"})
# Distinct override templates kept compiled; requests may send arbitrary ones.
COMPILED_TEMPLATE_CACHE_SIZE = 64
# Nesting of template variables (tools with JSON-schema parameters nest a few levels).
MAX_TEMPLATE_VARIABLE_DEPTH = 32


@dataclass(frozen=True)
class ToolCall:
    """A call an assistant message made; `arguments` is JSON text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    @property
    def chars(self) -> int:
        """What the message adds to a request's size."""
        return (len(self.content) + len(self.role) + len(self.name or "") + len(self.tool_call_id or "")
                + sum(len(c.id) + len(c.name) + len(c.arguments) for c in self.tool_calls))


@dataclass(frozen=True)
class RenderedChat:
    text: str
    ids: list[int] | None


@dataclass(frozen=True)
class ChatJob:
    """One render: the template source and the variables it sees (plain JSON data)."""

    source: str
    context: dict[str, Any]
    from_request: bool
    max_output_chars: int


class _TemplateRaised(jinja2.TemplateError):
    """What `raise_exception(...)` throws inside a template: the template rejects the input."""


def limit_exceeded(resource: str, description: str, *, from_request: bool) -> InvalidArgument:
    """A chat template ran into one of its resource limits (time, memory, output,
    recursion). The same request would hit it again, so it is the caller's problem
    either way; the field is the template when the caller sent it."""
    return InvalidArgument.for_field(
        "chat_template" if from_request else "messages",
        f"rendering the chat template exceeded its {resource} limit: {description}",
        reason="CHAT_TEMPLATE_LIMIT", resource=resource)


def _raise_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which would change prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format_string: str) -> str:
    return datetime.datetime.now().strftime(format_string)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to mark assistant
    tokens for training masks; for rendering it is transparent."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _make_environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


_ENVIRONMENT = _make_environment()


@functools.lru_cache(maxsize=COMPILED_TEMPLATE_CACHE_SIZE)
def _compile(source: str) -> jinja2.Template:
    return _ENVIRONMENT.from_string(source)


class ChatTemplate:
    """A compiled chat template. Build with `ChatTemplate.compile`; rendering is thread-safe."""

    def __init__(self, source: str, template: jinja2.Template) -> None:
        self.source = source
        self._template = template

    @classmethod
    def compile(cls, source: str, *, from_request: bool) -> ChatTemplate:
        """Compiles (or reuses) `source`. A syntax error is the caller's fault when the
        template came with the request, and the model's otherwise."""
        try:
            return cls(source, _compile(source))
        except jinja2.TemplateSyntaxError as exc:
            description = f"chat template does not compile (line {exc.lineno}): {exc.message}"
            if from_request:
                raise InvalidArgument.for_field("chat_template", description, reason="CHAT_TEMPLATE_INVALID") from exc
            raise FailedPrecondition(message=f"the model's {description}", reason="CHAT_TEMPLATE_INVALID") from exc

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool,
        special_tokens: Mapping[str, Any],
        extra_context: Mapping[str, Any] | None = None,
        max_output_chars: int | None = None,
        from_request: bool = False,
    ) -> str:
        """Renders the conversation; InvalidArgument when the template rejects it."""
        context = render_context(messages, add_generation_prompt, special_tokens, extra_context or {})
        return self.render_context(context, max_output_chars=max_output_chars, from_request=from_request)

    def render_context(self, context: Mapping[str, Any], *, max_output_chars: int | None = None,
                       from_request: bool = False) -> str:
        """Renders with a context built by `render_context`; stops as soon as the
        output passes `max_output_chars`."""
        try:
            if max_output_chars is None:
                return self._template.render(context)
            pieces: list[str] = []
            produced = 0
            for piece in self._template.generate(context):
                produced += len(piece)
                if produced > max_output_chars:  # stop now, not after rendering all of it
                    raise InvalidArgument.for_field(
                        "messages", f"rendered conversation exceeds limit {max_output_chars} characters",
                        reason="INPUT_TOO_LONG", limit=str(max_output_chars))
                pieces.append(piece)
            return "".join(pieces)
        except RecursionError as exc:  # a macro that calls itself without end
            raise limit_exceeded("recursion", "calls nested too deeply", from_request=from_request) from exc
        except MemoryError as exc:
            raise limit_exceeded("memory", "it allocated more than the renderer may", from_request=from_request
                                 ) from exc
        except _TemplateRaised as exc:
            raise InvalidArgument.for_field("messages", str(exc.message), reason="CHAT_TEMPLATE_ERROR") from exc
        except SecurityError as exc:
            raise InvalidArgument(
                message=f"chat template attempted an operation the sandbox forbids: {exc}",
                reason="CHAT_TEMPLATE_ERROR",
            ) from exc
        except (jinja2.TemplateError, TypeError, ValueError, ArithmeticError, LookupError) as exc:
            # Template code indexing into messages or adding strings fails on the
            # inputs it was given: report it as a bad request, not a server fault.
            raise InvalidArgument(
                message=f"chat template failed to render: {type(exc).__name__}: {exc}",
                reason="CHAT_TEMPLATE_ERROR",
            ) from exc



def check_template_variables(variables: Mapping[str, Any]) -> int:
    """Validates caller-supplied template variables (JSON data); returns their size in
    characters (strings and keys). InvalidArgument names the first bad path: no NaN or
    infinity (JSON has neither, and `tojson` would write invalid JSON), at most
    MAX_TEMPLATE_VARIABLE_DEPTH levels."""
    size = 0
    pending: list[tuple[Any, str, int]] = [(value, f"template_variables.{key}", 1) for key, value in
                                           variables.items()]
    size += sum(len(key) for key in variables)
    while pending:
        value, path, depth = pending.pop()
        if depth > MAX_TEMPLATE_VARIABLE_DEPTH:
            raise InvalidArgument.for_field(path, f"nested deeper than {MAX_TEMPLATE_VARIABLE_DEPTH} levels",
                                            limit=str(MAX_TEMPLATE_VARIABLE_DEPTH))
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidArgument.for_field(path, f"must be a finite number, not {value}")
        if isinstance(value, str):
            size += len(value)
        elif isinstance(value, Mapping):
            size += sum(len(key) for key in value)
            pending.extend((item, f"{path}.{key}", depth + 1) for key, item in value.items())
        elif isinstance(value, list | tuple):
            pending.extend((item, f"{path}[{index}]", depth + 1) for index, item in enumerate(value))
    return size


def render_context(
    messages: Sequence[ChatMessage],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, Any],
    extra_context: Mapping[str, Any],
) -> dict[str, Any]:
    """The variables a template sees, as transformers passes them (plain data: it
    travels to the template workers as JSON)."""
    for index, message in enumerate(messages):
        if not message.role:
            raise InvalidArgument.for_field(f"messages[{index}].role", "must not be empty")
    reserved = sorted(RESERVED_CONTEXT_KEYS.intersection(extra_context))
    if reserved:
        raise InvalidArgument.for_field(
            "template_variables", f"may not set {', '.join(reserved)}; they come from the request itself"
        )
    message_dicts = [_message_dict(message) for message in messages]
    # transformers passes tools/documents as None when absent, and the special
    # tokens map underneath caller kwargs; templates test for both.
    return {
        "tools": None,
        "documents": None,
        **special_tokens,
        **extra_context,
        "messages": message_dicts,
        "add_generation_prompt": add_generation_prompt,
    }


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    """A message as transformers hands it to templates. An assistant message that only
    calls tools has content None, as OpenAI clients send it; call arguments are a JSON
    object, not its text, because templates write them with `tojson` (vLLM converts them
    the same way), unless the text is not an object."""
    entry: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.name is not None:
        entry["name"] = message.name
    if message.tool_calls:
        if not message.content:
            entry["content"] = None
        entry["tool_calls"] = [{"id": call.id, "type": "function",
                                "function": {"name": call.name, "arguments": _json_object_or_text(call.arguments)}}
                               for call in message.tool_calls]
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    return entry


def _json_object_or_text(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text


def tool_definitions(tools: Sequence[tuple[str, str, str]], field_path: str = "tools") -> list[dict[str, Any]]:
    """(name, description, parameters JSON text) as the `tools` transformers passes:
    {"type": "function", "function": {"name", "description", "parameters"}}."""
    definitions = []
    for index, (name, description, parameters) in enumerate(tools):
        if not name:
            raise InvalidArgument.for_field(f"{field_path}[{index}].name", "required", reason="MISSING_FIELD")
        function: dict[str, Any] = {"name": name}
        if description:
            function["description"] = description
        if parameters:
            try:
                schema = json.loads(parameters)
            except ValueError as exc:
                raise InvalidArgument.for_field(f"{field_path}[{index}].parameters",
                                                f"must be a JSON Schema as JSON text: {exc}") from None
            if not isinstance(schema, dict):
                raise InvalidArgument.for_field(f"{field_path}[{index}].parameters", "must be a JSON object")
            function["parameters"] = schema
        else:
            function["parameters"] = {"type": "object", "properties": {}}
        definitions.append({"type": "function", "function": function})
    return definitions
