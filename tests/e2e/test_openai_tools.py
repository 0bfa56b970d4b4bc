"""Tool calling through the official openai client against `llm-serve` on a random Hugging
Face model with a Qwen-style chat template (and Llama 3's and Mistral's v11 formats): the tools go through the template, a forced
call is written by the engine's grammar (so its arguments match the function's schema
even from random weights), and the tool's answer goes back through the template. And the
same over the engine's gRPC API: a chat with tools gets its calls parsed on its last
chunk."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jsonschema
import openai
import pytest
import torch
import transformers
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests.e2e.e2e_services import Service, start, stop, wait_ready
from tests.support import MISTRAL_SPECIALS, MISTRAL_V11_TEMPLATE, chat_tokenizer

from llm_common import tool_calls
from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.proto.v1 import engine_pb2_grpc as pb_grpc

NAME = "tiny-qwen"
# Qwen2.5's template, cut to what tools need: tools in the system turn, calls as
# <tool_call> JSON, tool answers as <tool_response> in a user turn.
TEMPLATE = """{%- if tools %}<|im_start|>system
{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'You are helpful.' }}

# Tools

<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object within <tool_call></tool_call> tags.<|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m['role'] == 'system' and tools %}
{%- elif m['role'] == 'assistant' and m['tool_calls'] %}<|im_start|>assistant
{%- for c in m['tool_calls'] %}
<tool_call>
{"name": "{{ c['function']['name'] }}", "arguments": {{ c['function']['arguments'] | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif m['role'] == 'tool' %}<|im_start|>user
<tool_response>
{{ m['content'] }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ m['role'] }}
{{ m['content'] }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["C", "F"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": NO_ARGUMENTS}}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


# Llama 3.1's JSON tool calling, cut the same way: the engine reads the format off the
# template (`"parameters": `), forces calls in it, and the gateway parses them back.
LLAMA3_TEMPLATE = """{%- for m in messages %}<|im_start|>{{ m['role'] }}
{%- if tools and loop.last %}
Respond with a JSON call in the format {"name": function name, "parameters": dictionary of argument name and its value}.
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
{%- endif %}
{%- if m['tool_calls'] %}
{%- for c in m['tool_calls'] %}{"name": "{{ c['function']['name'] }}", "parameters": {{ c['function']['arguments'] }}}{%- endfor %}
{%- else %}
{{ m['content'] }}
{%- endif %}<|im_end|>
{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


# Mistral's from tokenizer v11 on, its markers special tokens: the grammar writes the
# [TOOL_CALLS] and [ARGS] tokens, and the engine keeps their text for the gateway to parse.
TEMPLATES = {"hermes": (TEMPLATE, ()), "llama3": (LLAMA3_TEMPLATE, ()),
             "mistral_v11": (MISTRAL_V11_TEMPLATE, MISTRAL_SPECIALS)}  # fmt: skip


@pytest.fixture(scope="module", params=list(TEMPLATES))
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:  # fmt: skip
    """A random Hugging Face model whose chat template teaches one format's tool calls."""
    out = tmp_path_factory.mktemp("hf") / NAME
    tok = chat_tokenizer(*TEMPLATES[request.param])
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    transformers.Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def served(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    service = start(
        "llm_gateway.serve", ["--checkpoint", str(model_dir), "--port", "0", "--threads", "1"],
        log, "gateway_listening",
    )  # fmt: skip
    try:
        wait_ready(f"http://127.0.0.1:{service.port}")
        yield service
    finally:
        stop(service)


@pytest.fixture(scope="module")
def client(served: Service) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{served.port}/v1", api_key="x", max_retries=0, timeout=60
    )


def test_call_tool_result_and_final_answer(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=NAME, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=80, temperature=0.9,
        seed=1, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )  # fmt: skip
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    history = [
        *MESSAGES,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    final = client.chat.completions.create(
        model=NAME, messages=history, tools=[WEATHER, TIME], tool_choice="none", max_tokens=8,
        temperature=0,
    )  # fmt: skip
    assert final.choices[0].message.tool_calls is None
    assert final.choices[0].message.content
    # The tool's answer went through the template: the prompt grew by it.
    assert final.usage.prompt_tokens > reply.usage.prompt_tokens


def test_required_may_call_any_tool_and_streams_tool_call_deltas(client: openai.OpenAI) -> None:
    request = dict(
        model=NAME, messages=MESSAGES, tools=[WEATHER, TIME], tool_choice="required",
        max_tokens=120, temperature=0.9, seed=2, parallel_tool_calls=True,
    )  # fmt: skip
    whole = client.chat.completions.create(**request).choices[0]
    deltas = [c.choices[0] for c in client.chat.completions.create(**request, stream=True) if c.choices]  # fmt: skip
    assert deltas[-1].finish_reason == whole.finish_reason == "tool_calls"
    pieces = [t for d in deltas for t in d.delta.tool_calls or []]
    # Each call opens with its index, id and name, and empty arguments that then arrive in
    # pieces: the deltas add up to the calls of the same request answered whole.
    calls: dict[int, dict[str, str]] = {}
    for t in pieces:
        if t.id is not None:
            assert t.index not in calls and t.function.name and t.function.arguments == ""
            calls[t.index] = {"name": t.function.name, "arguments": ""}
        calls[t.index]["arguments"] += t.function.arguments or ""
    assert len(pieces) > len(calls)
    expected = [{"name": c.function.name, "arguments": c.function.arguments} for c in whole.message.tool_calls]  # fmt: skip
    assert [calls[i] for i in sorted(calls)] == expected
    assert all(isinstance(json.loads(c["arguments"]), dict) for c in expected)


def test_unknown_named_tool_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=NAME, messages=MESSAGES, tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )  # fmt: skip
    assert e.value.body["param"] == "tool_choice"


# -- the engine's gRPC API --------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:  # fmt: skip
    """`llm-engine` alone on the same model, and a channel to it."""
    log = tmp_path_factory.mktemp("engine") / "engine.log"
    service = start(
        "llm_engine", ["--checkpoint", str(model_dir), "--port", "0", "--threads", "1"],
        log, "engine_listening",
    )  # fmt: skip
    channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
    health = health_pb2_grpc.HealthStub(channel)
    try:
        serving = health_pb2.HealthCheckResponse.SERVING
        deadline = time.monotonic() + 60
        while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != serving:
            assert time.monotonic() < deadline, "the engine did not load the model"
            time.sleep(0.1)
        yield channel
    finally:
        channel.close()
        stop(service)


def _chat(tools: list[dict], **kwargs: object) -> pb.GenerateRequest:
    chat = pb.ChatMessages(
        messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES],
        tools=[json.dumps(t) for t in tools],
    )
    return pb.GenerateRequest(chat=chat, **kwargs)


def _generate(engine: grpc.Channel, request: pb.GenerateRequest) -> list[pb.GenerateChunk]:
    return list(pb_grpc.EngineStub(engine).Generate(request, timeout=60))


def _format(engine: grpc.Channel) -> str:
    return pb_grpc.EngineStub(engine).ModelInfo(pb.ModelInfoRequest()).tool_call_format


def _forced(names: list[str], parallel: bool, seed: int = 3) -> pb.GenerateRequest:
    return _chat(
        [WEATHER, TIME], sampling=pb.SamplingParams(temperature=0.9, seed=seed),
        stopping=pb.StoppingCriteria(max_tokens=120),
        structured_output=pb.StructuredOutput(
            tool_calls=pb.ToolCallConstraint(names=names, parallel=parallel)
        ),
    )  # fmt: skip


@pytest.mark.parametrize("forced", ["named", "required"])
def test_grpc_clients_get_the_calls_parsed_on_the_last_chunk(engine: grpc.Channel, forced: str) -> None:  # fmt: skip
    """A forced call (so random weights write one) answered whole and streamed: the last
    chunk carries the calls, arguments valid against the function's schema, and finish
    reason STOP (as before); `text` is still the raw answer (what clients from before read), and
    the calls are what parsing it gives."""
    fmt = _format(engine)
    named = forced == "named"
    request = _forced(["get_weather"] if named else [], parallel=not named)
    streamed = _generate(engine, request)
    request.whole = True
    (whole,) = _generate(engine, request)
    assert len(streamed) > 1 and all(not c.tool_calls and not c.HasField("content") for c in streamed[:-1])  # fmt: skip
    last = streamed[-1]
    text = "".join(c.text for c in streamed)
    assert text == whole.text  # the same seed: the same answer
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}
    content, expected = tool_calls.parse(text, fmt)
    for chunk in (last, whole):
        assert chunk.finish_reason == pb.FINISH_REASON_STOP
        assert chunk.HasField("content") and chunk.content == (content or "") == ""
        assert chunk.tool_calls and len({c.id for c in chunk.tool_calls}) == len(chunk.tool_calls)
        assert [(c.name, c.arguments) for c in chunk.tool_calls] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in expected
        ]
        for call in chunk.tool_calls:
            assert call.id.startswith("call_")
            jsonschema.validate(json.loads(call.arguments), schemas[call.name])
    if forced == "named":
        assert [c.name for c in whole.tool_calls] == ["get_weather"]


def test_grpc_content_is_set_only_for_a_chat_with_tools(engine: grpc.Channel) -> None:
    """Free text: a chat with tools ends with its content (no calls in a random model's
    answer cut by max_tokens, finish reason LENGTH); a chat without tools is as before."""
    fmt = _format(engine)
    stopping = pb.StoppingCriteria(max_tokens=6, ignore_eos=True)
    (free,) = _generate(engine, _chat([WEATHER], stopping=stopping, whole=True))
    assert free.finish_reason == pb.FINISH_REASON_LENGTH and free.HasField("content")
    assert free.content == (tool_calls.parse(free.text, fmt)[0] or "")
    (plain,) = _generate(engine, _chat([], stopping=stopping, whole=True))
    assert plain.finish_reason == pb.FINISH_REASON_LENGTH
    assert not plain.HasField("content") and not plain.tool_calls and plain.text


def test_a_client_from_before_reads_a_tool_call_answer(engine: grpc.Channel) -> None:
    """An old client's GenerateChunk (a schema without `tool_calls` and `content`, its
    own pool) reads the same text and tokens as a new one,
    and still sees which chunk is the last."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    schema = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(schema)
    chunk = next(m for m in schema.message_type if m.name == "GenerateChunk")
    fields = [f for f in chunk.field if f.name not in ("tool_calls", "content")]
    del chunk.field[:]
    chunk.field.extend(fields)
    del chunk.oneof_decl[:]  # `optional content`'s synthetic oneof
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    old = message_factory.GetMessageClass(pool.FindMessageTypeByName("llm.engine.v1.GenerateChunk"))  # fmt: skip
    assert "tool_calls" not in old.DESCRIPTOR.fields_by_name
    generate = engine.unary_stream("/llm.engine.v1.Engine/Generate", response_deserializer=old.FromString)  # fmt: skip
    request = _forced([], parallel=True, seed=4)
    chunks = list(generate(request.SerializeToString(), timeout=60))
    new = _generate(engine, request)
    assert new[-1].tool_calls and new[-1].finish_reason == pb.FINISH_REASON_STOP
    # the same seed: the same answer (in chunks that may split it otherwise)
    assert "".join(c.text for c in chunks) == "".join(c.text for c in new)
    assert [t for c in chunks for t in c.token_ids] == [t for c in new for t in c.token_ids]
    assert [c.finish_reason for c in chunks] == [0] * (len(chunks) - 1) + [pb.FINISH_REASON_STOP]
