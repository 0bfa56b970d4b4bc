"""The official `openai` client against a real gateway process in front of a real engine."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
from tests.e2e.e2e_services import Service, start, stop, wait_ready
from tests.support import sharded_checkpoint_that_runs_code

from llm.checkpoint import LoadedModel
from llm.inference import SamplingParams, generate


def greedy_text(ref: LoadedModel, prompt_ids: list[int], n: int) -> tuple[str, list[int]]:
    ids = generate(ref.model, prompt_ids, max_new_tokens=n, sampling=SamplingParams(0), stop_token_ids=[ref.tokenizer.eos_id])  # fmt: skip
    content = [t for t in ids if t != ref.tokenizer.eos_id]
    return ref.tokenizer.decode(content), ids


def test_models_lists_the_engine_model(client: openai.OpenAI, reference: LoadedModel) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [reference.name]
    assert client.models.retrieve(reference.name).id == reference.name


@pytest.mark.parametrize("n", [1, 12, 40])
def test_completion_has_the_requested_length(
    client: openai.OpenAI, reference: LoadedModel, n: int
) -> None:
    prompt = "The "
    text, ids = greedy_text(reference, reference.tokenizer.encode(prompt), n)
    assert len(ids) == n and reference.tokenizer.eos_id not in ids  # this prompt runs to the limit

    reply = client.completions.create(
        model=reference.name, prompt=prompt, max_tokens=n, temperature=0
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == n
    assert reply.usage.prompt_tokens == len(reference.tokenizer.encode(prompt))
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + n
    assert choice.text == text


def test_streamed_chat_equals_non_streamed(client: openai.OpenAI, reference: LoadedModel) -> None:
    messages = [{"role": "user", "content": "What is a list?"}]
    kwargs = dict(model=reference.name, messages=messages, max_tokens=60, temperature=0)
    whole = client.chat.completions.create(**kwargs)
    stream = client.chat.completions.create(
        **kwargs, stream=True, stream_options={"include_usage": True}
    )
    deltas, finish, usage, roles = [], None, None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            roles.append(choice.delta.role)
            deltas.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len(deltas) > 2  # really streamed
    assert roles[0] == "assistant"
    assert "".join(deltas) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.model_dump() == whole.usage.model_dump()

    tok = reference.tokenizer
    prompt_ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True))
    text, _ = greedy_text(reference, prompt_ids, 60)
    assert whole.choices[0].message.content == text
    assert whole.usage.prompt_tokens == len(prompt_ids)


def test_stop_strings_and_seeds(client: openai.OpenAI, reference: LoadedModel) -> None:
    base = dict(model=reference.name, prompt="The ", max_tokens=30)
    free = client.completions.create(**base, temperature=0).choices[0].text
    stop = free[6:9]
    stopped = client.completions.create(**base, temperature=0, stop=[stop, "never-seen"])
    assert stopped.choices[0].text == free[: free.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"

    def sampled(seed: int) -> str:
        return client.completions.create(**base, temperature=1.0, seed=seed).choices[0].text

    assert sampled(3) == sampled(3)
    assert sampled(3) != sampled(4)


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    body = e.value.response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert (body["error"]["code"], body["error"]["param"]) == ("model_not_found", "model")


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"top_p": 2}, "top_p"),
        ({"n": 17}, "n"),  # n is capped: each choice is an engine call
        ({"prompt": "x" * 400}, "prompt"),  # longer than the context
        ({"presence_penalty": 2.5}, "presence_penalty"),  # OpenAI allows [-2, 2]
    ],
)
def test_invalid_parameters_are_bad_requests(client: openai.OpenAI, reference: LoadedModel, kwargs: dict, param: str) -> None:  # fmt: skip
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(
            **{"model": reference.name, "prompt": "The ", "max_tokens": 3, **kwargs}
        )
    assert e.value.body["type"] == "invalid_request_error"
    assert e.value.body["param"] == param
    # The server keeps serving.
    assert (
        client.completions.create(
            model=reference.name, prompt="The ", max_tokens=2
        ).usage.completion_tokens
        == 2
    )


def test_malformed_json_and_no_server_errors(
    gateway: Service, client: openai.OpenAI, reference: LoadedModel
) -> None:
    url = f"http://127.0.0.1:{gateway.port}/v1/chat/completions"
    response = httpx.post(url, content=b'{"model": ', headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert client.models.list().data
    assert not [r for r in gateway.logs() if r.get("level") == "ERROR"], (
        "bad input must not log errors"
    )


def test_client_disconnect_cancels_the_engine_request(stack: tuple[Service, Service], client: openai.OpenAI, reference: LoadedModel) -> None:  # fmt: skip
    engine = stack[0]
    stream = client.completions.create(
        model=reference.name, prompt="The ", max_tokens=250, temperature=0, stream=True
    )
    request_id = next(iter(stream)).id
    stream.close()  # drop the HTTP connection mid-generation
    deadline = time.monotonic() + 10
    while not (ends := [r for r in engine.logs() if r.get("request_id") == request_id
                        and r["event"] in ("request_cancelled", "request_finished")]):  # fmt: skip
        assert time.monotonic() < deadline, "the engine never heard about the request ending"
        time.sleep(0.05)
    assert ends[0]["event"] == "request_cancelled"
    assert ends[0]["completion_tokens"] < 250


def test_llm_serve_answers_a_request(tiny_checkpoint: str, tmp_path: Path) -> None:
    serve = start(
        "llm_gateway.serve",
        [
            "--checkpoint",
            tiny_checkpoint,
            "--port",
            "0",
            "--threads",
            "1",
            "--model-name",
            "served",
        ],
        tmp_path / "serve.log",
        "gateway_listening",
    )
    try:
        base = f"http://127.0.0.1:{serve.port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        wait_ready(base)
        served = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        reply = served.chat.completions.create(
            model="served",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            temperature=0,
        )
        assert reply.model == "served"
        assert reply.usage.completion_tokens <= 5 and reply.choices[0].message.content is not None
    finally:
        assert stop(serve) == 0
    assert any(r["event"] == "engine_stopped" for r in serve.logs())


def test_llm_serve_takes_the_engine_flags(
    tiny_checkpoint: str, reference: LoadedModel, tmp_path: Path
) -> None:
    """llm-serve's settings are the engine's plus the gateway's: engine options it declares
    nowhere (--slots, --prefill-chunk, --no-engine-process) reach the engine it runs, and
    a prompt prefilled in chunks of 4 tokens still gets the reference's answer."""
    args = ["--checkpoint", tiny_checkpoint, "--port", "0", "--threads", "1", "--slots", "3",
            "--prefill-chunk", "4", "--max-model-len", "40", "--no-engine-process"]  # fmt: skip
    serve = start("llm_gateway.serve", args, tmp_path / "serve.log", "gateway_listening")
    try:
        base = f"http://127.0.0.1:{serve.port}"
        wait_ready(base)
        assert httpx.post(f"{base}/tokenize", json={"prompt": "hi"}).json()["max_model_len"] == 40
        prompt = "The quick brown fox "
        text, _ = greedy_text(reference, reference.tokenizer.encode(prompt), 8)
        served = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        reply = served.completions.create(
            model=reference.name, prompt=prompt, max_tokens=8, temperature=0
        )
        assert reply.choices[0].text == text
    finally:
        assert stop(serve) == 0
    (kv,) = [r for r in serve.logs() if r["event"] == "kv_cache"]
    assert (kv["slots"], kv["context_length"]) == (3, 40)
    (loaded,) = [r for r in serve.logs() if r["event"] == "model_loaded"]
    assert loaded["engine_process"] is False


def test_llm_serve_exits_when_the_checkpoint_does_not_load(tmp_path: Path) -> None:
    """A checkpoint that fails to load (here a crafted sharded one, refused before any code
    runs) ends llm-serve with exit 1, instead of a live process whose /readyz stays 503."""
    marker = tmp_path / "pwned"
    ckpt, _, _ = sharded_checkpoint_that_runs_code(tmp_path / "run", marker)
    serve = start("llm_gateway.serve", ["--checkpoint", str(ckpt), "--port", "0"],
                  tmp_path / "serve.log", "gateway_listening")  # fmt: skip
    assert serve.proc.wait(timeout=60) == 1
    (failed,) = [r for r in serve.logs() if r["event"] == "model_load_failed"]
    assert "refers to posix.system" in failed["error"]
    assert not marker.exists()


def test_chat_logprobs(client: openai.OpenAI, reference: LoadedModel) -> None:
    reply = client.chat.completions.create(
        model=reference.name,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=10,
        temperature=0,
        logprobs=True,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    tokens = choice.logprobs.content
    assert len(tokens) == reply.usage.completion_tokens == 10
    assert "".join(t.token for t in tokens) == choice.message.content
    assert all(t.logprob <= 0 for t in tokens)
