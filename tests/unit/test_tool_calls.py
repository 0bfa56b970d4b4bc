"""The tool call parsers on sample answers in each template family's format: a
whole answer, and the same answer fed in two pieces at every split point (what a stream
sends must add up to the whole answer's message); the engine's grammar forcing calls in
each format, its markers written as special tokens where the vocabulary has them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import torch
from tests.support import MISTRAL_SPECIALS, MISTRAL_V11_TEMPLATE, chat_tokenizer

from llm.config import ModelConfig
from llm.data.tokenizers import HFTokenizer, SimpleCharacterTokenizer
from llm.inference import BatchGenerator, IncrementalDecoder, Request, SamplingParams
from llm.inference.grammar import Matcher, grammar_tokenizer, tool_call_format, tool_call_grammar
from llm.models.decoder import DecoderModel
from llm_common import tool_calls
from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.tool_calls import Parser, accumulate, parse
from llm_engine.validation import generation_spec

WEATHER = ("get_weather", '{"city": "Paris", "unit": "C"}')
TIME = ("get_time", "{}")
SAMPLES: list[tuple[str, str, str | None, list[tuple[str, str]]]] = [
    # Qwen2.5 / Hermes 2 Pro
    (
        "hermes",
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me check.",
        [WEATHER, TIME],
    ),
    # what the engine's grammar writes (compact JSON)
    (
        "hermes",
        '<tool_call>\n{"name":"get_weather","arguments":{"city":"a}\\"b","unit":"F"}}\n</tool_call>',
        None,
        [("get_weather", '{"city":"a}\\"b","unit":"F"}')],
    ),
    # keys in the other order: the call comes whole when its object closes
    (
        "hermes",
        '<tool_call>{"arguments": {"x": 1}, "name": "f"}</tool_call>',
        None,
        [("f", '{"x": 1}')],
    ),
    (
        "hermes",
        "a <tool> b <tool_call>not json</tool_call> c ",
        "a <tool> b <tool_call>not json</tool_call> c ",
        [],
    ),
    ("hermes", "  no calls here\n", "  no calls here\n", []),
    # Mistral 7B Instruct v0.3
    (
        "mistral",
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}, {"name": "get_time", "arguments": {}}]',
        None,
        [WEATHER, TIME],
    ),
    ("mistral", "Sure: [TOOL is not a call", "Sure: [TOOL is not a call", []),
    # the marker is a special token, dropped when the engine decodes
    ("mistral", '[{"name": "get_time", "arguments": {}}]', None, [TIME]),
    ("mistral", "[1] is a footnote, [{x}] too", "[1] is a footnote, [{x}] too", []),
    ("mistral", '[{"not": "a call"}] text', '[{"not": "a call"}] text', []),
    # Mistral tokenizer v11 on (Mistral Small 3.2, Magistral, Devstral): name, [ARGS], JSON
    (
        "mistral_v11",
        '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "C"}[TOOL_CALLS]get_time[ARGS]{}',
        None,
        [WEATHER, TIME],
    ),
    ("mistral_v11", "Let me check. [TOOL_CALLS]get_time[ARGS]{}\n", "Let me check.", [TIME]),
    # no [ARGS] (the name ends at the arguments), and v13's [CALL_ID] before it
    ("mistral_v11", '[TOOL_CALLS]get_weather{"city": "Paris", "unit": "C"}', None, [WEATHER]),
    ("mistral_v11", "[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{}", None, [TIME]),
    ("mistral_v11", "Use [TOOL_CALLS] wisely.", "Use [TOOL_CALLS] wisely.", []),
    ("mistral_v11", "[TOOL_CALLS]get time[ARGS]{}", "[TOOL_CALLS]get time[ARGS]{}", []),
    ("mistral_v11", "[1] is a {footnote}", "[1] is a {footnote}", []),
    # Llama 3.1 / 3.2 JSON tool calling
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}',
        None,
        [WEATHER],
    ),
    (
        "llama3",
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "C"}}; {"name": "get_time", "parameters": {}}',
        None,
        [WEATHER, TIME],
    ),
    ("llama3", "It is {sunny} today.", "It is {sunny} today.", []),
    ("llama3", " {sunny} today. ", " {sunny} today. ", []),
]


def _shape(result: tuple[str | None, list[dict[str, Any]]]) -> tuple[Any, ...]:
    content, calls = result
    return content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), SAMPLES)
def test_whole_answer(fmt: str, text: str, content: str | None, calls: list[Any]) -> None:
    got_content, got_calls = parse(text, fmt)
    assert _shape((got_content, got_calls)) == (content, calls)
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got_calls)
    assert len({c["id"] for c in got_calls}) == len(got_calls)


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), SAMPLES)
def test_every_split_point_gives_the_whole_answer(fmt: str, text: str, content: str | None, calls: list[Any]) -> None:  # fmt: skip
    for i in range(len(text) + 1):
        parser = Parser(fmt)
        events = parser.feed(text[:i]) + parser.feed(text[i:]) + parser.finish()
        assert _shape(accumulate(events)) == (content, calls), i


def test_names_and_arguments_stream_before_the_call_ends() -> None:
    parser = Parser("hermes")
    first = parser.feed('Hi <tool_call>\n{"name": "get_weather", "arguments": {"ci')
    assert first[0] == tool_calls.Content("Hi")
    assert isinstance(first[1], tool_calls.CallStart) and first[1].name == "get_weather"
    assert first[2:] == [tool_calls.Arguments(0, '{"ci')]
    assert parser.feed('ty": "P"}}\n</tool') == [tool_calls.Arguments(0, 'ty": "P"}')]
    assert parser.feed("_call>") + parser.finish() == []


def test_content_holds_back_only_a_possible_marker() -> None:
    parser = Parser("hermes")
    assert parser.feed("The answer <tool") == [tool_calls.Content("The answer")]
    assert parser.feed("s> are") == [tool_calls.Content(" <tools> are")]


@pytest.mark.parametrize(
    ("template", "fmt"),
    [
        ("{% for t in tools %}...{% endfor %}[TOOL_CALLS] {{ calls }}", "mistral"),
        ("{{- '[TOOL_CALLS]' + tool['function']['name'] + '[ARGS]' + arguments }}", "mistral_v11"),
        ("return a json object within <tool_call></tool_call> tags", "hermes"),
        ("{{- '<|python_tag|>' + tool_call.name }}", "llama3"),
        ('Respond in the format {"name": function name, "parameters": dictionary}', "llama3"),
        ("{% for m in messages %}{{ m['content'] }}{% endfor %}", ""),
    ],
)
def test_format_from_chat_template(template: str, fmt: str) -> None:
    assert tool_call_format(template) == fmt


WEATHER_FN = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["C", "F"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
TIME_FN = {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}  # fmt: skip


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("fmt", ["hermes", "mistral", "mistral_v11", "llama3"])
def test_forced_calls_in_each_format_parse_back(fmt: str) -> None:
    """What the engine's grammar makes a random model write under `required` is calls the
    gateway's parser for the same format reads back, arguments valid against the schema."""
    tok = SimpleCharacterTokenizer([chr(c) for c in range(32, 127)] + ["\n"])
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=128, max_seq_len=256, init_std=0.2)
    model = DecoderModel(config).eval()
    vocab = grammar_tokenizer(tok, 128, tok.stop_ids)
    grammar = tool_call_grammar([WEATHER_FN, TIME_FN], parallel=False, fmt=fmt)
    eos = frozenset(tok.stop_ids)
    texts = []
    for seed in (1, 2, 3):
        request = Request(tok.encode("Call: "), SamplingParams(temperature=1.0, seed=seed), 200, eos, grammar=Matcher(vocab, grammar))  # fmt: skip
        batch = BatchGenerator(model, n_slots=1)
        batch.add(request)
        tokens = []
        while batch.active:
            tokens += [e.token_id for e in batch.step()]
        assert tokens[-1] in eos  # the grammar completed
        texts.append(tok.decode(tokens[:-1]))
    for text in texts:
        content, calls = parse(text, fmt)
        assert content is None and calls, text
        for call in calls:
            function = {"get_weather": WEATHER_FN, "get_time": TIME_FN}[call["function"]["name"]]
            jsonschema.validate(json.loads(call["function"]["arguments"]), function["parameters"])


PARALLEL = {
    "hermes": '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris","unit":"C"}}\n</tool_call>\n<tool_call>\n{"name":"get_time","arguments":{}}\n</tool_call>',
    "mistral": '[TOOL_CALLS][{"name":"get_weather","arguments":{"city":"Paris","unit":"C"}},{"name":"get_time","arguments":{}}]',
    "mistral_v11": '[TOOL_CALLS]get_weather[ARGS]{"city":"Paris","unit":"C"}[TOOL_CALLS]get_time[ARGS]{}',
    "llama3": '{"name":"get_weather","parameters":{"city":"Paris","unit":"C"}}; {"name":"get_time","parameters":{}}',
}


@pytest.mark.parametrize("fmt", ["hermes", "mistral", "mistral_v11", "llama3"])
def test_parallel_calls_grammar_takes_the_format(fmt: str) -> None:
    tok = SimpleCharacterTokenizer([chr(c) for c in range(32, 127)] + ["\n"])
    vocab = grammar_tokenizer(tok, 128, tok.stop_ids)
    matcher = Matcher(vocab, tool_call_grammar([WEATHER_FN, TIME_FN], parallel=True, fmt=fmt))
    assert all(matcher.accept(t) for t in tok.encode(PARALLEL[fmt]))
    assert matcher.accept(tok.stop_ids[0]) and matcher.error is None
    _, calls = parse(PARALLEL[fmt], fmt)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]


@pytest.mark.usefixtures("one_torch_thread")
def test_mistral_markers_that_are_special_tokens_are_written_as_them_and_kept(
    tmp_path: Path,
) -> None:
    """With [TOOL_CALLS] and [ARGS] special tokens of the vocabulary (as in Mistral's), a
    forced call is written with those tokens, not their characters, and a chat with tools
    keeps their text in the output although special tokens are skipped, so the calls parse."""
    chat_tokenizer(MISTRAL_V11_TEMPLATE, MISTRAL_SPECIALS).save_pretrained(tmp_path)
    tok = HFTokenizer(tmp_path)
    markers = {m: tok.encode(m)[0] for m in ("[TOOL_CALLS]", "[ARGS]")}
    chat = pb.ChatMessages(
        messages=[pb.ChatMessage(role="user", content="The weather in Paris?")],
        tools=[json.dumps({"type": "function", "function": f}) for f in (WEATHER_FN, TIME_FN)],
    )
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, max_seq_len=512, init_std=0.2)  # fmt: skip
    model = DecoderModel(config).eval()
    vocab = grammar_tokenizer(tok, config.vocab_size, tok.stop_ids)
    for seed in (1, 2):
        request = pb.GenerateRequest(
            chat=chat, sampling=pb.SamplingParams(temperature=1.0, seed=seed),
            structured_output=pb.StructuredOutput(tool_calls=pb.ToolCallConstraint(parallel=True)),
            stopping=pb.StoppingCriteria(max_tokens=200),
        )  # fmt: skip
        spec = generation_spec(request, tok, vocab_size=config.vocab_size, context_length=512)
        assert spec.tool_call_tokens == set(markers.values())
        work = Request(spec.prompt_ids, spec.sampling, spec.max_new_tokens, spec.stop_token_ids, grammar=Matcher(vocab, spec.grammar))  # fmt: skip
        batch = BatchGenerator(model, n_slots=1, max_seq_len=512)
        batch.add(work)
        tokens = []
        while batch.active:
            tokens += [e.token_id for e in batch.step()]
        assert tokens[-1] in spec.stop_token_ids  # the grammar completed
        assert tokens[0] == markers["[TOOL_CALLS]"] and markers["[ARGS]"] in tokens
        decoder = IncrementalDecoder(tok, keep_special=spec.tool_call_tokens)
        text = "".join(decoder.add([t]) for t in tokens[:-1]) + decoder.flush()
        assert text.startswith("[TOOL_CALLS]") and "[ARGS]" in text
        assert "[TOOL_CALLS]" not in tok.decode(tokens[:-1])  # what skipping alone leaves
        content, calls = parse(text, "mistral_v11")
        assert content is None and calls, text
        for call in calls:
            function = {"get_weather": WEATHER_FN, "get_time": TIME_FN}[call["function"]["name"]]
            jsonschema.validate(json.loads(call["function"]["arguments"]), function["parameters"])
