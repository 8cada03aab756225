"""AsyncLlmsuiteClient against the same fake gateway: the asyncio twin must
behave exactly like the blocking client."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from llmsuite.client import AsyncLlmsuiteClient, InvalidRequest, NotFound, Unauthenticated, Unavailable


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_generate_stream_and_metadata(gateway):
    async def scenario():
        async with AsyncLlmsuiteClient(gateway.address, api_key=gateway.api_key) as client:
            c = await client.generate("red green blue", max_new_tokens=2, request_id="a-1", return_token_ids=True)
            assert (c.text, c.finish_reason, c.request_id) == ("red green", "length", "a-1")
            assert c.token_ids == (gateway.word_id("red"), gateway.word_id("green"))
            md = gateway.app.last("Generate").metadata
            assert md["x-request-id"] == "a-1" and md["authorization"] == f"Bearer {gateway.api_key}"

            stream = client.generate_stream("one two three", max_new_tokens=5, request_id="a-2")
            texts = [chunk.text async for chunk in stream]
            assert texts == ["one", " two", " three"]
            assert stream.completion.text == "one two three" and stream.completion.finish_reason == "stop"
            assert stream.request_id == "a-2" == stream.completion.request_id

            async with client.generate_stream("x y") as again:
                assert (await again.wait()).usage.completion_tokens == 2

    run(scenario())


def test_breaking_out_of_an_async_stream_cancels_the_rpc(gateway):
    gateway.app.token_delay_s = 0.05

    async def scenario():
        async with AsyncLlmsuiteClient(gateway.address, api_key=gateway.api_key) as client:
            n = 0
            async for _chunk in client.generate_stream("w " * 200, max_new_tokens=200):
                n += 1
                if n == 2:
                    break
            await asyncio.get_running_loop().run_in_executor(None, gateway.app.cancelled.wait, 5)
            assert gateway.app.cancelled.is_set()

    run(scenario())


def test_errors_models_tokenize_count_health(gateway):
    async def scenario():
        async with AsyncLlmsuiteClient(gateway.address, api_key=gateway.api_key) as client:
            with pytest.raises(InvalidRequest) as info:
                await client.generate("hi", top_p=0.0)
            assert info.value.field_violations[0].field == "sampling.top_p"
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and info.value.reason == "INVALID_FIELD"
            with pytest.raises(Unavailable) as mid:
                async for _ in client.generate_stream("a crash"):
                    pass
            assert mid.value.reason == "UPSTREAM_CIRCUIT_OPEN"
            assert [m.name for m in await client.list_models()] == ["tiny", "tiny-gpt2"]
            enc = await client.tokenize(["hello world"], add_special_tokens=False)
            assert enc[0].token_ids == (gateway.word_id("hello"), gateway.word_id("world"))
            counts = await client.count_tokens(["a", "b c"], request_id="a-3")
            assert (counts.counts, counts.total, counts.request_id) == ((2, 3), 5, "a-3")
            assert await client.health() == "SERVING"
            assert await client.health("missing.Service") == "SERVICE_UNKNOWN"
        async with AsyncLlmsuiteClient(gateway.address) as anonymous:
            with pytest.raises(Unauthenticated):
                await anonymous.list_models()

    run(scenario())


def test_async_with_api_key(gateway):
    async def scenario():
        async with AsyncLlmsuiteClient(gateway.address) as anonymous:
            keyed = anonymous.with_api_key(gateway.api_key)
            assert [m.name for m in await keyed.list_models()] == ["tiny", "tiny-gpt2"]
            with pytest.raises(Unauthenticated):
                await anonymous.list_models()

    run(scenario())


def test_async_chat_refused_before_start_reports_the_servers_status(gateway):
    # The start write races the server's refusal; grpc.aio would report INTERNAL for the
    # writes that lose (grpc/grpc#36066), so repeat enough for some to lose.
    async def scenario():
        async with AsyncLlmsuiteClient(gateway.address, api_key="wrong") as client:
            for _ in range(40):
                async with client.chat("tiny") as chat:
                    with pytest.raises(Unauthenticated):
                        await chat.send("hi")

    run(scenario())


def test_async_chat_session(gateway):
    async def scenario():
        async with AsyncLlmsuiteClient(gateway.address, api_key=gateway.api_key) as client:
            async with client.chat(system="sys prompt", max_new_tokens=6, request_id="chat-a") as chat:
                texts = [chunk.text async for chunk in chat.send("hello async world")]
                assert texts == ["hello", " async", " world"]
                assert chat.last.usage.cached_tokens == 0 and chat.last.usage.prompt_tokens == 5
                # Two sends before reading: they run in order on the one stream.
                second, third = chat.send("two words", name="ann"), chat.send("three", top_k=3)
                third_done = await third
                assert second.completion.text == "two words" and third_done.text == "three"
                assert third_done.usage.cached_tokens == (5 + 3) + (2 + 2) and third_done.turn == 2
                assert chat.request_id == "chat-a"
        kinds = [r.WhichOneof("kind") for r in gateway.app.chat_requests]
        assert kinds == ["start", "turn", "turn"]
        assert [(m.content, m.name) for m in gateway.app.chat_requests[1].turn.messages] == [("two words", "ann")]
        assert gateway.app.chat_requests[2].turn.sampling.top_k == 3
        assert gateway.app.chat_requests[2].turn.sampling.max_new_tokens == 6
        assert sum(1 for c in gateway.app.calls if c.method == "Chat") == 1

    run(scenario())


def test_async_chat_cancel_and_errors(gateway):
    gateway.app.token_delay_s = 0.05

    async def scenario():
        async with AsyncLlmsuiteClient(gateway.address, api_key=gateway.api_key) as client:
            chat = client.chat()
            reply = chat.send("w " * 100, max_new_tokens=100)
            async for _ in reply:
                break
            await chat.cancel("stop")
            assert reply.completion.finish_reason == "cancelled"
            with pytest.raises(RuntimeError):
                chat.send("more")
            async with client.chat("missing") as bad:
                with pytest.raises(NotFound):
                    await bad.send("hi")

    run(scenario())
