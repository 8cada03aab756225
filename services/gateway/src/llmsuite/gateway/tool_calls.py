"""Tool calls in chat replies: each model family's call format, the grammar that
forces a call, and the streaming parser that finds calls in a reply.

A family writes calls its own way, and the chat template shows which
(`detect_format`), unless the operator names it (`--tool-call-parser NAME=FORMAT`):

- `hermes` (Hermes, Qwen 2.5/3, the builder's default template):
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number of them;
- `llama3_json` (Llama 3.1-3.3): the reply is `{"name": ..., "parameters": {...}}`,
  optionally after `<|python_tag|>`, several separated by `;`;
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`.

`ToolCallParser` reads the reply's text deltas and splits them into content and whole
calls. Text that may still become a call (a marker's first characters, an open call) is
held back, like a stop string's prefix, until the call is complete (then it is never
shown as text) or cannot be one (then it is released as text). Streamed and unary replies
go through the same parser, so the streamed calls are exactly the unary ones.

`forced_call_grammar` writes the Lark grammar (llguidance's dialect, with `%json` for the
JSON parts) that constrains a reply to exactly one call, in the family's own format, to a
declared function with arguments valid against its parameters' schema: what
`tool_choice` `required` or a named function asks for.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from llmsuite.runtime.errors import InvalidArgument

MAX_TOOLS = 128
_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
# How a forced call's JSON is written: compact structure but Python's json.dumps separators,
# which is how templates (`tojson`) write calls back into the conversation, and what the
# families were trained on.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class FunctionSpec:
    """A declared function: its name and its arguments' JSON Schema (an object schema)."""

    name: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True)
class ParsedCall:
    """One call found in a reply; `arguments` is a JSON object as JSON text."""

    name: str
    arguments: str


@dataclass(frozen=True)
class CallFormat:
    """How one model family writes tool calls.

    `opening` starts a call block and `closing` ends it; without `closing` the block ends
    where its JSON value ends. `opens_with_json`: a `{` (or `[`) at the start of the reply
    opens a block too (Llama 3 writes bare JSON). `only_at_start`: blocks are recognised
    only before any other text (Llama 3). `arguments_key` is what the family calls the
    arguments; `array`: a block holds a JSON list of calls (Mistral)."""

    name: str
    opening: str
    closing: str | None
    arguments_key: str
    array: bool = False
    opens_with_json: bool = False
    only_at_start: bool = False
    separators: str = ""  # characters allowed between consecutive blocks besides whitespace
    id_alphabet: str = string.ascii_letters + string.digits
    id_length: int = 24
    id_prefix: str = "call_"

    @property
    def markers(self) -> tuple[str, ...]:
        """Texts that may be special tokens, kept when the reply is detokenized."""
        return (self.opening,) + ((self.closing,) if self.closing else ())

    def new_call_id(self) -> str:
        return self.id_prefix + "".join(secrets.choice(self.id_alphabet) for _ in range(self.id_length))


FORMATS: dict[str, CallFormat] = {
    "hermes": CallFormat("hermes", "<tool_call>", "</tool_call>", "arguments"),
    "llama3_json": CallFormat("llama3_json", "<|python_tag|>", None, "parameters", opens_with_json=True,
                              only_at_start=True, separators=";"),
    # Mistral's templates refuse ids that are not 9 letters and digits.
    "mistral": CallFormat("mistral", "[TOOL_CALLS]", None, "arguments", array=True, id_length=9, id_prefix=""),
}


def detect_format(chat_template: str | None) -> CallFormat | None:
    """The family's format, from the markers its chat template writes (None: not known)."""
    if not chat_template:
        return None
    if "<tool_call>" in chat_template:
        return FORMATS["hermes"]
    if "[TOOL_CALLS]" in chat_template:
        return FORMATS["mistral"]
    if "<|python_tag|>" in chat_template or ('"parameters"' in chat_template and "ipython" in chat_template):
        return FORMATS["llama3_json"]
    return None


def parse_format_flags(values: Sequence[str]) -> dict[str, str]:
    """`--tool-call-parser NAME=FORMAT` values as {model: format}; ValueError names the bad one."""
    formats: dict[str, str] = {}
    for value in values:
        model, sep, fmt = value.partition("=")
        if not sep or not model or fmt not in FORMATS:
            raise ValueError(f"--tool-call-parser {value!r}: expected NAME=FORMAT with FORMAT one of "
                             f"{', '.join(sorted(FORMATS))}")
        formats[model] = fmt
    return formats


# -- declared functions --------------------------------------------------------------------------


def function_specs(tools: Sequence[tuple[str, str]], field_path: str = "start.tools") -> list[FunctionSpec]:
    """(name, parameters JSON text) pairs, checked: names valid and unique, parameters an
    object schema (empty: no arguments)."""
    if len(tools) > MAX_TOOLS:
        raise InvalidArgument.for_field(field_path, f"{len(tools)} tools exceed the limit of {MAX_TOOLS}",
                                        reason="TOO_MANY_TOOLS", limit=str(MAX_TOOLS))
    specs: list[FunctionSpec] = []
    seen: set[str] = set()
    for index, (name, parameters) in enumerate(tools):
        if not _NAME.match(name):
            raise InvalidArgument.for_field(f"{field_path}[{index}].name",
                                            "must be 1-64 of a-z, A-Z, 0-9, '_', '-' and '.'",
                                            reason="INVALID_TOOL")
        if name in seen:
            raise InvalidArgument.for_field(f"{field_path}[{index}].name", f"{name!r} is declared twice",
                                            reason="INVALID_TOOL")
        seen.add(name)
        schema: Any = {"type": "object", "properties": {}, "additionalProperties": False}
        if parameters:
            try:
                schema = json.loads(parameters)
            except ValueError as exc:
                raise InvalidArgument.for_field(f"{field_path}[{index}].parameters",
                                                f"must be a JSON Schema as JSON text: {exc}",
                                                reason="INVALID_TOOL") from None
            if not isinstance(schema, dict):
                raise InvalidArgument.for_field(f"{field_path}[{index}].parameters",
                                                "must be a JSON object (a JSON Schema)", reason="INVALID_TOOL")
        specs.append(FunctionSpec(name, schema))
    return specs


# -- forcing a call ------------------------------------------------------------------------------


def forced_call_grammar(fmt: CallFormat, functions: Sequence[FunctionSpec], *,
                        marker_token_id: int | None = None) -> str:
    """A Lark grammar for exactly one call, in `fmt`, to one of `functions` (pass just the
    named one for a named tool_choice). `marker_token_id`: the opening marker is this
    special token (written `<[id]>`), not text."""
    defs: dict[str, Any] = {}
    alternatives = []
    for index, function in enumerate(functions):
        arguments = _hoist_definitions(function.parameters, f"f{index}_", defs)
        alternatives.append({
            "type": "object",
            "properties": {"name": {"const": function.name}, fmt.arguments_key: arguments},
            "required": ["name", fmt.arguments_key],
            "additionalProperties": False,
        })
    schema: dict[str, Any] = {"anyOf": alternatives} if len(alternatives) > 1 else dict(alternatives[0])
    if defs:
        schema["$defs"] = defs
    schema["x-guidance"] = _JSON_STYLE
    call = "call: %json " + json.dumps(schema, ensure_ascii=False)
    if fmt.closing is not None:
        return f"start: {_lark_text(fmt.opening + chr(10))} call {_lark_text(chr(10) + fmt.closing)}\n{call}\n"
    body = '"[" call "]"' if fmt.array else "call"
    if fmt.opens_with_json:
        return f"start: {body}\n{call}\n"
    opening = f"<[{marker_token_id}]>" if marker_token_id is not None else _lark_text(fmt.opening)
    return f"start: {opening} {body}\n{call}\n"


def _lark_text(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _hoist_definitions(schema: Mapping[str, Any], prefix: str, defs: dict[str, Any]) -> Any:
    """The schema with its `$defs` / `definitions` moved into `defs` under `prefix`ed
    names (and its `$ref`s rewritten), since it is embedded below the call's root, where
    `#/$defs/...` would no longer resolve. Pydantic writes nested models this way."""
    local = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    renames = {name: prefix + name for name in local}

    def rewrite(value: Any) -> Any:
        if isinstance(value, dict):
            out = {}
            for key, item in value.items():
                if key == "$ref" and isinstance(item, str):
                    for root in ("#/$defs/", "#/definitions/"):
                        if item.startswith(root) and item[len(root):] in renames:
                            item = "#/$defs/" + renames[item[len(root):]]
                out[key] = rewrite(item)
            return out
        if isinstance(value, list):
            return [rewrite(item) for item in value]
        return value

    for name, definition in local.items():
        defs[renames[name]] = rewrite(definition)
    return rewrite({key: value for key, value in schema.items() if key not in ("$defs", "definitions")})


# -- parsing replies -----------------------------------------------------------------------------


@dataclass
class Parsed:
    """What a piece of reply released: text to show and whole calls."""

    content: str = ""
    calls: list[ParsedCall] = field(default_factory=list)


class ToolCallParser:
    """Splits one reply's text deltas into content and calls (one reply; not thread-safe).

    `feed` returns what can be released now; `finish` what remains when the reply ended.
    The concatenation of everything released is the same whatever the deltas' boundaries
    (tests/gateway/test_tool_calls.py checks it split at every character)."""

    def __init__(self, fmt: CallFormat, declared: Collection[str]) -> None:
        self._fmt = fmt
        self._declared = frozenset(declared)
        self._pending = ""  # content held back: trailing whitespace and a marker's possible start
        self._body: str | None = None  # the open block's text after its opening marker
        self._body_opening = ""  # the marker text that opened it (released as text if it is no call)
        self._seen_text = False  # non-blank content was released (Llama 3: no calls after it)
        self._made_calls = 0

    @property
    def made_calls(self) -> bool:
        return self._made_calls > 0

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        if self._body is not None:
            self._body += text
        else:
            self._pending += text
        self._advance(out, final=False)
        return out

    def finish(self) -> Parsed:
        out = Parsed()
        self._advance(out, final=True)
        if self._body is not None:
            calls = self._block_calls(self._body.strip())
            if calls is not None:
                self._emit_calls(out, calls)
            else:
                self._release(out, self._body_opening + self._body)
            self._body = None
        rest, self._pending = self._pending, ""
        if rest.strip(self._blank()) or not self._made_calls:
            self._release(out, rest)
        return out

    # -- the state machine

    def _advance(self, out: Parsed, *, final: bool) -> None:
        while True:
            if self._body is not None:
                if not self._close_block(out, final=final):
                    return
                continue
            if not self._open_block(out, final=final):
                return

    def _open_block(self, out: Parsed, *, final: bool) -> bool:
        """Looks for a block's start in the pending text; True when one opened."""
        text = self._pending
        fmt = self._fmt
        if fmt.only_at_start and self._seen_text:
            self._pending = ""
            self._release(out, text)
            return False
        start, marker = self._find_opening(text)
        if start >= 0:
            # Blanks before a call only separate it from the content: they go with the
            # block, and are shown only if it turns out not to be a call.
            before = text[:start]
            content = before.rstrip(self._blank())
            self._release(out, content)
            opened_by_json = marker in ("{", "[")
            self._body_opening = before[len(content):] + ("" if opened_by_json else marker)
            self._body = text[start:] if opened_by_json else text[start + len(marker):]
            self._pending = ""
            return True
        if final:
            return False
        keep = self._holdable_suffix(text)
        self._release(out, text[:len(text) - keep])
        self._pending = text[len(text) - keep:]
        return False

    def _find_opening(self, text: str) -> tuple[int, str]:
        fmt = self._fmt
        if fmt.only_at_start:
            head = len(text) - len(text.lstrip(" \t\r\n" + fmt.separators))
            if self._seen_text:
                return -1, ""
            rest = text[head:]
            if rest.startswith(fmt.opening):
                return head, fmt.opening
            if fmt.opens_with_json and rest[:1] in ("{", "["):
                return head, rest[:1]
            return -1, ""
        index = text.find(fmt.opening)
        return (index, fmt.opening) if index >= 0 else (-1, "")

    def _holdable_suffix(self, text: str) -> int:
        """How much of the text's end must wait: a possible marker start, and the blank
        text before it (dropped if a call follows)."""
        fmt = self._fmt
        blank = self._blank()
        if fmt.only_at_start:
            # Nothing but blanks so far: the reply may still open with a call.
            stripped = text.lstrip(blank)
            if not self._seen_text and fmt.opening.startswith(stripped):
                return len(text)
            return 0
        keep = 0
        for n in range(min(len(text), len(fmt.opening) - 1), 0, -1):
            if fmt.opening.startswith(text[-n:]):
                keep = n
                break
        head = text[:len(text) - keep]
        return keep + len(head) - len(head.rstrip(blank))

    def _close_block(self, out: Parsed, *, final: bool) -> bool:
        """Looks for the open block's end; True when it closed."""
        assert self._body is not None
        fmt = self._fmt
        if fmt.closing is not None:
            end = self._body.find(fmt.closing)
            if end < 0:
                return False
            inner, rest = self._body[:end], self._body[end + len(fmt.closing):]
            raw = self._body_opening + self._body[:end + len(fmt.closing)]
            calls = self._block_calls(inner.strip())
        else:
            found = _leading_json(self._body)
            if found is None:
                return False
            value, length = found
            inner, rest = self._body[:length], self._body[length:]
            raw = self._body_opening + inner
            calls = self._calls_from(value)
        self._body = None
        self._pending = rest
        if calls is None:
            self._release(out, raw)
        else:
            self._emit_calls(out, calls)
        return True

    def _block_calls(self, inner: str) -> list[ParsedCall] | None:
        try:
            value = json.loads(inner)
        except ValueError:
            return None
        return self._calls_from(value)

    def _calls_from(self, value: Any) -> list[ParsedCall] | None:
        items = value if self._fmt.array and isinstance(value, list) else [value]
        calls = []
        for item in items:
            call = self._call_from(item)
            if call is None:
                return None
            calls.append(call)
        return calls or None

    def _call_from(self, item: Any) -> ParsedCall | None:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        if self._declared and item["name"] not in self._declared:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):  # some models write the arguments' JSON text
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        return ParsedCall(item["name"], json.dumps(arguments, ensure_ascii=False))

    # -- releasing

    def _blank(self) -> str:
        """What may stand between content and a call, or between calls."""
        return " \t\r\n" + (self._fmt.separators if self._made_calls else "")

    def _emit_calls(self, out: Parsed, calls: list[ParsedCall]) -> None:
        out.calls.extend(calls)
        self._made_calls += len(calls)

    def _release(self, out: Parsed, text: str) -> None:
        if text:
            out.content += text
            if text.strip():
                self._seen_text = True


def _leading_json(text: str) -> tuple[Any, int] | None:
    """The JSON value at the start of `text` (after blanks) and where it ends, or None
    while it is incomplete (or not JSON: then it stays so until the reply ends)."""
    if "}" not in text and "]" not in text:  # no value can have ended yet
        return None
    start = len(text) - len(text.lstrip())
    try:
        value, end = json.JSONDecoder().raw_decode(text, start)
    except ValueError:
        return None
    return value, end
