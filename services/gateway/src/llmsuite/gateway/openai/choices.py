"""Several choices in one response: `n`, and /v1/completions' batched prompts.

Each choice is one gateway generation. Choice `prompt_index * n + j` is the j-th choice of
that prompt, as OpenAI numbers them. With a seed, choice j samples with seed + j, so the
choices differ from each other and the same request gives the same choices again (choice 0
is what the same request with n=1 gives).

Sharing the prompt: before the n generations of one prompt start, the adapter asks for one
greedy token of it (`warm_prefix`). That turn ends at once and leaves the prompt's KV in the
replica's prefix cache (which keeps the KV of ended turns only); the n choices, routed to
the same replica by the gateway's prefix affinity, then compute only the prompt's last token
each instead of the whole prompt. The cost is one decode step and one round trip; the saving
is n - 1 prefills, which is what dominates for any prompt longer than a few tokens.

Streams of several choices are merged in arrival order, each chunk tagged with its index.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from llmsuite.client import Completion, TextChunk

T = TypeVar("T")
_SEEDS = 2**64


def choice_seeds(seed: int | None, n: int) -> list[int | None]:
    """The seed of each of n choices: distinct and deterministic with a seed, random without.
    Choice 0 keeps the seed as sent, so a seed out of range is still refused by name."""
    return [None if seed is None else seed if j == 0 else (seed + j) % _SEEDS for j in range(n)]


async def all_of(calls: Sequence[Awaitable[T]]) -> list[T]:
    """Every result, in order; the first failure cancels the others (and so their generations)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class StreamedChoice:
    """One running streamed generation: its deltas, its result once they end, how to stop it."""

    index: int
    chunks: AsyncIterator[TextChunk]
    completion: Callable[[], Completion]
    close: Callable[[], Awaitable[None]]


async def merged(choices: Sequence[StreamedChoice]) -> AsyncGenerator[tuple[int, TextChunk], None]:
    """(choice index, chunk) from every choice as they arrive; the first failure ends it."""
    if len(choices) == 1:
        async for chunk in choices[0].chunks:
            yield choices[0].index, chunk
        return
    arrivals: asyncio.Queue[tuple[int, TextChunk | BaseException | None]] = asyncio.Queue()

    async def pump(choice: StreamedChoice) -> None:
        try:
            async for chunk in choice.chunks:
                await arrivals.put((choice.index, chunk))
        except Exception as exc:  # passed to the reader, which raises it in the response's task
            await arrivals.put((choice.index, exc))
            return
        await arrivals.put((choice.index, None))

    pumps = [asyncio.ensure_future(pump(choice)) for choice in choices]
    try:
        running = len(pumps)
        while running:
            index, item = await arrivals.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in pumps:
            task.cancel()


async def close_all(choices: Sequence[StreamedChoice]) -> None:
    for choice in choices:
        await choice.close()
