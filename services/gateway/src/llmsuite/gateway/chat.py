"""One Chat stream: the conversation, and the inference session that carries it.

Each turn is defined as: render the whole conversation with the chat template,
tokenize it (both in the tokenizer service), generate from those ids. So a
reply depends only on the conversation, never on what a cache holds (Hugging
Face's apply_chat_template + generate give the same tokens). The upstream
session is how it stays cheap: the turn keeps the longest prefix of the
session's history (prompt + generated ids) that equals the new ids, rewinds to
it (`keep_history_tokens`) and sends only the rest, and the replica's prefix
cache supplies the kept tokens' KV. When the generated ids do not re-tokenize
the same way, the rewind cuts where they differ instead of continuing from ids
the conversation no longer contains. A session that ended (a stop string, a
time limit) or whose tokenizer changed is replaced by a new one started with
the full ids, which the replica's prefix cache still mostly covers.

A stateless Chat (`start.stateless`, what /v1/chat/completions sends) opens no
session: each reply is a plain generation from the full ids, and its stream
ends with the reply, so nothing counts against the replica's --max-sessions.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator

import grpc

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway import conversions as conv
from llmsuite.gateway.admission import Admission
from llmsuite.gateway.affinity import chat_key
from llmsuite.gateway.catalogue import GENERATION, Catalogue, require_kind
from llmsuite.gateway.chat_tools import ChatTools, refuse_choice_without_tools
from llmsuite.gateway.generation import Deadline, relay_turn
from llmsuite.gateway.turns import Delta
from llmsuite.gateway.upstreams import InferenceStream, Upstreams
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.runtime.errors import FailedPrecondition, InvalidArgument
from llmsuite.runtime.logs import current_request_id, new_request_id
from llmsuite.runtime.messages import opening_message


class ChatSession:
    def __init__(self, upstreams: Upstreams, catalogue: Catalogue, admission: Admission,
                 context: grpc.aio.ServicerContext) -> None:
        self._up = upstreams
        self._catalogue = catalogue
        self._admission = admission
        self._limits = admission.limits
        self._context = context
        self._request_id = current_request_id() or new_request_id()
        self._messages: list[common_pb2.ChatMessage] = []
        self._history_ids: list[int] = []
        self._stream: InferenceStream | None = None
        self._stream_hash = ""  # content hash of the tokenizer the open session was built with
        self._sequence = 0

    def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    async def run(self, requests: AsyncIterator[pb.ChatRequest]) -> AsyncIterator[pb.ChatResponse]:
        first = await opening_message(requests, "Chat")
        if first is None:
            return
        start = first.start
        if not start.model:
            raise InvalidArgument.for_field("start.model", "required", reason="MISSING_FIELD")
        model = self._catalogue.lookup(start.model)
        require_kind(model, GENERATION)
        if not model.has_chat_template:
            raise FailedPrecondition(f"model {start.model!r} has no chat template; use Generate",
                                     reason="NO_CHAT_TEMPLATE")
        self._model_name = start.model
        self._sampling = start.sampling
        self._stateless = start.stateless
        self._tools = ChatTools.from_start(start, start.model, model.tokenizer, self._limits.tool_call_parsers)
        self._start = start  # how every turn's template is rendered and its text decoded
        new_messages, sampling = list(start.messages), start.sampling
        choice = None
        turn = 0
        while True:
            if not new_messages:
                raise InvalidArgument.for_field("turn.messages" if turn else "start.messages",
                                                "at least one message", reason="MISSING_FIELD")
            self._messages.extend(new_messages)
            self._limits.check_request_chars("turn.messages" if turn else "start.messages", (
                text for m in self._messages for text in (m.role, m.content, m.name, m.tool_call_id,
                                                          *(c.arguments for c in m.tool_calls))))
            if len(self._messages) > self._limits.max_chat_messages:
                raise InvalidArgument.for_field("turn.messages", "conversation exceeds "
                                                f"{self._limits.max_chat_messages} messages",
                                                reason="TOO_MANY_MESSAGES")
            reply: list[str] = []
            calls: list[common_pb2.ToolCall] = []
            async for response in self._turn(turn, sampling, choice, reply, calls):
                yield response
            self._messages.append(conv.assistant_message("".join(reply), calls))
            nxt = await anext(requests, None)
            if nxt is None:
                return
            kind = nxt.WhichOneof("kind")
            if kind == "cancel":
                return
            if kind != "turn":
                raise InvalidArgument.for_field("start", "`start` may only be sent once",
                                                reason="STREAM_ALREADY_STARTED")
            turn += 1
            new_messages = list(nxt.turn.messages)
            sampling = nxt.turn.sampling if nxt.turn.HasField("sampling") else self._sampling
            choice = nxt.turn.tool_choice if nxt.turn.HasField("tool_choice") else None

    async def _turn(self, turn: int, sampling: common_pb2.SamplingParams, choice: common_pb2.ToolChoice | None,
                    reply: list[str], calls: list[common_pb2.ToolCall]) -> AsyncIterator[pb.ChatResponse]:
        started_at = time.monotonic()
        model = self._catalogue.lookup(self._model_name)
        max_new, stops = self._admission.check_sampling(sampling)
        choice_field = "turn.tool_choice" if turn else "start.tool_choice"
        if self._tools is None:
            refuse_choice_without_tools(choice, choice_field)
        tools = self._tools.reply(choice, choice_field) if self._tools is not None else None
        if tools is not None:
            sampling = tools.constrained(sampling, choice_field)
        deadline = Deadline.split(self._context.time_remaining(), self._limits.deadline_margin_s)
        rendered = await self._up.apply_chat_template(conv.chat_template_request(
            model.name, self._messages, self._tools.tools if self._tools is not None else (), self._start),
            time_limit_s=self._context.time_remaining())
        self._catalogue.check_pairing(model, rendered.content_hash)
        full_ids = list(rendered.token_ids)
        if self._stream is not None and self._stream_hash != model.content_hash:
            self.close()  # the session's ids were made by another tokenizer
        kept = _common_prefix(self._history_ids, full_ids) if self._stream is not None else 0
        kept = min(kept, len(full_ids) - 1)  # the turn must feed at least one id
        new_ids = full_ids[kept:] if self._stream is not None else None
        charge = await self._admission.admit(len(new_ids if new_ids is not None else full_ids), max_new)
        used = 0
        try:
            if new_ids is None:
                self.close()
                self._history_ids = []
                self._stream = await self._up.open_generate(conv.generate_start(
                    request_id=self._request_id, model=model, prompt_ids=full_ids, sampling=sampling,
                    session=not self._stateless),
                    self._catalogue.replicas_for(model, chat_key(self._messages, self._limits.affinity_key_chars)),
                    time_limit_s=deadline.upstream_timeout_s)
                self._stream_hash = model.content_hash
                sent = full_ids
            else:
                assert self._stream is not None
                await self._stream.send_turn(new_ids, conv.forwarded_sampling(sampling),
                                             keep_history=kept if kept < len(self._history_ids) else None)
                sent = new_ids
            used = len(sent)
            context_ids = full_ids
            detok = model.tokenizer.detokenizer(context_ids, skip_special_tokens=not self._start.keep_special_tokens,
                                                keep_ids=tools.keep_ids() if tools is not None else ())
            async for item in relay_turn(self._stream, detok, stops, started_at=started_at,
                                         prompt_tokens=len(sent), prompt_length=len(full_ids), deadline=deadline,
                                         token_piece=model.tokenizer.token_piece,
                                         include_stop_string=sampling.include_stop_str_in_output):
                if isinstance(item, Delta):
                    used += len(item.token_ids)
                    text, made = tools.feed(item.text) if tools is not None else (item.text, [])
                    if not text and not item.logprobs and not made:
                        continue
                    reply.append(text)
                    calls.extend(made)
                    delta = conv.text_delta(dataclasses.replace(item, text=text), token_ids=False)
                    delta.tool_calls.extend(made)
                    yield pb.ChatResponse(request_id=self._request_id, sequence_number=self._sequence, turn=turn,
                                          delta=delta)
                else:
                    summary = conv.generation_summary(item)
                    if tools is not None:
                        text, made = tools.finish()  # what was held back as a possible call
                        if text or made:
                            reply.append(text)
                            calls.extend(made)
                            yield pb.ChatResponse(request_id=self._request_id, sequence_number=self._sequence,
                                                  turn=turn, delta=pb.TextDelta(
                                                      text=text, tool_calls=made, prompt_tokens=len(full_ids),
                                                      completion_tokens=len(item.generated_ids)))
                            self._sequence += 1
                        summary.finish_reason = tools.finish_reason(summary.finish_reason)
                    self._history_ids = context_ids + item.generated_ids
                    if item.stopped_by_string or item.time_limited or item.finish_reason in (
                            common_pb2.FINISH_REASON_CANCELLED, common_pb2.FINISH_REASON_TIME_LIMIT):
                        self.close()  # the upstream stream ended with this turn
                    yield pb.ChatResponse(request_id=self._request_id, sequence_number=self._sequence, turn=turn,
                                          final=summary)
                self._sequence += 1
            if self._stateless and self._stream is not None:
                await self._stream.finish()  # a plain generation's stream ends with its reply
                self.close()
        finally:
            charge.settle(used)



def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
