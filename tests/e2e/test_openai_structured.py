"""Structured outputs (`response_format`) through the official openai client against real
engine and gateway processes: the tiny checkpoint barely knows JSON, and constrained
decoding makes every answer parse and validate anyway."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field
from tests.e2e.e2e_services import Service

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Describe a pet as JSON."}]


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as strict wants

    name: str = Field(max_length=8)
    kind: Literal["cat", "dog"]
    age: int = Field(ge=0, le=30)
    tags: list[bool] = Field(max_length=3)


def _model_id(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


def test_parse_returns_the_pydantic_model(client: openai.OpenAI) -> None:
    model = _model_id(client)
    for extra in ({"temperature": 0}, {"temperature": 1.0, "seed": 7}):
        reply = client.chat.completions.parse(
            model=model, messages=MESSAGES, response_format=Pet, max_tokens=120, **extra
        )
        choice = reply.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Pet)
        assert Pet.model_validate_json(choice.message.content) == choice.message.parsed


def test_json_object_on_completions_and_chat(client: openai.OpenAI) -> None:
    model = _model_id(client)
    fmt = {"type": "json_object"}
    text = client.completions.create(
        model=model, prompt="{", max_tokens=200, temperature=0.8, seed=1,
        extra_body={"response_format": fmt},
    ).choices[0]  # fmt: skip
    chat = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=200, temperature=0.8, seed=2,
        response_format=fmt,
    ).choices[0]  # fmt: skip
    for content, reason in ((text.text, text.finish_reason), (chat.message.content, chat.finish_reason)):  # fmt: skip
        if reason == "stop":
            assert isinstance(json.loads(content), dict)
        else:  # cut by max_tokens: a prefix of an object
            assert reason == "length" and content.startswith("{")


def test_a_cut_answer_is_a_prefix_with_finish_reason_length(client: openai.OpenAI) -> None:
    model = _model_id(client)
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(
            model=model, messages=MESSAGES, response_format=Pet, max_tokens=5, temperature=0
        )
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": Pet.model_json_schema()}}

    def answer(max_tokens: int) -> openai.types.chat.chat_completion.Choice:
        return client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=max_tokens, temperature=0,
            response_format=fmt,
        ).choices[0]  # fmt: skip

    whole, cut = answer(120), answer(5)
    assert whole.finish_reason == "stop"
    assert cut.finish_reason == "length"
    assert whole.message.content.startswith(cut.message.content)


def test_streamed_and_concurrent_with_free_requests(client: openai.OpenAI) -> None:
    """Constrained and free requests share the engine's batches."""
    model = _model_id(client)
    schema = Pet.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}

    def constrained(seed: int) -> str:
        stream = client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=120, temperature=1.0, seed=seed,
            response_format=fmt, stream=True,
        )  # fmt: skip
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    def free(seed: int) -> str:
        return (
            client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=30, temperature=1.0, seed=seed
            )
            .choices[0]
            .message.content
        )

    with ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(constrained if i % 2 else free, i) for i in range(6)]
        answers = [j.result() for j in jobs]
    for answer in answers[1::2]:
        jsonschema.validate(json.loads(answer), schema)


@pytest.mark.parametrize(
    ("schema", "named"),
    [({"type": "array", "uniqueItems": True}, "uniqueItems"), ({"not": {}}, "not")],
)
def test_unsupported_schema_is_a_400_naming_it(gateway: Service, schema: dict, named: str) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    reply = httpx.post(
        f"http://127.0.0.1:{gateway.port}/v1/chat/completions",
        json={"model": MODEL, "messages": MESSAGES, "response_format": fmt},
        timeout=30,
    )
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "response_format" and named in error["message"]
