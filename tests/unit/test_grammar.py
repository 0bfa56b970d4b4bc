"""Constrained decoding: a random model writes schema-valid JSON when its tokens are masked
by the request's grammar, in a batch shared with free requests, which stay as they were."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from llm.config import ModelConfig
from llm.data.tokenizers import SimpleCharacterTokenizer
from llm.inference import BatchGenerator, Request, SamplingParams
from llm.inference.grammar import (
    GrammarError,
    Matcher,
    grammar_tokenizer,
    json_object_grammar,
    json_schema_grammar,
)
from llm.models.decoder import DecoderModel

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "kind": {"enum": ["cat", "dog"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "kind", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def setup() -> tuple[DecoderModel, SimpleCharacterTokenizer, object]:
    tok = SimpleCharacterTokenizer([chr(c) for c in range(32, 127)])
    torch.manual_seed(0)
    # The model's vocabulary is padded past the tokenizer's: those ids are never allowed.
    config = ModelConfig.from_preset("tiny", vocab_size=128, max_seq_len=192, init_std=0.2)
    model = DecoderModel(config).eval()
    return model, tok, grammar_tokenizer(tok, 128, tok.stop_ids)


def _run(model: DecoderModel, requests: list[Request]) -> list[tuple[list[int], str]]:
    batch = BatchGenerator(model, n_slots=len(requests))
    for r in requests:
        batch.add(r)
    out: dict[int, tuple[list[int], str]] = {}
    while batch.active:
        for e in batch.step():
            tokens, _ = out.get(id(e.request), ([], ""))
            out[id(e.request)] = ([*tokens, e.token_id], e.finish_reason or "")
    return [out[id(r)] for r in requests]


def test_grammar_forces_valid_json_in_a_shared_batch(setup: tuple) -> None:
    model, tok, vocab = setup
    grammar = json_schema_grammar(SCHEMA)
    eos = frozenset(tok.stop_ids)
    prompt = tok.encode("Answer in JSON: ")

    def requests() -> list[Request]:
        return [
            Request(prompt, SamplingParams(temperature=0), 150, eos,
                    grammar=Matcher(vocab, grammar)),
            Request(prompt, SamplingParams(temperature=0), 20, eos),
            Request(prompt, SamplingParams(temperature=1.0, seed=3), 150, eos,
                    grammar=Matcher(vocab, json_object_grammar())),
            Request(prompt, SamplingParams(temperature=1.0, seed=4), 20, eos),
            Request(prompt, SamplingParams(temperature=1.2, seed=5), 150, eos,
                    grammar=Matcher(vocab, grammar)),
        ]  # fmt: skip

    results = _run(model, requests())
    for i in (0, 2, 4):
        tokens, reason = results[i]
        assert reason == "stop" and tokens[-1] in eos  # EOS once the document is complete
        document = json.loads(tok.decode(tokens))
        if i != 2:
            jsonschema.validate(document, SCHEMA)
        else:
            assert isinstance(document, dict)
    # Unconstrained rows are what they are alone: masks touch only their own rows.
    free = [r for i, r in enumerate(requests()) if i in (1, 3)]
    assert [results[1], results[3]] == _run(model, free)
    # Without the mask, the random model writes no JSON at all.
    unconstrained = Request(prompt, SamplingParams(temperature=0), 40, eos)
    with pytest.raises(json.JSONDecodeError):
        json.loads(tok.decode(_run(model, [unconstrained])[0][0]))


def test_a_cut_document_is_a_prefix_of_a_valid_one(setup: tuple) -> None:
    model, tok, vocab = setup
    grammar = json_schema_grammar(SCHEMA)
    request = Request(
        tok.encode("{"), SamplingParams(temperature=0), 7, frozenset(tok.stop_ids),
        grammar=Matcher(vocab, grammar),
    )  # fmt: skip
    tokens, reason = _run(model, [request])[0]
    assert reason == "length" and len(tokens) == 7
    assert tok.decode(tokens) == '{"name"'  # properties come in the schema's order


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}, "if"),
    ],
)
def test_unsupported_schema_features_are_named(schema: dict, named: str) -> None:
    with pytest.raises(GrammarError, match=named):
        json_schema_grammar(schema)


@pytest.mark.parametrize("schema", ["{", "[1]"])
def test_a_schema_must_be_a_json_object(schema: str) -> None:
    with pytest.raises(GrammarError):
        json_schema_grammar(schema)
