from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsuite.gateway.stop_strings import (
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    StopScan,
    StopStringMatcher,
    validate_stop_strings,
)
from llmsuite.runtime.errors import InvalidArgument


def reference_cut(text: str, stops: list[str]) -> tuple[int, str | None]:
    """The specification, by brute force: scan end positions left to right; the
    first position where any stop string completes wins, the longest of those
    completing there is the match, and the output ends where it starts."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            matched = max(done, key=len)
            return end - len(matched), matched
    return len(text), None


def run(stops: list[str], deltas: list[str]) -> tuple[str, StopScan | None]:
    matcher = StopStringMatcher(stops)
    out = []
    last = None
    for d in deltas:
        last = matcher.feed(d)
        out.append(last.emit)
        if last.stopped:
            break
    out.append(matcher.flush())
    return "".join(out), last


# A tiny alphabet makes overlapping and repeated stop strings common.
alphabet = st.sampled_from("ab<|é")
stop_lists = st.lists(st.text(alphabet, min_size=1, max_size=5), min_size=1, max_size=4)
texts = st.text(alphabet, max_size=40)


@st.composite
def split_text(draw: st.DrawFn) -> list[str]:
    text = draw(texts)
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@settings(max_examples=400, deadline=None)
@given(stops=stop_lists, deltas=split_text())
def test_output_is_text_cut_at_first_completed_stop(stops: list[str], deltas: list[str]) -> None:
    text = "".join(deltas)
    cut, matched = reference_cut(text, stops)
    emitted, last = run(stops, deltas)
    assert emitted == text[:cut]
    if matched is None:
        assert last is None or not last.stopped
    else:
        assert last is not None and last.stopped and last.matched == matched


@settings(max_examples=400, deadline=None)
@given(stops=stop_lists, deltas=split_text())
def test_holds_back_only_what_a_continuation_could_still_cut(stops: list[str], deltas: list[str]) -> None:
    matcher = StopStringMatcher(stops)
    fed = emitted = ""
    for d in deltas:
        scan = matcher.feed(d)
        fed += d
        emitted += scan.emit
        if scan.stopped:
            break
        held = fed[len(emitted):]
        assert fed == emitted + held and matcher.held_back == held
        if held:
            # Minimal: some continuation makes the output end exactly where the
            # held-back text begins, so releasing any of it could have been wrong.
            assert any(
                reference_cut(fed + s[len(held):], stops)[0] == len(emitted)
                for s in stops if s.startswith(held)
            ), (fed, held)


def test_stop_string_split_over_many_deltas_is_not_emitted() -> None:
    m = StopStringMatcher(["<|end|>"])
    assert m.feed("Hello <") == StopScan("Hello ")
    assert m.feed("|e") == StopScan("")
    assert m.feed("nd|") == StopScan("")
    assert m.feed(">tail") == StopScan("", stopped=True, matched="<|end|>")
    assert m.feed("more") == StopScan("", stopped=True, matched="<|end|>")
    assert m.flush() == ""


def test_false_start_is_released_as_soon_as_it_diverges() -> None:
    m = StopStringMatcher(["<|end|>"])
    assert m.feed("a <|e").emit == "a "
    assert m.feed("x").emit == "<|ex"
    assert m.held_back == ""


def test_text_before_the_stop_in_the_same_delta_is_emitted() -> None:
    assert StopStringMatcher(["\n\n"]).feed("one\n\ntwo") == StopScan("one", stopped=True, matched="\n\n")


def test_first_stop_to_complete_wins_over_one_that_started_earlier() -> None:
    # "abcd" cannot complete before "bc" does, so it never holds "a" back.
    m = StopStringMatcher(["abcd", "bc"])
    assert m.feed("a") == StopScan("a")
    assert m.feed("bcd") == StopScan("", stopped=True, matched="bc")


def test_longest_stop_wins_when_several_complete_together() -> None:
    assert StopStringMatcher(["b", "ab"]).feed("xab") == StopScan("x", stopped=True, matched="ab")


def test_end_of_stream_releases_partial_match() -> None:
    m = StopStringMatcher(["</s>"])
    assert m.feed("done </").emit == "done "
    assert m.flush() == "</"
    assert m.flush() == ""


def test_no_stop_strings_streams_everything_immediately() -> None:
    m = StopStringMatcher([])
    assert m.feed("abc") == StopScan("abc")
    assert m.flush() == ""


def test_empty_stop_string_is_rejected_by_the_matcher() -> None:
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


def test_validate_accepts_and_deduplicates() -> None:
    assert validate_stop_strings(["a", "b", "a"]) == ("a", "b")
    assert validate_stop_strings([]) == ()


def test_validate_rejects_empty_stop_string_naming_its_index() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_stop_strings(["x", ""])
    assert err.value.reason == "INVALID_STOP_STRING"
    assert err.value.violations[0].field == "sampling.stop_strings[1]"


def test_validate_rejects_too_long_stop_string() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_stop_strings(["x" * (MAX_STOP_STRING_CHARS + 1)])
    assert err.value.reason == "INVALID_STOP_STRING"
    assert err.value.violations[0].field == "sampling.stop_strings[0]"
    assert str(MAX_STOP_STRING_CHARS) in err.value.message


def test_validate_rejects_too_many_stop_strings() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_stop_strings([str(i) for i in range(MAX_STOP_STRINGS + 1)])
    assert err.value.reason == "INVALID_STOP_STRING"
    assert err.value.violations[0].field == "sampling.stop_strings"
