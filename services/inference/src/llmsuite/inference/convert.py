"""Protobuf <-> engine types for the inference service, in one place.

What the gateway needs of the same common.v1 messages lives in
`llmsuite.runtime.messages`, so the gateway never imports this package.
"""

from __future__ import annotations

from typing import cast

from llmsuite.common.v1 import common_pb2
from llmsuite.inference.engine import FinishReason, GeneratedToken, ModelInfo, SamplingParams, TurnResult
from llmsuite.inference.engine.embedding import EmbeddingResult
from llmsuite.inference.engine.types import Constraint, ConstraintKind, EngineStats
from llmsuite.inference.v1 import inference_pb2
from llmsuite.runtime.errors import InvalidArgument
from llmsuite.runtime.messages import DEFAULT_MAX_NEW_TOKENS, duration


def sampling_from_proto(msg: common_pb2.SamplingParams, *, field: str = "sampling",
                        allow_stop_strings: bool = False) -> SamplingParams:
    """Applies the documented defaults; range checks happen in the engine."""
    if msg.stop_strings and not allow_stop_strings:
        raise InvalidArgument.for_field(
            f"{field}.stop_strings", "text-level stop strings are applied by the gateway; the inference "
            "service sees token ids only (use stop_token_ids here)", reason="UNSUPPORTED_PARAMETER")
    if msg.top_logprobs and not msg.logprobs:
        raise InvalidArgument.for_field(f"{field}.top_logprobs", "requires logprobs to be set",
                                        reason="INVALID_FIELD")
    return SamplingParams(
        max_new_tokens=msg.max_new_tokens or DEFAULT_MAX_NEW_TOKENS,
        temperature=msg.temperature if msg.HasField("temperature") else 1.0,
        top_k=msg.top_k,
        top_p=msg.top_p if msg.HasField("top_p") else 1.0,
        repetition_penalty=msg.repetition_penalty if msg.HasField("repetition_penalty") else 1.0,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
        top_logprobs=msg.top_logprobs,
        constraint=constraint_from_proto(msg.constraint, field=f"{field}.constraint")
        if msg.HasField("constraint") else None,
        presence_penalty=msg.presence_penalty if msg.HasField("presence_penalty") else 0.0,
        frequency_penalty=msg.frequency_penalty if msg.HasField("frequency_penalty") else 0.0,
        logit_bias=tuple(sorted(msg.logit_bias.items())),
        min_p=msg.min_p if msg.HasField("min_p") else 0.0,
        min_tokens=msg.min_tokens,
    )


def constraint_from_proto(msg: common_pb2.Constraint, *, field: str) -> Constraint:
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument.for_field(field, "set one of json_schema, json_object, regex, grammar or choice",
                                        reason="CONSTRAINT_INVALID")
    if kind == "choice":
        return Constraint(ConstraintKind.CHOICE, choices=tuple(msg.choice.options))
    if kind == "json_object":
        return Constraint(ConstraintKind.JSON_OBJECT)
    return Constraint(ConstraintKind(kind), text=getattr(msg, kind))


def finish_reason_to_proto(reason: FinishReason) -> common_pb2.FinishReason:
    return cast(common_pb2.FinishReason, common_pb2.FinishReason.Value(f"FINISH_REASON_{reason.name}"))


def logprobs_to_proto(tokens: list[GeneratedToken]) -> list[common_pb2.PositionLogprobs]:
    return [
        common_pb2.PositionLogprobs(
            chosen=common_pb2.TokenLogprob(token_id=t.token_id, logprob=t.logprob or 0.0),
            top=[common_pb2.TokenLogprob(token_id=a.token_id, logprob=a.logprob) for a in t.top_logprobs],
        )
        for t in tokens if t.logprob is not None
    ]


def final_to_proto(result: TurnResult) -> inference_pb2.GenerateFinal:
    t = result.timings
    final = inference_pb2.GenerateFinal(
        finish_reason=finish_reason_to_proto(result.finish_reason),
        usage=common_pb2.Usage(prompt_tokens=result.usage.prompt_tokens,
                               completion_tokens=result.usage.completion_tokens,
                               cached_tokens=result.usage.cached_tokens),
        timings=common_pb2.Timings(queue_time=duration(t.queue_s), prefill_time=duration(t.prefill_s),
                                   time_to_first_token=duration(t.time_to_first_token_s),
                                   mean_inter_token_latency=duration(t.mean_inter_token_s),
                                   total_time=duration(t.total_s)),
    )
    if result.matched_stop_token_id is not None:
        final.matched_stop_token_id = result.matched_stop_token_id
    return final


def model_info_to_proto(info: ModelInfo, stats: EngineStats) -> inference_pb2.ModelInfo:
    msg = inference_pb2.ModelInfo(
        name=info.name, architecture=info.architecture, execution_provider=info.execution_provider,
        device=info.device, context_length=info.context_length, vocab_size=info.vocab_size,
        num_layers=info.num_layers, num_attention_heads=info.num_attention_heads,
        num_key_value_heads=info.num_kv_heads, head_dim=info.head_dim, kv_cache_dtype=info.kv_dtype,
        uses_position_ids=info.uses_position_ids, eos_token_ids=info.eos_token_ids,
        tokenizer_content_hash=info.tokenizer_hash, layout=info.layout, precision=info.precision,
        quantization=info.quantization, attention=info.attention, kv_cache_slots=info.kv_slots,
        kv_cache_slot_tokens=info.kv_slot_tokens,
        stats=inference_pb2.ModelStats(
            running=stats.running, queued=stats.queued, sessions=stats.sessions,
            cached_tokens=stats.cached_tokens, kv_cache_bytes=stats.kv_bytes,
            requests_total=stats.total_requests, cancelled_total=stats.cancelled,
            time_limited_total=stats.time_limited, kv_cache_budget_bytes=stats.kv_budget_bytes,
            kv_cache_reserved_bytes=stats.kv_reserved_bytes, rejected_total=stats.rejected_overloaded,
            prefix_cache_evictions_total=stats.prefix_cache_evictions, decode_batch_rows=stats.decode_rows,
            steps_total=stats.steps, prefix_cache_entries=stats.prefix_cache_entries,
            prefix_cache_hit_tokens_total=stats.prefix_cache_hit_tokens,
            prefix_cache_query_tokens_total=stats.prefix_cache_query_tokens,
            kv_cache_free_slots=stats.free_kv_slots),
    )
    if info.bos_token_id is not None:
        msg.bos_token_id = info.bos_token_id
    if info.kind == "embedding":
        msg.kind = common_pb2.MODEL_KIND_EMBEDDING
        msg.embedding_dimensions = info.embedding_dimensions
        msg.pooling.CopyFrom(common_pb2.PoolingInfo(mode=info.pooling, normalize=info.normalize))
    else:
        msg.kind = common_pb2.MODEL_KIND_GENERATION
    return msg


def embeddings_to_proto(request_id: str, result: EmbeddingResult) -> inference_pb2.EmbedResponse:
    return inference_pb2.EmbedResponse(
        request_id=request_id, embeddings=[common_pb2.Embedding(values=vector.tolist()) for vector in result.vectors],
        usage=common_pb2.Usage(prompt_tokens=result.prompt_tokens))
