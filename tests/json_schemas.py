"""Generated JSON Schemas for the constrained-decoding property tests.

Every schema bounds its output (string lengths, integer ranges, array sizes, no free
additional properties), so a random-weight model finishes most of them within a modest
token budget: the tests check every completed output, and that outputs do complete.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from hypothesis import strategies as st

Schema = dict[str, Any]

_NAMES = st.sampled_from(["a", "b", "id", "name", "ok", "n", "tag"])
_SHORT_TEXT = st.text(alphabet="abcxyz XYZ-_019é", min_size=0, max_size=4)


def _integer() -> st.SearchStrategy[Schema]:
    return st.tuples(st.integers(-50, 50), st.integers(0, 200)).map(
        lambda low_span: {"type": "integer", "minimum": low_span[0], "maximum": low_span[0] + low_span[1]})


def _string() -> st.SearchStrategy[Schema]:
    bounded = st.tuples(st.integers(0, 3), st.integers(0, 4)).map(
        lambda lo_extra: {"type": "string", "minLength": lo_extra[0], "maxLength": lo_extra[0] + lo_extra[1]})
    patterned = st.sampled_from(["^[a-z]{1,4}$", "^[0-9]{2}-[A-Z]$", "^(yes|no)$"]).map(
        lambda p: {"type": "string", "pattern": p})
    return bounded | patterned


_LEAVES: st.SearchStrategy[Schema] = st.one_of(
    _integer(),
    _string(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(_SHORT_TEXT | st.integers(-9, 99), min_size=1, max_size=4, unique=True).map(lambda v: {"enum": v}),
    (_SHORT_TEXT | st.integers(-9, 99) | st.booleans()).map(lambda v: {"const": v}),
)


def _compound(children: st.SearchStrategy[Schema]) -> st.SearchStrategy[Schema]:
    def as_object(properties: dict[str, Schema], required_mask: list[bool]) -> Schema:
        names = sorted(properties)
        required = [n for n, keep in zip(names, required_mask, strict=False) if keep]
        return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}

    objects = st.builds(as_object, st.dictionaries(_NAMES, children, min_size=1, max_size=3),
                        st.lists(st.booleans(), min_size=3, max_size=3))
    arrays = st.tuples(children, st.integers(0, 1), st.integers(0, 1)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2] + 1})
    unions = st.lists(children, min_size=2, max_size=2).map(lambda options: {"anyOf": options})
    return objects | arrays | unions


SCHEMAS: st.SearchStrategy[Schema] = st.recursive(_LEAVES, _compound, max_leaves=4)


def check_output(text: str, schema: Schema) -> Any:
    """Parses a completed output and validates it against the schema (raises if not)."""
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value
