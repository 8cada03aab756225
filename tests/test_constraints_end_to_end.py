"""Constrained decoding through the whole stack: SDK -> gateway -> inference, real processes.

The constraint travels inside SamplingParams, so every RPC that samples honours it: gateway
Generate and GenerateStream (a streamed answer equals the unary one, token for token) and
Chat; the inference service's own Generate; bad constraints come back as INVALID_ARGUMENT
naming the field.
"""

from __future__ import annotations

import json

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from json_schemas import SCHEMAS, Schema, check_output
from support import ServiceProcess, processes

from llmsuite.client import Constraint, InvalidRequest, LlmsuiteClient, cli
from llmsuite.client.errors import error_details
from llmsuite.common.v1 import common_pb2
from llmsuite.inference.v1 import inference_pb2, inference_pb2_grpc

COMPLETE = ("grammar", "stop")


def upstream(kind: str, model_dir: object) -> ServiceProcess:
    argv = [f"llmsuite-{kind}", "--listen", "127.0.0.1:0", "--model", f"tiny={model_dir}"]
    if kind == "inference":
        argv += ["--device", "cpu", "--intra-op-threads", "1"]
    return ServiceProcess(argv)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir):
    tok, inf = upstream("tokenizer", tiny_model_dir), upstream("inference", tiny_model_dir)
    with processes(tok, inf):
        gw = ServiceProcess(["llmsuite-gateway", "--listen", "127.0.0.1:0", "--tokenizer", tok.address,
                             "--inference", inf.address])
        with processes(gw):
            yield {"inference": inf, "gateway": gw}


@pytest.fixture(scope="module")
def client(cluster):
    with LlmsuiteClient(cluster["gateway"].address) as client:
        yield client


@settings(max_examples=6, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=SCHEMAS)
def test_streamed_and_unary_answers_are_equal_and_valid(client: LlmsuiteClient, schema: Schema) -> None:
    constraint = Constraint.json_schema(schema)
    completed = 0
    for seed in (None, 0, 1):
        options = dict(max_new_tokens=160, temperature=0.0 if seed is None else 1.0, seed=seed, constraint=constraint)
        unary = client.generate("Reply in JSON:", **options)  # type: ignore[arg-type]
        with client.generate_stream("Reply in JSON:", **options) as stream:  # type: ignore[arg-type]
            streamed = "".join(chunk.text for chunk in stream)
            streamed_final = stream.completion
        assert streamed == unary.text
        assert streamed_final is not None and streamed_final.finish_reason == unary.finish_reason
        if unary.finish_reason in COMPLETE:
            completed += 1
            check_output(unary.text, schema)
        else:
            assert unary.finish_reason == "length"
    assert completed, f"no answer completed for {schema}"


def test_chat_replies_under_a_constraint(client: LlmsuiteClient) -> None:
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "score": {
        "type": "integer", "minimum": 0, "maximum": 9}}, "required": ["answer", "score"], "additionalProperties": False}
    with client.chat("tiny", max_new_tokens=40, temperature=0.0, constraint=Constraint.json_schema(schema)) as chat:
        first = chat.send("Is it raining?").wait()
        second = chat.send("And tomorrow?", constraint=Constraint.choice(["sunny", "rainy"])).wait()
        third = chat.send("Again, in JSON.").wait()
    for reply in (first, third):
        assert reply.finish_reason in COMPLETE
        check_output(reply.text, schema)
    assert second.text in ("sunny", "rainy") and second.finish_reason == "grammar"


def test_a_bad_schema_is_refused_naming_the_field(client: LlmsuiteClient) -> None:
    with pytest.raises(InvalidRequest) as refused:
        client.generate("x", constraint=Constraint.json_schema('{"type": "nope"}'))
    assert refused.value.reason == "CONSTRAINT_INVALID"
    assert [v.field for v in refused.value.field_violations] == ["sampling.constraint.json_schema"]
    with pytest.raises(InvalidRequest) as refused:
        client.generate("x", constraint=Constraint.regex("(unclosed"))
    assert [v.field for v in refused.value.field_violations] == ["sampling.constraint.regex"]


def test_the_inference_service_takes_constraints_on_its_own_generate(cluster) -> None:
    sampling = common_pb2.SamplingParams(max_new_tokens=20, temperature=0.0,
                                         constraint=common_pb2.Constraint(regex="[0-9]{4}"))
    start = inference_pb2.GenerateStart(model="tiny", prompt_token_ids=[5, 6, 7], sampling=sampling)
    with grpc.insecure_channel(cluster["inference"].address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        responses = list(stub.Generate(iter([inference_pb2.GenerateRequest(start=start)])))
        finals = [r.final for r in responses if r.WhichOneof("kind") == "final"]
        assert len(finals) == 1 and finals[0].finish_reason == common_pb2.FINISH_REASON_GRAMMAR
        empty = common_pb2.SamplingParams(constraint=common_pb2.Constraint())
        bad = inference_pb2.GenerateStart(model="tiny", prompt_token_ids=[5], sampling=empty)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.Generate(iter([inference_pb2.GenerateRequest(start=bad)])))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = error_details(refused.value)
    assert details["reason"] == "CONSTRAINT_INVALID"
    assert [field for field, _ in details["field_violations"]] == ["start.sampling.constraint"]


def test_the_cli_takes_structured_output_flags(cluster, capsys, tmp_path) -> None:
    address = cluster["gateway"].address
    common = ["--address", address, "generate", "--max-new-tokens", "20", "--temperature", "0", "Pick:"]
    assert cli.main([*common, "--choice", "red", "--choice", "green"]) == 0
    assert capsys.readouterr().out.strip() in ("red", "green")
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, '
                      '"required": ["n"], "additionalProperties": false}')
    assert cli.main([*common, "--json-schema", str(schema), "--json"]) == 0
    completion = json.loads(capsys.readouterr().out)
    assert completion["finish_reason"] == "grammar" and 0 <= json.loads(completion["text"])["n"] <= 9
