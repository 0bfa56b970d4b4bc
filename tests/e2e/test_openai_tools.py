"""Tool calling through the official openai client against `llm-serve` on a random Hugging
Face model with a Qwen-style chat template (and Llama 3's and Mistral's v11 formats): the tools go through the template, a forced
call is written by the engine's grammar (so its arguments match the function's schema
even from random weights), and the tool's answer goes back through the template."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest
import torch
import transformers
from tests.e2e.e2e_services import Service, start, stop, wait_ready
from tests.support import MISTRAL_SPECIALS, MISTRAL_V11_TEMPLATE, chat_tokenizer

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
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:  # fmt: skip
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
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    service = start(
        "llm_gateway.serve", ["--checkpoint", str(out), "--port", "0", "--threads", "1"],
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
