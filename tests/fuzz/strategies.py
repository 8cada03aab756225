"""Hypothesis strategies for any request message, built from its protobuf descriptor.

Every field gets values of its wire type with the edges included (empty, huge,
negative, NaN, unknown enum numbers, deep nesting); a few fields get values that
reach past the first validation (a real model name most of the time, ids inside the
vocabulary, short generations), or the fuzzer would spend its budget on NOT_FOUND.
The protobuf strategy packages on PyPI have been unmaintained since 2019, and this
is small.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

MODEL = "tiny"
VOCAB_SIZE = 1024  # the tiny model built by the fixtures
MAX_DEPTH = 4
F = FieldDescriptor

INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1), F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1), F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}


def integers(field_type: int) -> st.SearchStrategy[int]:
    low, high = INT_RANGES[field_type]
    edges = [value for value in (0, 1, -1, low, high, 2**31 - 1, 2**32 - 1) if low <= value <= high]
    return st.one_of(st.sampled_from(edges), st.integers(low, min(high, 300)), st.integers(low, high))


def texts(max_size: int = 40) -> st.SearchStrategy[str]:
    """Short text of any Unicode (surrogates excluded: proto strings are UTF-8), now and
    then a long one."""
    chars = st.characters(exclude_categories=("Cs",))
    return st.one_of(
        st.just(""), st.text(chars, max_size=max_size),
        st.builds(lambda piece, times: piece * times, st.text(chars, min_size=1, max_size=8),
                  st.integers(1000, 20_000)),
    )


def token_ids() -> st.SearchStrategy[list[int]]:
    return mostly(st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=24), st.one_of(
        st.lists(st.integers(0, 2**32 - 1), max_size=8),
        st.builds(lambda token, times: [token] * times, st.integers(0, VOCAB_SIZE - 1), st.integers(100, 5000)),
    ))


def json_values() -> st.SearchStrategy[Any]:
    leaves = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), texts(12))
    return st.recursive(leaves, lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(texts(8), inner, max_size=4)), max_leaves=12)


def structs() -> st.SearchStrategy[struct_pb2.Struct]:
    def build(values: dict[str, Any]) -> struct_pb2.Struct:
        struct = struct_pb2.Struct()
        struct.update(values)
        return struct
    return st.builds(build, st.dictionaries(texts(12), json_values(), max_size=5))


CHAT_TEMPLATES = (
    "", "", "", "{{ messages[0].content }}", "{% for m in messages %}{{ m.role }}{% endfor %}",
    "{{ raise_exception('no') }}", "{{ tools | tojson }}", "{% for %}", "{{ x.y.z }}", "{{ 1/0 }}",
    "{{ messages[0].content * 3 }}", "{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}",
)
ROLES = ("system", "user", "assistant", "tool", "", "USER", "robot")



def mostly(valid: st.SearchStrategy[Any], anything: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` about four times in five: hypothesis does not weigh one_of's branches (and
    leans to small integers, so the rare branch is the largest pick)."""
    return st.integers(0, 4).flatmap(lambda pick: anything if pick == 4 else valid)


def floats_in(low: float, high: float, width: int = 32) -> st.SearchStrategy[float]:
    return mostly(st.floats(low, high, width=width),
                  st.floats(allow_nan=True, allow_infinity=True, width=width))


# Field name -> strategy, for values that get past the first check most of the time.
OVERRIDES: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
    "model": lambda: mostly(st.just(MODEL), st.sampled_from(["", "nope", "TINY", "tiny ", "m" * 5000, "\x00"])),
    "temperature": lambda: floats_in(0.0, 2.0),
    "top_p": lambda: floats_in(0.125, 1.0),
    "repetition_penalty": lambda: floats_in(0.5, 2.0),
    "top_k": lambda: mostly(st.integers(0, 50), integers(F.TYPE_UINT32)),
    "stop_strings": lambda: mostly(st.just([]), st.lists(texts(), max_size=40)),
    "token_ids": token_ids,
    "prompt": lambda: mostly(texts(30).filter(bool), texts()),
    "content": lambda: mostly(texts(30), texts()),
    "texts": lambda: mostly(st.lists(texts(), min_size=1, max_size=4), st.lists(texts(), max_size=300)),
    "prompt_token_ids": token_ids,
    "prefix_token_ids": token_ids,
    "stop_token_ids": lambda: st.lists(st.integers(0, 2**32 - 1), max_size=4),
    "max_new_tokens": lambda: mostly(st.integers(0, 8), st.integers(0, 2**32 - 1)),
    "keep_history_tokens": lambda: mostly(st.integers(0, 16), integers(F.TYPE_UINT32)),
    "flush_every_tokens": lambda: mostly(st.integers(0, 8), integers(F.TYPE_UINT32)),
    "chat_template": lambda: st.sampled_from(CHAT_TEMPLATES),
    "role": lambda: mostly(st.sampled_from(ROLES[:3]), st.sampled_from(ROLES)),
    "directory": lambda: st.one_of(st.just(""), st.sampled_from(
        ("/proc/1/root", "/etc", "/", "relative", "/" + "d" * 300, "../../..")), texts(20)),
    "template_variables": structs,
    "top_logprobs": lambda: mostly(st.integers(0, 5), st.integers(0, 2**32 - 1)),
    "presence_penalty": lambda: floats_in(-2.0, 2.0),
    "frequency_penalty": lambda: floats_in(-2.0, 2.0),
    "min_p": lambda: floats_in(0.0, 1.0),
    "min_tokens": lambda: mostly(st.integers(0, 8), integers(F.TYPE_UINT32)),
}


def _overridden(field: FieldDescriptor) -> bool:
    # By name, for scalar fields only (`token_ids` is also a TokenIds message field).
    return field.name in OVERRIDES and (field.type != F.TYPE_MESSAGE or field.name == "template_variables")


def field_value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if _overridden(field):
        return OVERRIDES[field.name]()
    if field.type == F.TYPE_MESSAGE:
        if field.message_type.full_name == "google.protobuf.Struct":
            return structs()
        return messages(field.message_type, depth + 1)
    if field.type == F.TYPE_STRING:
        return texts()
    if field.type == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_ENUM:
        # Proto3 enums are open: numbers the schema does not name arrive too.
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-5, 100))
    if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        width = 32 if field.type == F.TYPE_FLOAT else 64
        return st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=width),
                         st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-9]))
    return integers(field.type)


def messages(descriptor: Descriptor, depth: int = 0, *, only: str | None = None) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`'s type. `only` picks one member of a oneof (e.g. the
    `start` of a stream request)."""
    cls = _message_class(descriptor)
    if depth > MAX_DEPTH:
        return st.just(cls())
    oneof_members = {field.name for oneof in descriptor.oneofs for field in oneof.fields}
    plain = [field for field in descriptor.fields if field.name not in oneof_members]

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for field in plain:
            # Steered and repeated fields are usually set; others half the time.
            usually = _overridden(field) or field.is_repeated
            if draw(st.integers(0, 7)) == 7 if usually else not draw(st.booleans()):
                continue  # unset: the default
            _assign(message, field, draw, depth)
        for oneof in descriptor.oneofs:
            choices = [f for f in oneof.fields if only is None or f.name == only]
            chosen = draw(st.sampled_from(choices)) if only else draw(st.one_of(st.none(), st.sampled_from(choices)))
            if chosen is not None:
                _assign(message, chosen, draw, depth)
        return message

    return build()


def _assign(message: Message, field: FieldDescriptor, draw: st.DrawFn, depth: int) -> None:
    if field.type == F.TYPE_MESSAGE and field.message_type.full_name == "google.protobuf.Struct":
        getattr(message, field.name).CopyFrom(draw(structs()))
        return
    if field.type == F.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
        key, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
        entries = draw(st.dictionaries(field_value(key, depth), field_value(value_field, depth), max_size=6))
        container = getattr(message, field.name)
        for entry_key, entry_value in entries.items():
            if value_field.type == F.TYPE_MESSAGE:
                container[entry_key].CopyFrom(entry_value)
            else:
                container[entry_key] = entry_value
        return
    if field.is_repeated:
        if _overridden(field):
            values = draw(OVERRIDES[field.name]())
        else:
            element = field_value(field, depth)
            values = draw(mostly(st.lists(element, min_size=1, max_size=6), st.lists(element, max_size=6)))
        container = getattr(message, field.name)
        if field.type == F.TYPE_MESSAGE:
            for value in values:
                container.add().CopyFrom(value)
        else:
            container.extend(values)
        return
    value = draw(field_value(field, depth))
    if field.type == F.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def _message_class(descriptor: Descriptor) -> type[Message]:
    from google.protobuf import message_factory

    return message_factory.GetMessageClass(descriptor)


def raw_requests(valid: st.SearchStrategy[Message]) -> st.SearchStrategy[bytes]:
    """Bytes on the wire that are probably not a valid message: random bytes, or a
    valid encoding truncated, extended or with a byte flipped."""
    def mutate(data: bytes, how: int, position: int, byte: int) -> bytes:
        if not data:
            return bytes([byte, 0xFF])
        position %= len(data)
        if how == 0:
            return data[:position]
        if how == 1:
            return data + bytes([byte, 0xFF, 0xFF])
        return data[:position] + bytes([data[position] ^ (byte or 1)]) + data[position + 1:]

    return st.one_of(
        st.binary(min_size=1, max_size=64),
        st.sampled_from([b"\x0a\xff\xff\xff\xff\x0f", b"\xff" * 16, b"\x08", b"\x12\x05abc"]),
        st.builds(mutate, valid.map(lambda m: m.SerializeToString()), st.integers(0, 2), st.integers(0, 10**6),
                  st.integers(0, 255)),
    )
