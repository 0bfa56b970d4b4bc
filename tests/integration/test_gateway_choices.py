"""The gateway app in-process against the engine double: `n` and several prompts fan out to
one engine call per choice, logprobs come back in chat's and the legacy completions format,
echo shows the prompt (and scores it), usage counts each prompt once."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient
from tests.integration.engine_double import MODEL, FakeEngine, FakeServer

from llm_gateway.app import create_app
from llm_gateway.settings import GatewaySettings


@pytest.fixture
def engine(fake: FakeServer) -> FakeEngine:
    fake.engine.requests.clear()
    fake.engine.tokenized.clear()
    return fake.engine


@pytest.fixture
def client(fake: FakeServer) -> Iterator[TestClient]:
    settings = GatewaySettings(engine=f"127.0.0.1:{fake.port}", request_timeout_s=1.0)
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


def events(response: httpx.Response) -> list[dict]:
    """The JSON events of a stream that ended with [DONE]."""
    assert response.status_code == 200, response.text
    data = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_n_choices_are_engine_calls_with_consecutive_seeds(
    client: TestClient, engine: FakeEngine
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 3, "seed": 7,
            "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2}  # fmt: skip
    reply = client.post("/v1/chat/completions", json=body).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "ok" for c in reply["choices"])
    # The prompt is counted once (h, i and the end of the turn), the completions of every choice.
    assert reply["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    sent = sorted(engine.requests, key=lambda r: r.request_id)
    assert [r.request_id for r in sent] == [f"{reply['id']}-{i}" for i in range(3)]
    assert [r.sampling.seed for r in sent] == [7, 8, 9]
    s = sent[0].sampling
    assert (s.top_k, s.min_p, s.repetition_penalty) == (5, pytest.approx(0.1), pytest.approx(1.2))


def test_each_prompt_has_n_choices_in_order(client: TestClient, engine: FakeEngine) -> None:
    body = {"model": MODEL, "prompt": ["say:A", "say:BB"], "n": 2, "seed": -1, "max_tokens": 3}
    reply = client.post("/v1/completions", json=body).json()
    got = [(c["index"], c["text"]) for c in reply["choices"]]
    assert got == [(0, "A"), (1, "A"), (2, "BB"), (3, "BB")]
    assert reply["usage"] == {"prompt_tokens": 5 + 6, "completion_tokens": 4, "total_tokens": 15}
    # Each prompt is tokenized once; its choices carry the ids.
    assert sorted(r.text for r in engine.tokenized) == ["say:A", "say:BB"]
    seeds = {("".join(map(chr, r.token_ids.ids)), r.sampling.seed) for r in engine.requests}
    # Choice k of each prompt samples with seed + k: as if each prompt were sent alone.
    assert seeds == {(p, s) for p in ("say:A", "say:BB") for s in ((1 << 64) - 1, 0)}
    assert sorted(r.request_id[-2:] for r in engine.requests) == ["-0", "-1", "-2", "-3"]


def test_a_prompt_is_tokenized_once_for_its_choices_and_checked_before_any_is_built(
    client: TestClient, engine: FakeEngine
) -> None:
    """n copies of a long text are neither built nor tokenized n times: one Tokenize call,
    then a 400 naming the input (the engine double's context is 64 tokens)."""
    long = "ab" * 5000
    for path, body, param in [
        ("/v1/completions", {"prompt": long}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": long}]}, "messages"),
    ]:
        engine.tokenized.clear()
        reply = client.post(path, json={"model": MODEL, "n": 16, "stream": True, **body})
        assert reply.status_code == 400, reply.text
        error = reply.json()["error"]
        assert (error["param"], error["code"]) == (param, "context_length_exceeded")
        assert "10000" in error["message"] or "10001" in error["message"]
        assert len(engine.tokenized) == 1
    assert engine.requests == []
    # A prompt that fits: one Tokenize, n generations of its ids.
    reply = client.post("/v1/completions", json={"model": MODEL, "prompt": "say:x", "n": 4})
    assert [c["text"] for c in reply.json()["choices"]] == ["x"] * 4
    assert len(engine.tokenized) == 2
    assert {tuple(r.token_ids.ids) for r in engine.requests} == {tuple(map(ord, "say:x"))}


def test_streamed_choices_are_tagged_by_index(client: TestClient) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    chunks = events(client.post("/v1/chat/completions", json=body))
    by_index: dict[int, list[dict]] = {0: [], 1: []}
    for chunk in chunks[:-1]:
        assert chunk["usage"] is None
        (choice,) = chunk["choices"]
        by_index[choice["index"]].append(choice)
    for choices in by_index.values():
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in choices) == "ok"
        assert [c["finish_reason"] for c in choices][-1] == "length"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def test_chat_top_logprobs(client: TestClient, engine: FakeEngine) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "logprobs": True,
            "top_logprobs": 2}  # fmt: skip
    reply = client.post("/v1/chat/completions", json=body).json()
    assert (engine.requests[0].logprobs, engine.requests[0].top_logprobs) == (True, 2)
    assert reply["choices"][0]["logprobs"] == {
        "content": [
            {"token": "ok", "logprob": -0.5, "bytes": [111, 107], "top_logprobs": [
                {"token": "ok", "logprob": -0.5, "bytes": [111, 107]},
                {"token": "no", "logprob": -1.5, "bytes": [110, 111]},
            ]}
        ]
    }  # fmt: skip
    streamed = events(client.post("/v1/chat/completions", json={**body, "stream": True}))
    content = [t for c in streamed for t in (c["choices"][0]["logprobs"] or {}).get("content", [])]
    assert content == reply["choices"][0]["logprobs"]["content"]


def test_completion_logprobs_with_echo_in_the_legacy_format(
    client: TestClient, engine: FakeEngine
) -> None:
    body = {"model": MODEL, "prompt": "say:!", "echo": True, "logprobs": 1, "max_tokens": 1}
    choice = client.post("/v1/completions", json=body).json()["choices"][0]
    sent = engine.requests[0]
    assert (sent.logprobs, sent.top_logprobs, sent.prompt_logprobs) == (True, 1, 1)
    assert choice["text"] == "say:!!"
    assert choice["logprobs"] == {
        "tokens": ["s", "a", "y", ":", "!", "!"],
        "token_logprobs": [None, -1.0, -2.0, -3.0, -4.0, -0.5],
        # The most likely alternatives, and always the chosen token.
        "top_logprobs": [None, {"z": -0.25, "a": -1.0}, {"z": -0.25, "y": -2.0},
                         {"z": -0.25, ":": -3.0}, {"z": -0.25, "!": -4.0}, {"!": -0.5}],
        "text_offset": [0, 1, 2, 3, 4, 5],
    }  # fmt: skip

    chunks = events(client.post("/v1/completions", json={**body, "stream": True}))
    streamed = [c["choices"][0] for c in chunks]
    assert "".join(c["text"] for c in streamed) == choice["text"]
    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
        assert [v for c in streamed for v in c["logprobs"][key]] == choice["logprobs"][key]

    plain = client.post("/v1/completions", json={**body, "echo": False, "logprobs": 0}).json()
    assert plain["choices"][0]["text"] == "!"
    assert plain["choices"][0]["logprobs"] == {
        "tokens": ["!"], "token_logprobs": [-0.5], "top_logprobs": [{"!": -0.5}], "text_offset": [0]
    }  # fmt: skip


def test_echo_of_token_ids_scores_the_prompt_without_generating(
    client: TestClient, engine: FakeEngine
) -> None:
    """What lm-eval-harness sends: token-id prompts, echo, logprobs, max_tokens=0."""
    h, i, j = (ord(c) for c in "hij")
    body = {"model": MODEL, "prompt": [[h, i], [j]], "echo": True, "logprobs": 0, "max_tokens": 0}
    reply = client.post("/v1/completions", json=body).json()
    first, second = reply["choices"]
    assert (first["index"], first["text"], first["finish_reason"]) == (0, "hi", "length")
    assert first["logprobs"]["tokens"] == ["h", "i"]
    assert first["logprobs"]["token_logprobs"] == [None, -1.0]
    assert first["logprobs"]["top_logprobs"] == [None, {"i": -1.0}]
    assert (second["text"], second["logprobs"]["token_logprobs"]) == ("j", [None])
    assert reply["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    scored = [r for r in engine.requests if r.request_id.startswith(reply["id"] + "-")]
    assert all(r.stopping.HasField("max_tokens") and r.stopping.max_tokens == 0 for r in scored)

    chunks = events(client.post("/v1/completions", json={**body, "stream": True}))
    texts, logprobs = ["", ""], [[], []]
    for (choice,) in (c["choices"] for c in chunks):
        texts[choice["index"]] += choice["text"]
        logprobs[choice["index"]] += choice["logprobs"]["token_logprobs"]
    assert (texts, logprobs) == (["hi", "j"], [[None, -1.0], [None]])

    # Echo without logprobs shows the prompt as text (token ids included).
    text = client.post("/v1/completions", json={**body, "logprobs": None, "max_tokens": 1})
    assert [c["text"] for c in text.json()["choices"]] == ["hiok", "jok"]
    assert [c["logprobs"] for c in text.json()["choices"]] == [None, None]


def test_one_refused_choice_fails_the_request_without_waiting(client: TestClient) -> None:
    started = time.monotonic()
    body = {"model": MODEL, "prompt": ["slow", "abort:RESOURCE_EXHAUSTED"], "max_tokens": 1}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 429, response.text  # not the slow choice's 504
    assert time.monotonic() - started < 0.9


def test_many_prompts_run_at_most_16_calls_at_once(client: TestClient, engine: FakeEngine) -> None:
    """A batch of prompts (an evaluation harness's) does not fill the engine's queue alone."""
    deadline = time.monotonic() + 5  # an earlier test's cancelled "slow" may still sleep
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    engine.peak = 0
    prompts = [f"nap:{i}" for i in range(40)]
    reply = client.post("/v1/completions", json={"model": MODEL, "prompt": prompts})
    assert reply.status_code == 200, reply.text
    assert [c["text"] for c in reply.json()["choices"]] == [f"{i}" for i in range(40)]
    assert 1 < engine.peak <= 16
