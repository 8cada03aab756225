"""Every JSON body and SSE event the HTTP API writes stays one line for clients that split
lines with str.splitlines(), as httpx's aiter_lines (and so guidellm) does: a random model's
text can hold NEL or the Unicode line and paragraph separators, which JSON leaves raw."""

from __future__ import annotations

import json

import pytest

from llmsuite.gateway.openai.app import _json


@pytest.mark.parametrize("text", ["a\u2028b", "a\u2029b", "a\x85b", "a\nb\r\x1c\x1d\x1e\x0b\x0c", "naïve ✓"])
def test_json_is_one_line_for_splitlines_and_means_the_same(text):
    body = {"choices": [{"text": text, "index": 0}], "usage": None}
    written = _json(body)
    assert written.splitlines() == [written]
    assert json.loads(written) == body


def test_other_text_stays_as_written():
    assert _json({"text": "naïve ✓"}) == '{"text":"naïve ✓"}'
