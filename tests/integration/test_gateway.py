"""The gateway app in-process: request validation, auth, and engine status -> HTTP mapping.

The engine side is a real gRPC server on 127.0.0.1 whose servicer answers with the status
a test asks for (engine_double.py; the model-backed engine is exercised in test_engine.py
and tests/e2e).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from tests.integration.engine_double import MODEL, FakeServer

from llm_gateway.app import create_app
from llm_gateway.settings import GatewaySettings


@pytest.fixture
def client(fake: FakeServer) -> Iterator[TestClient]:
    settings = GatewaySettings(engine=f"127.0.0.1:{fake.port}", request_timeout_s=1.0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def completion(**overrides: object) -> dict:
    return {"model": MODEL, "prompt": "hi", "max_tokens": 4, **overrides}


def chat(**overrides: object) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **overrides}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", completion(temperature=-1), "temperature"),
        ("/v1/completions", completion(temperature="hot"), "temperature"),
        ("/v1/completions", completion(top_p=0), "top_p"),
        ("/v1/completions", completion(max_tokens=-5), "max_tokens"),
        ("/v1/completions", completion(n=17), "n"),  # each choice is an engine call
        ("/v1/completions", completion(n=0), "n"),
        ("/v1/completions", completion(prompt=["a"] * 17, n=16), "prompt"),  # > 256 choices
        ("/v1/completions", completion(prompt=["a", "b"], n=9, stream=True), "prompt"),  # > 16
        ("/v1/completions", completion(stop=["a", "b", "c", "d", "e"]), "stop"),
        ("/v1/completions", completion(stop=""), "stop"),
        ("/v1/completions", completion(max_tokens=0), "max_tokens"),  # only with echo
        ("/v1/completions", completion(logprobs=6), "logprobs"),  # OpenAI's limit is 5
        ("/v1/completions", completion(best_of=2, n=3), "best_of"),  # fewer candidates than n
        ("/v1/completions", completion(best_of=2, stream=True), "best_of"),  # as OpenAI
        ("/v1/completions", completion(best_of=21), "best_of"),
        ("/v1/completions", completion(suffix=" the end"), "suffix"),
        ("/v1/completions", completion(logit_bias={"x": 1}), "logit_bias"),
        ("/v1/completions", completion(logit_bias={"-1": 1}), "logit_bias"),
        ("/v1/completions", completion(logit_bias={"5": 101}), "logit_bias"),
        ("/v1/completions", completion(logit_bias={"5": "1"}), "logit_bias"),
        ("/v1/completions", completion(logit_bias={str(i): 1 for i in range(1025)}), "logit_bias"),
        ("/v1/chat/completions", chat(logit_bias={"5": -100.5}), "logit_bias"),
        ("/v1/completions", completion(prompt=[]), "prompt"),
        ("/v1/completions", completion(top_k=-2), "top_k"),
        ("/v1/completions", completion(stop=["s" * 1025]), "stop"),
        ("/v1/completions", completion(min_p=1.5), "min_p"),
        ("/v1/completions", completion(repetition_penalty=0), "repetition_penalty"),
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/completions", {"prompt": "x"}, "model"),
        ("/v1/chat/completions", chat(messages=[]), "messages"),
        ("/v1/chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content"),
        ("/v1/chat/completions", chat(max_completion_tokens=0), "max_completion_tokens"),
        ("/v1/chat/completions", chat(tools=[{"type": "function"}]), "tools[0].function"),
        ("/v1/chat/completions", chat(tool_choice="required"), "tool_choice"),  # needs tools
        ("/v1/chat/completions", chat(top_logprobs=3), "top_logprobs"),  # needs logprobs
        ("/v1/chat/completions", chat(top_logprobs=21, logprobs=True), "top_logprobs"),
        ("/v1/chat/completions", chat(n=17), "n"),
        ("/v1/chat/completions", chat(seed="x"), "seed"),
    ],
)  # fmt: skip
def test_invalid_parameters_are_openai_400s(
    client: TestClient, path: str, body: dict, param: str
) -> None:
    response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b""])
def test_malformed_bodies_are_400_not_500(client: TestClient, raw: bytes) -> None:
    response = client.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "invalid_request_error"


def test_unknown_model_is_404(client: TestClient) -> None:
    response = client.post("/v1/completions", json=completion(model="gpt-nope"))
    assert response.status_code == 404
    assert error_of(response)["code"] == "model_not_found"
    assert client.get("/v1/models/gpt-nope").status_code == 404
    assert client.get("/v1/models/" + MODEL).json()["id"] == MODEL


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("prompt", "status", "param"),
    [
        ("abort:INVALID_ARGUMENT", 400, "max_tokens"),
        ("abort:RESOURCE_EXHAUSTED", 429, None),
        ("abort:UNAVAILABLE", 503, None),
        ("abort:INTERNAL", 500, None),
        ("slow", 504, None),
    ],
)
def test_engine_status_maps_to_http(client: TestClient, prompt: str, status: int, param: str | None, stream: bool) -> None:  # fmt: skip
    response = client.post("/v1/completions", json=completion(prompt=prompt, stream=stream))
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["param"] == param
    if status == 500:  # an engine failure is reported without its internals
        assert "max_tokens" not in error["message"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"prompt": "old-engine"}),
        ("/detokenize", {"tokens": [1]}),
        # With n > 1 the gateway has the prompt tokenized once: the same engine call.
        ("/v1/completions", completion(prompt="old-engine", n=2)),
        ("/v1/completions", completion(prompt="old-engine", n=2, stream=True)),
    ],
)
def test_an_engine_without_the_tokenizer_rpcs_is_501(client: TestClient, path: str, body: dict) -> None:  # fmt: skip
    response = client.post(path, json=body)
    assert response.status_code == 501, response.text
    assert error_of(response)["code"] == "not_implemented"


def test_mid_stream_engine_error_is_reported_in_band(client: TestClient) -> None:
    response = client.post("/v1/completions", json=completion(prompt="midstream", stream=True))
    assert response.status_code == 200
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert json.loads(events[0])["choices"][0]["text"] == "partial"
    assert "error" in json.loads(events[-1])
    assert "[DONE]" not in events


def test_requests_map_onto_the_engine_api(client: TestClient, fake: FakeServer) -> None:
    servicer = fake.engine
    body = chat(
        messages=[{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        max_tokens=9, max_completion_tokens=7, stop="END", seed=-1, temperature=0.5, top_p=0.9,
    )  # fmt: skip
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    sent = servicer.last
    assert [(m.role, m.content) for m in sent.chat.messages] == [("system", "s"), ("user", "ab")]
    assert sent.stopping.max_tokens == 7  # max_completion_tokens wins over the legacy name
    assert list(sent.stopping.stop) == ["END"]
    assert sent.sampling.seed == (1 << 64) - 1  # int64 -1 as the engine's uint64
    assert sent.sampling.temperature == pytest.approx(0.5)
    assert sent.sampling.top_p == pytest.approx(0.9)
    assert sent.request_id.startswith("chatcmpl-")
    reply = response.json()
    assert reply["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
    # The engine double tokenizes the conversation to its text "sab" and an end of turn.
    assert reply["usage"] == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}

    client.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2, 3]})
    assert list(servicer.last.token_ids.ids) == [1, 2, 3]
    assert servicer.last.stopping.max_tokens == 16  # OpenAI's completions default
    assert servicer.last.sampling.temperature == pytest.approx(1.0)


def test_logit_bias_and_best_of_map_onto_engine_calls(client: TestClient, fake: FakeServer) -> None:
    servicer = fake.engine
    reply = client.post("/v1/chat/completions", json=chat(logit_bias={"5": -100, "7": 2.5}))
    assert reply.status_code == 200, reply.text
    assert dict(servicer.last.sampling.logit_bias) == {5: -100.0, 7: 2.5}
    servicer.requests.clear()
    reply = client.post("/v1/completions", json=completion(best_of=3, seed=7))
    assert reply.status_code == 200, reply.text
    body = reply.json()
    # Three candidates, each scored by its logprobs, one answer without them (none asked).
    assert sorted(r.sampling.seed for r in servicer.requests) == [7, 8, 9]
    assert all(r.logprobs and r.top_logprobs == 0 for r in servicer.requests)
    assert [(c["index"], c["logprobs"]) for c in body["choices"]] == [(0, None)]
    assert body["usage"]["completion_tokens"] == 3  # every candidate was generated
    assert body["usage"]["prompt_tokens"] == 2  # the prompt, once


def test_api_keys(fake: FakeServer) -> None:
    settings = GatewaySettings(engine=f"127.0.0.1:{fake.port}", api_keys=["k1", "k2"])
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").status_code == 200  # probes need no key
        assert c.get("/v1/models").status_code == 401
        wrong = c.get("/v1/models", headers={"Authorization": "Bearer k3"})
        assert wrong.status_code == 401
        assert error_of(wrong)["code"] == "invalid_api_key"
        assert (
            c.get("/v1/models", headers={"Authorization": "Bearer k2"}).json()["data"][0]["id"]
            == MODEL
        )


def test_engine_down_is_503_and_not_ready() -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with TestClient(create_app(GatewaySettings(engine=f"127.0.0.1:{port}"))) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503
        response = c.post("/v1/completions", json=completion())
        assert response.status_code == 503
        assert error_of(response)["code"] == "engine_unavailable"
        assert c.get("/v1/models").status_code == 503
