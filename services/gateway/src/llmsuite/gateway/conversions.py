"""The one place where the gateway builds protos from its domain values.

Requests to the upstreams (Encode, ApplyChatTemplate, GenerateStart, Embed) and the
gateway's own answers (deltas, summaries, model summaries) are made here, so a new
option or message field is added once, not in each handler that forwards it.
"""

from __future__ import annotations

from collections.abc import Sequence

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.catalogue import EMBEDDING, ServedModel
from llmsuite.gateway.turns import Delta, TurnOutcome
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.inference.v1 import inference_pb2
from llmsuite.runtime.messages import duration
from llmsuite.tokenizer.v1 import tokenizer_pb2

# -- to the upstreams ------------------------------------------------------------------------------------------


def encode_request(model: str, texts: Sequence[str], *, add_special_tokens: bool | None,
                   return_offsets: bool = False, max_tokens: int | None = None) -> tokenizer_pb2.EncodeRequest:
    """`max_tokens` has the tokenizer cut each encoding there (`truncated` says it did)."""
    request = tokenizer_pb2.EncodeRequest(model=model, texts=texts, return_offsets=return_offsets)
    if max_tokens is not None:
        request.truncation.max_length = max_tokens
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    return request


def count_tokens_request(model: str, texts: Sequence[str], *,
                         add_special_tokens: bool | None) -> tokenizer_pb2.CountTokensRequest:
    request = tokenizer_pb2.CountTokensRequest(model=model, texts=texts)
    if add_special_tokens is not None:
        request.add_special_tokens = add_special_tokens
    return request


def decode_request(model: str, token_ids: Sequence[int], *, keep_special_tokens: bool) -> tokenizer_pb2.DecodeRequest:
    return tokenizer_pb2.DecodeRequest(model=model, sequences=[tokenizer_pb2.TokenIds(token_ids=token_ids)],
                                       skip_special_tokens=not keep_special_tokens)


def chat_template_request(model: str, messages: Sequence[common_pb2.ChatMessage],
                          tools: Sequence[common_pb2.Tool] = (), start: pb.ChatStart | None = None
                          ) -> tokenizer_pb2.ApplyChatTemplateRequest:
    """The whole conversation, rendered for the next assistant reply (or, with the start's
    continue_final_message, continuing the last message) and tokenized, with the start's
    chat_template_kwargs as template variables."""
    request = tokenizer_pb2.ApplyChatTemplateRequest(model=model, messages=messages, add_generation_prompt=True,
                                                     tokenize=True, tools=tools)
    if start is not None:
        if start.HasField("add_generation_prompt"):
            request.add_generation_prompt = start.add_generation_prompt
        request.continue_final_message = start.continue_final_message
        if start.HasField("chat_template_kwargs"):
            request.template_variables.CopyFrom(start.chat_template_kwargs)
    return request


def assistant_message(text: str, tool_calls: Sequence[common_pb2.ToolCall] = ()) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role="assistant", content=text, tool_calls=tool_calls)


def forwarded_sampling(sampling: common_pb2.SamplingParams) -> common_pb2.SamplingParams:
    """The caller's sampling as a replica gets it: stop strings are text-level, applied by the gateway."""
    forwarded = common_pb2.SamplingParams()
    forwarded.CopyFrom(sampling)
    del forwarded.stop_strings[:]
    return forwarded


def generate_start(*, request_id: str, model: ServedModel, prompt_ids: Sequence[int],
                   sampling: common_pb2.SamplingParams, truncate_prompt: bool = False,
                   session: bool = False) -> inference_pb2.GenerateStart:
    """A replica's Generate start. `session` keeps the stream open for further turns (it counts
    against the replica's --max-sessions); without it the stream ends after this one reply."""
    return inference_pb2.GenerateStart(
        request_id=request_id, model=model.name, prompt_token_ids=prompt_ids, sampling=forwarded_sampling(sampling),
        truncate_prompt=truncate_prompt, session=session, expected_tokenizer_hash=model.content_hash)


def embed_request(*, request_id: str, model: ServedModel, inputs: Sequence[Sequence[int]],
                  dimensions: int) -> inference_pb2.EmbedRequest:
    return inference_pb2.EmbedRequest(
        request_id=request_id, model=model.name, inputs=[common_pb2.TokenIds(token_ids=ids) for ids in inputs],
        dimensions=dimensions, expected_tokenizer_hash=model.content_hash)


def gateway_final(finish_reason: common_pb2.FinishReason, *, prompt_tokens: int,
                  completion_tokens: int) -> inference_pb2.GenerateFinal:
    """The final message of a turn whose replica sent none: the usage the gateway counted."""
    return inference_pb2.GenerateFinal(finish_reason=finish_reason, usage=common_pb2.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens))


# -- to the caller ---------------------------------------------------------------------------------------------


def text_delta(delta: Delta, *, token_ids: bool) -> pb.TextDelta:
    """`token_ids`: the caller asked for them (return_token_ids)."""
    return pb.TextDelta(text=delta.text, token_ids=delta.token_ids if token_ids else (), logprobs=delta.logprobs,
                        prompt_tokens=delta.prompt_tokens, completion_tokens=delta.completion_tokens)


def generation_summary(outcome: TurnOutcome) -> pb.GenerationSummary:
    """The replica's timings with the gateway's own total and time to first text."""
    final = outcome.final
    timings = common_pb2.Timings()
    timings.CopyFrom(final.timings)
    timings.total_time.CopyFrom(duration(outcome.total_s))
    if outcome.first_text_s is not None:
        timings.time_to_first_token.CopyFrom(duration(outcome.first_text_s))
    summary = pb.GenerationSummary(finish_reason=outcome.finish_reason, usage=final.usage, timings=timings,
                                   matched_stop_string=outcome.matched_stop_string or "")
    if not outcome.stopped_by_string and final.HasField("matched_stop_token_id"):
        summary.matched_stop_token_id = final.matched_stop_token_id
    return summary


def model_summary(model: ServedModel) -> pb.ModelSummary:
    return pb.ModelSummary(
        name=model.name, architecture=model.architecture, context_length=model.context_length,
        has_chat_template=model.has_chat_template, execution_provider=model.execution_provider,
        layout=model.layout, precision=model.precision, quantization=model.quantization,
        kind=common_pb2.MODEL_KIND_EMBEDDING if model.kind == EMBEDDING else common_pb2.MODEL_KIND_GENERATION,
        embedding_dimensions=model.embedding_dimensions, kv_cache_slots=model.kv_slots,
        kv_cache_slot_tokens=model.kv_slot_tokens)
