"""Prefix affinity across replicas: conversations re-sent turn after turn stay where their KV is.

Two inference replicas behind one gateway. Stateless clients re-send each conversation in
full every turn. With affinity, every turn of a conversation lands on the replica that
computed the turn before, so its prefix cache covers the history; with plain round-robin,
turns alternate replicas and most of the history is recomputed. The prefix-cache hit rate
(hit / query tokens, from the replicas' own stats) must be higher with affinity, and many
distinct conversations must still spread over both replicas.
"""

from __future__ import annotations

import grpc
from support import ServiceProcess, processes

from llmsuite.common.v1 import common_pb2
from llmsuite.gateway.v1 import gateway_pb2 as pb
from llmsuite.gateway.v1 import gateway_pb2_grpc
from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc

SAMPLING = common_pb2.SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
CONVERSATIONS = 5  # odd: plain round-robin over 2 replicas then moves each conversation every turn
TURNS = 3
# Distinct first turns sent to check that affinity still spreads load. The rendezvous hash
# includes each replica's address, and the ports differ every run, so which replica a given
# conversation lands on is random: 5 conversations all land on one replica 1 run in 16, but
# 24 do so with probability 2**-23.
SPREAD_PROMPTS = 24


def _inference(model_dir) -> ServiceProcess:
    return ServiceProcess(["llmsuite-inference", "--listen", "127.0.0.1:0", "--model", f"tiny={model_dir}",
                           "--device", "cpu", "--intra-op-threads", "1"])


def _stats(replica: ServiceProcess) -> inference_pb2.ModelStats:
    with grpc.insecure_channel(replica.address) as channel:
        return inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(
            inference_pb2.GetModelInfoRequest(model="tiny")).info.stats


def _run_conversations(gateway: ServiceProcess, replicas: list[ServiceProcess], label: str
                       ) -> tuple[float, list[int]]:
    """Plays every conversation, re-sending its whole text each turn; returns the hit rate of
    this run and the requests each replica served."""
    before = [_stats(r) for r in replicas]
    with grpc.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        texts = [f"{label} conversation number {i}: a user asks about the weather in a long opening line. "
                 for i in range(CONVERSATIONS)]
        for turn in range(TURNS):
            for i in range(CONVERSATIONS):
                reply = stub.Generate(pb.GenerateRequest(model="tiny", prompt=texts[i], sampling=SAMPLING))
                texts[i] += reply.text + f" Then question {turn} follows. "
    pairs = list(zip([_stats(r) for r in replicas], before, strict=True))
    hit = sum(a.prefix_cache_hit_tokens_total - b.prefix_cache_hit_tokens_total for a, b in pairs)
    query = sum(a.prefix_cache_query_tokens_total - b.prefix_cache_query_tokens_total for a, b in pairs)
    return hit / query, [a.requests_total - b.requests_total for a, b in pairs]


def _first_turns(gateway: ServiceProcess, replicas: list[ServiceProcess]) -> list[int]:
    """Sends SPREAD_PROMPTS distinct one-token requests; returns the requests each replica served."""
    before = [_stats(r).requests_total for r in replicas]
    with grpc.insecure_channel(gateway.address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for i in range(SPREAD_PROMPTS):
            stub.Generate(pb.GenerateRequest(
                model="tiny", prompt=f"Spread check {i}: an opening line long enough to make an affinity key.",
                sampling=common_pb2.SamplingParams(max_new_tokens=1, temperature=0.0)))
    return [_stats(r).requests_total - b for r, b in zip(replicas, before, strict=True)]


def test_affinity_keeps_conversations_on_the_replica_that_holds_their_kv(tiny_model_dir) -> None:
    tokenizer = ServiceProcess(["llmsuite-tokenizer", "--listen", "127.0.0.1:0", "--model", f"tiny={tiny_model_dir}"])
    replicas = [_inference(tiny_model_dir), _inference(tiny_model_dir)]
    with processes(tokenizer, *replicas):
        gateways = {chars: ServiceProcess(["llmsuite-gateway", "--listen", "127.0.0.1:0",
                                           "--tokenizer", tokenizer.address,
                                           "--inference", ",".join(r.address for r in replicas),
                                           "--prefix-affinity-chars", chars])
                    for chars in ("64", "0")}
        with processes(*gateways.values()):
            # Each run has its own conversations, so neither reuses the other's KV.
            affine, affine_served = _run_conversations(gateways["64"], replicas, "affine")
            spread, spread_served = _run_conversations(gateways["0"], replicas, "round-robin")
            many_served = _first_turns(gateways["64"], replicas)
    assert sum(affine_served) == sum(spread_served) == CONVERSATIONS * TURNS, (affine_served, spread_served)
    assert all(spread_served), spread_served
    assert all(many_served), many_served
    # With affinity, turns 2 and 3 reuse everything but the newly added text.
    assert affine > 0.5 and affine > spread, (affine, spread)
