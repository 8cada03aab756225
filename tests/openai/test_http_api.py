"""Raw HTTP against `llmsuite-openai`: every bad input is a 4xx in OpenAI's
error shape (never a 500 or a dropped connection), statuses follow the
gateway's (401, 404, 429 with Retry-After, 503), and a caller that goes away
cancels its generation upstream."""

from __future__ import annotations

import json
import signal
import socket

import httpx
import pytest
from metrics_scrape import Scrape

from llmsuite.client import LlmsuiteClient

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": "tiny", "prompt": "Hi", "max_tokens": 2}


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster.base_url, headers={"Authorization": f"Bearer {cluster.api_key}"},
                      timeout=60) as c:
        yield c


def assert_openai_error(response: httpx.Response, status: int, *, param: str | None = None,
                        code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def with_(base: dict, **changes) -> dict:
    body = {**base, **changes}
    return {k: v for k, v in body.items() if v is not ...}


BAD_BODIES = [
    # (path, raw body or JSON value, expected param, expected code)
    ("/completions", b"{not json", None, "invalid_json"),
    ("/completions", b"", None, "invalid_json"),
    ("/chat/completions", b"[1, 2]", None, "invalid_json"),
    ("/chat/completions", b'"a string"', None, "invalid_json"),
    ("/chat/completions", b"\xff\xfe", None, "invalid_json"),
    ("/completions", with_(COMPLETION, model=...), "model", "missing_required_parameter"),
    ("/completions", with_(COMPLETION, model=""), "model", "invalid_value"),
    ("/completions", with_(COMPLETION, model=7), "model", "invalid_value"),
    ("/completions", with_(COMPLETION, prompt=...), "prompt", "missing_required_parameter"),
    ("/completions", with_(COMPLETION, prompt=[1, 99_999]), "prompt[1]", "token_id_out_of_range"),
    ("/completions", with_(COMPLETION, prompt=["a", 5]), "prompt", "invalid_value"),
    ("/completions", with_(COMPLETION, prompt=[[1], ["a"]]), "prompt", "invalid_value"),
    ("/completions", with_(COMPLETION, prompt=[1, 2], echo=True), "echo", "unsupported_parameter"),
    ("/completions", with_(COMPLETION, temperature="hot"), "temperature", "invalid_value"),
    ("/completions", with_(COMPLETION, temperature=-1), "temperature", "invalid_field"),
    ("/completions", with_(COMPLETION, top_p=0), "top_p", "invalid_field"),
    # Values that cannot give a distribution: refused by name, never NaN logits mid-batch.
    ("/completions", with_(COMPLETION, temperature=1e-38, top_p=0.9), "temperature", "invalid_field"),
    ("/completions", with_(COMPLETION, temperature=1e-50), "temperature", "invalid_field"),  # float32: 0
    ("/completions", with_(COMPLETION, temperature=1e39), "temperature", "invalid_field"),  # float32: inf
    ("/completions", b'{"model": "tiny", "prompt": "Hi", "temperature": NaN}', "temperature", "invalid_value"),
    ("/completions", b'{"model": "tiny", "prompt": "Hi", "top_p": Infinity}', "top_p", "invalid_value"),
    ("/completions", with_(COMPLETION, repetition_penalty=1e-45, top_p=0.5), "repetition_penalty",
     "invalid_field"),
    ("/chat/completions", with_(CHAT, temperature=0.001), "temperature", "invalid_field"),
    ("/chat/completions", with_(CHAT, repetition_penalty=0.005), "repetition_penalty", "invalid_field"),
    ("/completions", with_(COMPLETION, max_tokens=0), "max_tokens", "invalid_value"),
    ("/completions", with_(COMPLETION, max_tokens=1.5), "max_tokens", "invalid_value"),
    ("/completions", with_(COMPLETION, max_tokens=2**40), "max_tokens", None),
    ("/completions", with_(COMPLETION, max_tokens=100_000), "max_tokens", "max_new_tokens_too_large"),
    ("/completions", with_(COMPLETION, seed=-1), "seed", None),
    ("/completions", with_(COMPLETION, stream=1), "stream", "invalid_value"),
    ("/completions", with_(COMPLETION, stop=[1]), "stop", "invalid_value"),
    ("/completions", with_(COMPLETION, stop=["x" * 300]), "stop", None),
    ("/completions", with_(COMPLETION, logprobs=True), "logprobs", "invalid_value"),
    ("/completions", with_(COMPLETION, logprobs=50), "logprobs", None),
    ("/completions", with_(COMPLETION, echo=True, logprobs=1), "echo", "unsupported_parameter"),
    ("/completions", with_(COMPLETION, best_of=3), "best_of", "unsupported_parameter"),
    ("/completions", with_(COMPLETION, unknown_field=1), "unknown_field", "unknown_parameter"),
    ("/completions", with_(COMPLETION, n=65), "n", "invalid_value"),
    ("/completions", with_(COMPLETION, n=0), "n", "invalid_value"),
    ("/completions", with_(COMPLETION, n=8, prompt=["a"] * 9), "n", "unsupported_parameter"),
    ("/completions", with_(COMPLETION, prompt=[]), "prompt", "invalid_value"),
    ("/completions", with_(COMPLETION, prompt=[[]]), "prompt", "invalid_value"),
    ("/completions", with_(COMPLETION, prompt=[1, -2]), "prompt", "invalid_value"),
    ("/completions", with_(COMPLETION, top_k=-2), "top_k", "invalid_value"),
    ("/completions", with_(COMPLETION, min_p=1.5), "min_p", "invalid_field"),
    ("/completions", with_(COMPLETION, min_tokens=-1), "min_tokens", "invalid_value"),
    ("/completions", with_(COMPLETION, max_tokens=4, min_tokens=5), "min_tokens", "invalid_field"),
    ("/completions", with_(COMPLETION, stop_token_ids=[-1]), "stop_token_ids[0]", "unsupported_parameter"),
    ("/completions", with_(COMPLETION, stop_token_ids=[5000]), "stop_token_ids[0]", "token_id_out_of_range"),
    ("/completions", with_(COMPLETION, logit_bias={"999999": 5}), "logit_bias[999999]", "token_id_out_of_range"),
    ("/completions", with_(COMPLETION, logit_bias={"1": 101}), "logit_bias[1]", "invalid_field"),
    ("/chat/completions", with_(CHAT, frequency_penalty=-2.5), "frequency_penalty", "invalid_field"),
    ("/completions", with_(COMPLETION, stream_options={"include_usage": True}), "stream_options",
     "unsupported_parameter"),
    ("/completions", with_(COMPLETION, stream=True, stream_options={"bogus": 1}), "stream_options.bogus",
     "unknown_parameter"),
    ("/completions", with_(COMPLETION, presence_penalty=2.5), "presence_penalty", "invalid_field"),
    ("/completions", with_(COMPLETION, logit_bias={"x": 5}), "logit_bias", "unsupported_parameter"),
    ("/completions", with_(COMPLETION, prompt="word " * 9000), "prompt", "context_length_exceeded"),
    ("/chat/completions", with_(CHAT, messages=...), "messages", "missing_required_parameter"),
    ("/chat/completions", with_(CHAT, messages=[]), "messages", "invalid_value"),
    ("/chat/completions", with_(CHAT, messages="Hi"), "messages", "invalid_value"),
    ("/chat/completions", with_(CHAT, messages=[{"role": "wizard", "content": "x"}]), "messages[0].role",
     "invalid_value"),
    ("/chat/completions", with_(CHAT, messages=[{"role": "function", "content": "x", "name": "f"}]),
     "messages[0].role", "invalid_value"),
    ("/chat/completions", with_(CHAT, messages=[{"content": "x"}]), "messages[0].role",
     "missing_required_parameter"),
    ("/chat/completions", with_(CHAT, messages=[{"role": "user", "content": 5}]), "messages[0].content",
     "invalid_value"),
    ("/chat/completions", with_(CHAT, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), "messages[0].content", "invalid_value"),
    ("/chat/completions", with_(CHAT, messages=[{"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": {}}}]}]),
     "messages[0].tool_calls[0].function.arguments", "invalid_value"),
    ("/chat/completions", with_(CHAT, messages=[{"role": "user", "content": "x", "tool_choice": "auto"}]),
     "messages[0].tool_choice", "unknown_parameter"),
    ("/chat/completions", with_(CHAT, n=65), "n", "invalid_value"),
    ("/chat/completions", with_(CHAT, n="1"), "n", "invalid_value"),
    ("/chat/completions", with_(CHAT, logprobs=3), "logprobs", "invalid_value"),
    ("/chat/completions", with_(CHAT, top_logprobs=2), "top_logprobs", "unsupported_parameter"),
    ("/chat/completions", with_(CHAT, logprobs=True, top_logprobs=99), "top_logprobs", None),
    ("/chat/completions", with_(CHAT, max_completion_tokens=100_000), "max_completion_tokens", None),
    ("/chat/completions", with_(CHAT, max_tokens=3, max_completion_tokens=4), "max_completion_tokens",
     "unsupported_parameter"),
    ("/chat/completions", with_(CHAT, functions=[{"name": "f"}]), "functions", "unsupported_parameter"),
    ("/chat/completions", with_(CHAT, tools=[{"type": "retrieval"}]), "tools[0].type", "invalid_value"),
    ("/chat/completions", with_(CHAT, tool_choice="sometimes"), "tool_choice", "invalid_value"),
    ("/chat/completions", with_(CHAT, tool_choice="required"), "tool_choice", "invalid_tool"),
    ("/chat/completions", with_(CHAT, response_format={"type": "json_schema"}), "response_format",
     "unsupported_parameter"),
    ("/chat/completions", with_(CHAT, response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
     "response_format.json_schema.schema", "unsupported_parameter"),
    ("/chat/completions", with_(CHAT, response_format={"type": "xml"}), "response_format.type", "invalid_value"),
    ("/chat/completions", with_(CHAT, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nope"}}}), "response_format.json_schema.schema", "constraint_invalid"),
    ("/chat/completions", with_(CHAT, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"not": {}}}}), "response_format.json_schema.schema", "constraint_unsupported"),
    ("/chat/completions", with_(CHAT, messages=[{"role": "user", "content": "word " * 9000}]), "messages",
     "context_length_exceeded"),
]


# A refused stream is refused before its first event, with the same status.
BAD_STREAMS = [(path, {"stream": True, **body}, param, code) for path, body, param, code in BAD_BODIES
               if isinstance(body, dict) and not {"stream", "stream_options"} & set(body)]


@pytest.mark.parametrize(("path", "body", "param", "code"), BAD_BODIES + BAD_STREAMS,
                         ids=[f"{i}{path}-{param or code}{'-stream' if i >= len(BAD_BODIES) else ''}"
                              for i, (path, _b, param, code) in enumerate(BAD_BODIES + BAD_STREAMS)])
def test_bad_bodies_get_a_400_naming_the_parameter(http, path, body, param, code):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(path, content=content, headers={"content-type": "application/json"})
    assert_openai_error(response, 400, param=param, code=code)


def test_a_refused_sampling_value_names_its_limit(http):
    response = http.post("/completions", json=with_(COMPLETION, temperature=1e-38, top_p=0.9))
    error = assert_openai_error(response, 400, param="temperature", code="invalid_field")
    assert error["message"].startswith("temperature: must be 0 (greedy) or in [0.01, 100]")


def test_the_floors_themselves_are_served(http):
    response = http.post("/completions", json=with_(COMPLETION, temperature=0.01, repetition_penalty=0.01,
                                                     top_p=1e-30, seed=1))
    assert response.status_code == 200, response.text


def test_the_service_keeps_serving_after_bad_input(http):
    assert http.post("/completions", content=b"{").status_code == 400
    assert http.post("/completions", json=COMPLETION).status_code == 200
    assert http.post("/chat/completions", json=CHAT).json()["usage"]["completion_tokens"] <= 2


def test_body_is_parsed_whatever_its_content_type(http):
    # `curl -d` sends application/x-www-form-urlencoded; the body is JSON all the same.
    response = http.post("/completions", content=json.dumps(COMPLETION),
                         headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200


@pytest.mark.parametrize(("headers", "code"), [
    ({}, "missing_api_key"),
    ({"Authorization": "Bearer wrong"}, "invalid_api_key"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "malformed_authorization"),
    ({"Authorization": "Bearer"}, "malformed_authorization"),
    ({"Authorization": "Bearer k\u00e9y".encode("latin-1")}, "invalid_api_key"),
])
@pytest.mark.parametrize("path", ["/models", "/completions", "/chat/completions"])
def test_missing_or_wrong_keys_are_401(cluster, headers, code, path):
    with httpx.Client(base_url=cluster.base_url, timeout=30) as anonymous:
        if path == "/models":
            response = anonymous.get(path, headers=headers)
        else:
            response = anonymous.post(path, json=CHAT if "chat" in path else COMPLETION, headers=headers)
    error = assert_openai_error(response, 401, code=code)
    assert error["type"] == "authentication_error" and "wrong" not in error["message"]


def test_every_key_the_gateway_knows_works(cluster):
    with httpx.Client(base_url=cluster.base_url, timeout=30) as c:
        response = c.post("/completions", json=COMPLETION, headers={"Authorization": f"bearer {cluster.other_key}"})
    assert response.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_unknown_models_are_404_even_when_streaming(http, path, stream):
    body = {**(CHAT if "chat" in path else COMPLETION), "model": "gpt-4o", "stream": stream}
    error = assert_openai_error(http.post(path, json=body), 404, param="model", code="model_not_found")
    assert "tiny" in error["message"]  # the message lists what is served
    assert_openai_error(http.get("/models/gpt-4o"), 404, param="model", code="model_not_found")


def test_unknown_routes_and_methods(http):
    assert_openai_error(http.get("/nowhere"), 404, code="not_found")
    assert_openai_error(http.get("/completions"), 405, code="method_not_allowed")
    assert_openai_error(http.delete("/chat/completions"), 405, code="method_not_allowed")


def test_oversized_bodies_are_413(http):
    assert_openai_error(http.post("/completions", content=b"x" * (9 * 1024 * 1024)), 413, code="request_too_large")


def test_prompts_over_the_gateways_limits_are_refused_in_openai_shape(http):
    # Over the gateway's --max-request-chars (1,000,000): its INVALID_ARGUMENT, named.
    over_chars = {**COMPLETION, "prompt": "a" * 1_500_000}
    assert_openai_error(http.post("/completions", json=over_chars), 400, param="prompt", code="request_too_large")
    # Over the gateway's receive cap (5 MiB): refused by gRPC unread, so no reason: still a 413, not a 429.
    over_bytes = {**COMPLETION, "prompt": "a" * (6 * 1024 * 1024)}
    assert_openai_error(http.post("/completions", json=over_bytes), 413, code="request_too_large")


@pytest.mark.parametrize("path, body, param, cap", [
    ("/completions", with_(COMPLETION, max_tokens=8192), "prompt", "max_tokens"),
    ("/chat/completions", with_(CHAT, max_tokens=None, max_completion_tokens=8192), "messages",
     "max_completion_tokens"),
])
def test_errors_speak_the_http_apis_names_never_the_grpc_ones(http, path, body, param, cap):
    # The replica's refusal: prompt + max_new_tokens over the model's context, "set truncate_prompt".
    error = assert_openai_error(http.post(path, json=body), 400, param=param, code="context_length_exceeded")
    assert cap in error["message"], error
    for grpc_name in ("max_new_tokens", "truncate_prompt", "prompt_token_ids", "sampling."):
        assert grpc_name not in error["message"], error


def test_tokenize_and_detokenize_in_vllms_shapes(http, cluster):
    root = str(http.base_url).rsplit("/v1", 1)[0]
    prompt = "Hello tokenizer, round trip"
    tokenized = http.post(f"{root}/tokenize", json={"model": "tiny", "prompt": prompt, "add_special_tokens": False,
                                                     "return_token_strs": True})
    assert tokenized.status_code == 200, tokenized.text
    body = tokenized.json()
    with LlmsuiteClient(cluster.gateway.address, api_key=cluster.api_key, timeout_s=60) as client:
        (direct,) = client.tokenize(prompt, model="tiny", add_special_tokens=False)
    assert body["tokens"] == list(direct.token_ids) and body["count"] == len(direct.token_ids)
    assert body["max_model_len"] == 8192 and len(body["token_strs"]) == body["count"]
    assert all(piece in prompt for piece in body["token_strs"])
    assert http.post(f"{root}/tokenize", json={"model": "tiny", "prompt": prompt}).json()["token_strs"] is None
    detokenized = http.post(f"{root}/detokenize", json={"model": "tiny", "tokens": body["tokens"]})
    assert detokenized.status_code == 200 and detokenized.json() == {"prompt": prompt}


@pytest.mark.parametrize("path, body, status, param, code", [
    ("/detokenize", {"model": "tiny", "tokens": [5, 10**6]}, 400, "tokens[1]", "token_id_out_of_range"),
    ("/detokenize", {"model": "tiny", "tokens": [5, -1]}, 400, "tokens[1]", "invalid_value"),
    ("/detokenize", {"model": "nope", "tokens": [5]}, 404, "model", "model_not_found"),
    ("/tokenize", {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "prompt": ""}, 400, "messages",
     "unsupported_parameter"),
    ("/tokenize", {"model": "tiny"}, 400, "prompt", "missing_required_parameter"),
])
def test_tokenize_and_detokenize_refusals_name_the_http_field(http, path, body, status, param, code):
    root = str(http.base_url).rsplit("/v1", 1)[0]
    assert_openai_error(http.post(f"{root}{path}", json=body), status, param=param, code=code)


def test_a_trailing_slash_is_the_same_route(http):
    assert http.get("/models/").json()["data"][0]["id"] == "tiny"
    assert http.get("/models/tiny/").json()["id"] == "tiny"
    completion = http.post("/completions/", json=COMPLETION)
    assert completion.status_code == 200 and completion.json()["object"] == "text_completion", completion.text
    assert_openai_error(http.get("/nowhere/"), 404, code="not_found")
    assert_openai_error(http.get("/completions/"), 405, code="method_not_allowed")


def raw_request(address: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Sends bytes no HTTP client would send; returns the status, headers and body."""
    host, port = address.split("//")[1].split("/")[0].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("request_bytes", [
    b"GET /v1/mod\xc3\xa9ls HTTP/1.1\r\nHost: x\r\n\r\n",  # a raw non-ASCII byte in the path
    b"GET /v1/models\x01 HTTP/1.1\r\nHost: x\r\n\r\n",  # a control byte
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
    b"NOT HTTP AT ALL\r\n\r\n",
])
def test_requests_the_http_parser_refuses_get_openai_json_too(cluster, request_bytes):
    status, headers, body = raw_request(cluster.base_url, request_bytes)
    assert status == 400 and headers["content-type"] == "application/json", (status, headers, body)
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_http_request"


def test_percent_encoded_bytes_that_are_not_utf8_are_a_404(http):
    assert_openai_error(http.get("/mod%FFels"), 404, code="not_found")


def test_request_ids_travel_both_ways(http):
    response = http.post("/completions", json=COMPLETION, headers={"x-request-id": "trace-me-42"})
    assert response.headers["x-request-id"] == "trace-me-42" and response.json()["id"] == "cmpl-trace-me-42"
    failed = http.post("/completions", json={**COMPLETION, "model": "nope"}, headers={"x-request-id": "bad-1"})
    assert failed.headers["x-request-id"] == "bad-1"
    generated = http.post("/chat/completions", json=CHAT, headers={"x-request-id": "spaces are not ids"})
    assert generated.json()["id"] == f"chatcmpl-{generated.headers['x-request-id']}"
    assert " " not in generated.headers["x-request-id"]


def test_sse_framing(http):
    with http.stream("POST", "/chat/completions", json={**CHAT, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert events[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in events[-1]


def test_rate_limited_keys_get_429_with_retry_after(cluster):
    with cluster.another_gateway("--rate-limit-rps", "0.01", "--rate-limit-burst", "1") as gw, \
            cluster.openai_in_front_of(gw.address) as base, \
            httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {cluster.api_key}"},
                         timeout=30) as c:
        assert c.post("/completions", json=COMPLETION).status_code == 200
        for path, body in (("/completions", COMPLETION), ("/chat/completions", {**CHAT, "stream": True})):
            response = c.post(path, json=body)
            assert_openai_error(response, 429, code="rate_limit_exceeded")
            assert response.json()["error"]["type"] == "rate_limit_error"
            # RetryInfo of ~100 s (one request per 100 s refills the bucket) as whole seconds.
            assert 1 <= int(response.headers["retry-after"]) <= 101
            assert int(response.headers["retry-after-ms"]) > 1000
        other = httpx.post(f"{base}/v1/completions", json=COMPLETION, timeout=30,
                           headers={"Authorization": f"Bearer {cluster.other_key}"})
        assert other.status_code == 200  # buckets are per key


def test_a_down_gateway_is_503(cluster):
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))  # a port nothing listens on while the test runs
        nowhere = f"127.0.0.1:{placeholder.getsockname()[1]}"
        with cluster.openai_in_front_of(nowhere) as base, httpx.Client(base_url=base, timeout=30) as c:
            assert c.get("/health").status_code == 503
            assert_openai_error(c.get("/v1/models"), 503)
            assert_openai_error(c.post("/v1/chat/completions", json={**CHAT, "stream": True}), 503)


LONG = {"model": "tiny", "max_tokens": 8000, "temperature": 0, "ignore_eos": True}


def _raw_request(base_url: str, api_key: str, path: str, body: dict) -> socket.socket:
    """An HTTP request on a plain socket, so the test controls exactly when the connection drops."""
    host, port = base_url.removeprefix("http://").split("/")[0].split(":")
    payload = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(f"POST /v1{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api_key}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


@pytest.mark.parametrize("path", ["/completions", "/chat/completions"])
def test_disconnecting_mid_stream_cancels_the_generation_upstream(cluster, path):
    body = {**LONG, "stream": True, **({"messages": CHAT["messages"]} if "chat" in path else {"prompt": "Hi"})}
    before = cluster.inference_stats().cancelled_total
    with httpx.Client(base_url=cluster.base_url) as http:
        disconnects = _metrics(http).get("llmsuite_openai_sse_disconnects_total", route=f"/v1{path}")
    sock = _raw_request(cluster.base_url, cluster.api_key, path, body)
    received = b""
    while received.count(b"data: ") < 2:  # headers and the first events: the generation is running
        piece = sock.recv(65536)
        assert piece, "the server closed the stream"
        received += piece
    assert b" 200 OK" in received.split(b"\r\n")[0]
    sock.close()
    assert cluster.wait_until(lambda: cluster.inference_stats().cancelled_total == before + 1)
    assert cluster.wait_until(lambda: cluster.inference_stats().running == 0)
    name = "llmsuite_openai_sse_disconnects_total"
    with httpx.Client(base_url=cluster.base_url) as http:
        assert cluster.wait_until(lambda: _metrics(http).get(name, route=f"/v1{path}") == disconnects + 1)


def _metrics(http: httpx.Client) -> Scrape:
    response = http.get("/metrics".join(str(http.base_url).rsplit("/v1", 1)))
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


IGNORED = {"user": "u-1", "store": False, "metadata": {"k": "v"}, "service_tier": "auto", "priority": 3,
           "prediction": {"type": "content", "content": "x"}, "prompt_cache_key": "k", "safety_identifier": "s"}


@pytest.mark.parametrize("path, body, extra", [
    ("/completions", COMPLETION, {}),
    ("/chat/completions", CHAT, {"parallel_tool_calls": True, "modalities": ["text"]}),
])
def test_fields_that_do_not_change_the_answer_are_accepted_ignored_and_counted(http, path, body, extra):
    sent = {**IGNORED, **extra, "stream": True, "stream_options": {"include_obfuscation": True}}
    before = _metrics(http)
    plain = http.post(path, json=body)
    ignoring = http.post(path, json={**body, **sent})
    assert plain.status_code == ignoring.status_code == 200, ignoring.text
    after = _metrics(http)
    counted = {*IGNORED, *extra, "stream_options.include_obfuscation"}
    for field in counted:
        name = "llmsuite_openai_ignored_fields_total"
        assert after.get(name, field=field) == before.get(name, field=field) + 1, field


@pytest.mark.parametrize("path, body, param", [
    ("/completions", with_(COMPLETION, prompt_logprobs=1), "prompt_logprobs"),
    ("/chat/completions", with_(CHAT, modalities=["text", "audio"]), "modalities"),
    ("/chat/completions", with_(CHAT, audio={"voice": "alloy", "format": "mp3"}), "audio"),
    ("/chat/completions", with_(CHAT, reasoning_effort="high"), "reasoning_effort"),
    ("/chat/completions", with_(CHAT, web_search_options={}), "web_search_options"),
])
def test_fields_that_would_change_the_answer_are_refused_by_name(http, path, body, param):
    assert_openai_error(http.post(path, json=body), 400, param=param, code="unsupported_parameter")


def test_metrics_count_requests_by_route_and_status_and_time_to_first_byte(http):
    before = _metrics(http)
    assert http.post("/chat/completions", json={**CHAT, "stream": True}).status_code == 200
    assert http.post("/completions", json=COMPLETION).status_code == 200
    assert http.post("/completions", json=with_(COMPLETION, temperature="hot")).status_code == 400
    assert http.get("/models/no-such-model").status_code == 404
    assert http.get("/no/such/route").status_code == 404
    after = _metrics(http)

    def grew(route: str, status: str) -> float:
        name = "llmsuite_openai_requests_total"
        return after.get(name, route=route, status=status) - before.get(name, route=route, status=status)

    assert grew("/v1/chat/completions", "200") == 1 and grew("/v1/completions", "200") == 1
    assert grew("/v1/completions", "400") == 1 and grew("/v1/models/{model}", "404") == 1
    assert grew("other", "404") == 1  # raw paths never become labels
    ttfb = "llmsuite_openai_time_to_first_byte_seconds_count"
    assert after.get(ttfb, route="/v1/chat/completions") == before.get(ttfb, route="/v1/chat/completions") + 1
    assert after.get("process_resident_memory_bytes") > 0


def test_chat_completions_open_no_inference_session_and_grpc_chat_does_unless_stateless(cluster):
    sock = _raw_request(cluster.base_url, cluster.api_key, "/chat/completions",
                        {**LONG, "stream": True, "messages": CHAT["messages"]})
    received = b""
    while received.count(b"data: ") < 2:  # the reply is being generated
        piece = sock.recv(65536)
        assert piece, "the server closed the stream"
        received += piece
    try:
        assert cluster.wait_until(lambda: cluster.inference_stats().running == 1)
        assert cluster.inference_stats().sessions == 0  # a plain generation: nothing against --max-sessions
    finally:
        sock.close()
    assert cluster.wait_until(lambda: cluster.inference_stats().running == 0)
    with LlmsuiteClient(cluster.gateway.address, api_key=cluster.api_key, timeout_s=60) as client:
        for stateless, sessions in ((False, 1), (True, 0)):
            with client.chat(cluster.model, stateless=stateless, max_new_tokens=8000, ignore_eos=True) as chat:
                reply = iter(chat.send("Hi"))
                next(reply)
                assert cluster.wait_until(lambda: cluster.inference_stats().running == 1)
                assert cluster.inference_stats().sessions == sessions, f"stateless={stateless}"
                chat.cancel()
            assert cluster.wait_until(lambda: cluster.inference_stats().sessions == 0)
            assert cluster.wait_until(lambda: cluster.inference_stats().running == 0)


def test_disconnecting_while_waiting_for_a_whole_completion_cancels_it(cluster):
    before = cluster.inference_stats().cancelled_total
    sock = _raw_request(cluster.base_url, cluster.api_key, "/completions", {**LONG, "prompt": "Hi"})
    assert cluster.wait_until(lambda: cluster.inference_stats().running == 1)
    sock.close()
    assert cluster.wait_until(lambda: cluster.inference_stats().cancelled_total == before + 1)
    assert cluster.wait_until(lambda: cluster.inference_stats().running == 0)


def test_a_failure_mid_stream_ends_it_with_an_error_event(cluster):
    with cluster.own_inference() as (inference, base_url), \
            httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {cluster.api_key}"},
                         timeout=60) as c, \
            c.stream("POST", "/chat/completions", json={**LONG, **CHAT, "max_tokens": 8000, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # streaming has begun
        inference.kill()  # the replica dies mid-generation
        rest = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert rest[-1] != "[DONE]", "a broken stream must not look complete"
    error = json.loads(rest[-1])["error"]
    assert error["type"] == "server_error" and error["message"]


def test_sigterm_lets_running_streams_finish_within_the_grace_period(cluster):
    body = {**LONG, **CHAT, "max_tokens": 1500, "stream": True}
    with cluster.openai_process_in_front_of(cluster.gateway.address, "--grace-period", "120") as (api, base), \
            httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120,
                         headers={"Authorization": f"Bearer {cluster.api_key}"}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        api.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        # uvicorn re-raises the signal once it has shut down, so the exit status names it.
        assert api.proc.wait(60) in (0, -signal.SIGTERM)
