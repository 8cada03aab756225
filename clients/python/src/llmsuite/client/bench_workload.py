"""What `llmsuite bench` sends: request lengths drawn from a seeded distribution,
and prompts of an exact token length.

Every request index gets the same plan at every concurrency level and in every run
with the same seed, so levels (and runs) differ only in how the requests overlap.

Prompts of exact length:
* ids (inference service): random ids within the model's vocabulary, leaving out its
  end-of-sequence and beginning-of-sequence ids;
* text (gateway): the gateway only takes text, so random English words are cut at a
  token boundary found with Tokenize offsets and the cut text is tokenized again to
  prove its length; the few cuts that re-tokenize differently (a word cut in the middle
  may merge) are moved and checked again. Counting uses the same tokenizer and the same
  special-token setting as the request itself, so usage.prompt_tokens + cached_tokens equals the target.
"""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

_SPEC = re.compile(r"^(?:(?P<fixed>\d+)|uniform:(?P<lo>\d+):(?P<hi>\d+)|normal:(?P<mean>\d+(?:\.\d+)?):"
                   r"(?P<std>\d+(?:\.\d+)?))$")

_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community "
    "name president team minute idea kid body information back parent face others level office door health "
    "person art war history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy music market sense nation plan college interest death experience effect "
    "small large good new first last long great little own other old right big high different local early "
    "young important few public bad same able see know take get give make find think tell become leave feel "
    "bring begin keep hold write stand hear let mean set meet run pay sit speak lie lead read grow lose fall "
    "send build stay fight throw watch follow stop create open walk win offer remember love consider appear "
    "buy wait serve die expect cut reach remain suggest raise pass sell require"
).split()


@dataclass(frozen=True)
class LengthSpec:
    """A token length: fixed ("128"), uniform over [lo, hi] ("uniform:64:192") or
    normal, rounded and kept >= 1 ("normal:128:16")."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, text: str) -> LengthSpec:
        match = _SPEC.match(text.strip())
        if match is None:
            raise ValueError(f"length {text!r}: expected N, uniform:LO:HI or normal:MEAN:STDDEV")
        if match["fixed"] is not None:
            spec = cls("fixed", int(match["fixed"]))
        elif match["lo"] is not None:
            spec = cls("uniform", int(match["lo"]), int(match["hi"]))
            if spec.a > spec.b:
                raise ValueError(f"length {text!r}: LO must not exceed HI")
        else:
            spec = cls("normal", float(match["mean"]), float(match["std"]))
        if spec.minimum < 1:
            raise ValueError(f"length {text!r}: lengths must be >= 1")
        return spec

    @property
    def minimum(self) -> int:
        return 1 if self.kind == "normal" else int(self.a)

    @property
    def maximum(self) -> int | None:
        """The longest length this spec can draw (None: unbounded, i.e. normal)."""
        return {"fixed": int(self.a), "uniform": int(self.b)}.get(self.kind)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    def __str__(self) -> str:
        if self.kind == "fixed":
            return str(int(self.a))
        if self.kind == "uniform":
            return f"uniform:{int(self.a)}:{int(self.b)}"
        return f"normal:{self.a:g}:{self.b:g}"


@dataclass
class Prompt:
    """One prompt (or one chat user message): ids always, text in text mode."""

    token_ids: list[int]
    text: str | None = None


@dataclass
class Conversation:
    """The plan of one benchmark job: a single request, or a chat's turns.
    Turn t sends user message `prompts[t]` and asks for `output_tokens[t]` tokens."""

    index: int
    prompts: list[Prompt]
    output_tokens: list[int]


def draw_lengths(count: int, turns: int, prompt: LengthSpec, output: LengthSpec, seed: int
                 ) -> list[list[tuple[int, int]]]:
    """(prompt length, output length) per job and turn; the same seed gives the same plan."""
    rng = random.Random(seed)
    return [[(prompt.sample(rng), output.sample(rng)) for _ in range(turns)] for _ in range(count)]


def random_ids(lengths: Sequence[int], vocab_size: int, excluded: Sequence[int], seed: int) -> list[Prompt]:
    allowed = vocab_size - len(set(excluded))
    if allowed < 1:
        raise ValueError("the vocabulary has no ids left to build prompts from")
    skip = sorted(set(excluded))
    rng = random.Random(seed ^ 0x1D5)

    def draw() -> int:
        value = rng.randrange(allowed)
        for e in skip:  # map [0, allowed) onto the vocabulary without the excluded ids
            if value >= e:
                value += 1
        return value

    return [Prompt([draw() for _ in range(n)]) for n in lengths]


Tokenize = Callable[[Sequence[str], bool], Awaitable[list[tuple[list[int], list[tuple[int, int]]]]]]
"""(texts, with_offsets) -> per text (token ids, character spans; empty without offsets)."""

_TOKENIZE_BATCH = 256  # the gateway's limit on texts per Tokenize call
_MAX_ATTEMPTS = 24


async def exact_texts(lengths: Sequence[int], tokenize: Tokenize, seed: int) -> list[Prompt]:
    """Texts that tokenize to exactly lengths[i] tokens with `tokenize` (which already
    applies the request's special-token setting). Raises ValueError when a length cannot
    be reached (e.g. shorter than the special tokens the tokenizer always adds)."""
    rng = random.Random(seed ^ 0x7E47)
    drafts = [_words(rng, n + 8) for n in lengths]
    found: dict[int, Prompt] = {}
    attempts = [0] * len(lengths)
    cuts: dict[int, int] = {}  # index -> content tokens to keep next time
    used: dict[int, int] = {}  # index -> content tokens kept by the cut being checked
    tried: dict[int, set[int]] = {i: set() for i in range(len(lengths))}
    pending = list(range(len(lengths)))
    while pending:
        # 1. Where the content tokens of each draft end.
        spans = await _batched(tokenize, [drafts[i] for i in pending], True)
        candidates: dict[int, str] = {}
        for i, (ids, offsets) in zip(pending, spans, strict=True):
            content = [end for start, end in offsets if end > start]
            special = len(ids) - len(content)
            if lengths[i] <= special:
                raise ValueError(f"a prompt of {lengths[i]} tokens is too short: the tokenizer adds {special} "
                                 "special tokens to every text")
            keep = cuts.get(i, lengths[i] - special)
            if keep > len(content):  # too few tokens: lengthen the draft and look again
                drafts[i] += " " + _words(rng, keep - len(content) + 8)
                cuts.pop(i, None)
                continue
            tried[i].add(keep)
            used[i] = keep
            candidates[i] = drafts[i][:content[keep - 1]]
        # 2. Prove each cut's length; move the cut (or start over) where it is off.
        order = list(candidates)
        encoded = await _batched(tokenize, [candidates[i] for i in order], False)
        for i, (ids, _) in zip(order, encoded, strict=True):
            if len(ids) == lengths[i]:
                found[i] = Prompt(list(ids), candidates[i])
                continue
            attempts[i] += 1
            if attempts[i] >= _MAX_ATTEMPTS:
                raise ValueError(f"could not build a text of exactly {lengths[i]} tokens with this tokenizer")
            moved = _next_cut(used[i], len(ids) - lengths[i], tried[i])
            if moved is None or attempts[i] % 6 == 0:  # this draft cannot land: take other words
                drafts[i] = _words(rng, lengths[i] + 8)
                cuts.pop(i, None)
                tried[i].clear()
            else:
                cuts[i] = moved
        pending = [i for i in range(len(lengths)) if i not in found]
    return [found[i] for i in range(len(lengths))]


def _next_cut(current: int, excess: int, tried: set[int]) -> int | None:
    """A content-token count not tried yet, moved against the excess first."""
    for step in (-excess, -1, 1, -2, 2):
        keep = current + step
        if keep >= 1 and keep not in tried:
            return keep
    return None


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(count))


async def _batched(tokenize: Tokenize, texts: Sequence[str], offsets: bool
                   ) -> list[tuple[list[int], list[tuple[int, int]]]]:
    out: list[tuple[list[int], list[tuple[int, int]]]] = []
    for start in range(0, len(texts), _TOKENIZE_BATCH):
        out += await tokenize(texts[start:start + _TOKENIZE_BATCH], offsets)
    return out
