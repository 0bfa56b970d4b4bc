"""Constrained decoding: a grammar per request becomes a token mask at every step.

The grammar engine is llguidance (https://github.com/guidance-ai/llguidance): a JSON
schema (or Lark grammar) is compiled to an Earley parser over the tokenizer's byte
strings, and at each step `Matcher.fill` writes the set of tokens that keep the output a
prefix of some document the grammar accepts, as a bitmask (bit `t % 32` of word `t // 32`
is token `t`). The sampler sets every other token's logit to -inf, so even a model with
random weights writes valid JSON. End-of-sequence tokens are allowed only where the
document is complete; a generation cut by `max_tokens` is a prefix of a valid document.

Grammars travel as llguidance's serialized grammar text (`json_schema_grammar`,
`json_object_grammar`): checked where a request is validated, compiled into a `Matcher`
where it is admitted.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import llguidance
import llguidance.hf
import torch

from llm.data.tokenizers import BaseTokenizer

# Compact JSON: no whitespace between tokens. Free whitespace lets a model wander
# (a weak one can emit newlines until max_tokens) and adds nothing to the document.
_COMPACT: dict[str, Any] = {"whitespace_flexible": False}


class GrammarError(ValueError):
    """A schema or grammar the engine cannot enforce; the message names the feature."""


def json_schema_grammar(schema: str | dict[str, Any]) -> str:
    """The grammar of JSON documents valid against `schema` (JSON Schema, text or dict).
    Raises `GrammarError` for a schema that is not JSON, not an object, or uses a
    feature the grammar engine cannot enforce (the message names it: a keyword such as
    `uniqueItems` is refused, never silently ignored)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema is an object, got {type(schema).__name__}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_COMPACT)
    except ValueError as e:
        raise GrammarError(str(e)) from None
    return _checked(grammar)


def json_object_grammar() -> str:
    """Any JSON object (OpenAI's `{"type": "json_object"}`)."""
    return json_schema_grammar({"type": "object"})


def tool_call_format(chat_template: str) -> str:
    """The tool call format a chat template teaches, from its text (the first rule that
    matches): `[TOOL_CALLS]` and `[ARGS]` -> `mistral_v11` (Mistral tokenizers v11 on, which
    write a call as `[TOOL_CALLS]name[ARGS]{...}`), `[TOOL_CALLS]` -> `mistral`,
    `<tool_call>` -> `hermes`, `<|python_tag|>` or a `"parameters": ` JSON call -> `llama3`;
    "" when it shows none. A chat answer's calls are parsed in this format (by the engine
    for its gRPC clients, and by the gateway for OpenAI's)."""
    if "[TOOL_CALLS]" in chat_template:
        return "mistral_v11" if "[ARGS]" in chat_template else "mistral"
    if "<tool_call>" in chat_template:
        return "hermes"
    if "<|python_tag|>" in chat_template or '"parameters": ' in chat_template:
        return "llama3"
    return ""


# The markers of each format's calls: a vocabulary may hold them as special tokens, which
# a grammar writes as the token (not as its characters) and decoding keeps in a tool call
# answer's text (the caller parses the calls out of it).
TOOL_CALL_MARKERS = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "mistral": ("[TOOL_CALLS]",),
    "mistral_v11": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
    "llama3": ("<|python_tag|>",),
}


def special_tokens(tokenizer: BaseTokenizer, texts: Sequence[str]) -> dict[str, int]:
    """Those of `texts` that are one special token of `tokenizer`, text -> id: the text
    encodes to that one id, which decoding drops unless told to show special tokens."""
    out = {}
    for text in texts:
        ids = tokenizer.encode(text)
        if (
            len(ids) == 1
            and tokenizer.decode(ids) == ""
            and tokenizer.decode(ids, skip_special_tokens=False) == text
        ):
            out[text] = ids[0]
    return out


def tool_call_grammar(
    functions: Sequence[dict[str, Any]], parallel: bool, fmt: str = "hermes",
    special: Mapping[str, int] | None = None,
) -> str:  # fmt: skip
    """Calls of `functions` (OpenAI `function` objects: name, parameters) in the chat
    template's format `fmt` (`tool_call_format`), one or (with `parallel`) several, each
    call's arguments valid against its function's schema:
    hermes `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` (newline-joined),
    mistral `[TOOL_CALLS][{"name": ..., "arguments": {...}},...]`, mistral_v11
    `[TOOL_CALLS]name[ARGS]{...}` (one after the other), llama3
    `{"name": ..., "parameters": {...}}` (joined by `; `). A marker in `special` (text ->
    token id, `special_tokens`) is written as that special token."""
    if not functions:
        raise GrammarError("no function to call")
    if fmt not in TOOL_CALL_MARKERS:
        raise GrammarError(f"no tool call format {fmt!r}")
    for f in functions:  # each function's own keywords are checked (and named) here
        json_schema_grammar(_parameters(f))
    marker = _marker(special or {})
    if fmt == "mistral_v11":
        return lark_grammar(_named_calls(functions, parallel, marker))
    return lark_grammar(_json_calls(functions, parallel, fmt, marker))


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object"}


def _named_calls(
    functions: Sequence[dict[str, Any]], parallel: bool, marker: Callable[[str], str]
) -> str:
    """Lark for `[TOOL_CALLS]name[ARGS]{...}` calls: the name is outside the JSON, so each
    function is a rule of its own."""
    rules = [f"start: {'call+' if parallel else 'call'}",
             f"call: {' | '.join(f'call{i}' for i in range(len(functions)))}"]  # fmt: skip
    for i, f in enumerate(functions):
        arguments = {**_parameters(f), "x-guidance": _COMPACT}
        rules.append(f"call{i}: {marker('[TOOL_CALLS]')} {json.dumps(f['name'])} "
                     f"{marker('[ARGS]')} arguments{i}")  # fmt: skip
        rules.append(f"arguments{i}: %json {json.dumps(arguments)}")
    return "\n".join(rules) + "\n"


def _json_calls(
    functions: Sequence[dict[str, Any]], parallel: bool, fmt: str, marker: Callable[[str], str]
) -> str:
    """Lark for calls that are JSON objects `{"name": ..., key: {...}}` (`body`), wrapped
    and joined as `fmt` has them."""
    key = "parameters" if fmt == "llama3" else "arguments"
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, key: _parameters(f)},
            "required": ["name", key],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = {"anyOf": options, "x-guidance": _COMPACT}
    call, joiner = {
        "hermes": (f'{marker("<tool_call>")} "\\n" body "\\n" {marker("</tool_call>")}', '"\\n"'),
        "mistral": ("body", '","'),
        "llama3": ("body", '"; "'),
    }[fmt]
    calls = f"call ({joiner} call)*" if parallel else "call"
    if fmt == "mistral":
        calls = f'{marker("[TOOL_CALLS]")} "[" {calls} "]"'
    return f"start: {calls}\ncall: {call}\nbody: %json {json.dumps(schema)}\n"


def _marker(special: Mapping[str, int]) -> Callable[[str], str]:
    """A marker in Lark: its special token (llguidance's `<[id]>`) or its text."""
    return lambda text: f"<[{special[text]}]>" if text in special else json.dumps(text)


def lark_grammar(lark: str) -> str:
    """A Lark grammar (llguidance's dialect: `%json {...}` embeds a JSON schema)."""
    return _checked(llguidance.LLMatcher.grammar_from_lark(lark))


def _checked(grammar: str) -> str:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        # "Unimplemented keys: [\"uniqueItems\"]" and the like: already names the feature.
        raise GrammarError(error.strip())
    return grammar


def grammar_tokenizer(
    tokenizer: BaseTokenizer, vocab_size: int, stop_ids: Sequence[int]
) -> llguidance.LLTokenizer:
    """The grammar engine's view of `tokenizer`: every token's bytes, for a model with
    `vocab_size` logits (ids past the tokenizer's are never allowed), `stop_ids` the
    tokens that end a document. Built once per model (about a second for a 150k
    vocabulary)."""
    stops = list(stop_ids) or [tokenizer.eos_id or 0]
    hf = getattr(tokenizer, "tok", None)
    if hf is not None and hasattr(hf, "backend_tokenizer"):
        return llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size, eos_token=stops)
    return llguidance.LLTokenizer(
        llguidance.TokenizerWrapper(_ByteVocab(tokenizer, stops)), n_vocab=vocab_size,
        eos_token=stops,
    )  # fmt: skip


class _ByteVocab:
    """A tokenizer without a Hugging Face backend (one token per character) as
    llguidance's `TokenizerWrapper` wants it: each id's bytes, and an encoder."""

    def __init__(self, tokenizer: BaseTokenizer, stops: list[int]) -> None:
        self.eos_token_id, self.bos_token_id = stops[0], tokenizer.bos_id
        specials = {tokenizer.pad_id, tokenizer.eos_id, tokenizer.bos_id, *stops} - {None}
        self.special_token_ids = sorted(specials)
        self.tokens = [
            # Special tokens get names no text can spell (0xFF is never in UTF-8).
            b"\xff<special_%d>" % i if i in specials else tokenizer.decode([i]).encode()
            for i in range(tokenizer.vocab_size)
        ]
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):  # llguidance probes whether bytes are accepted: they are
            text = text.decode(errors="replace")
        return self._tokenizer.encode(text)


class Matcher:
    """One request's grammar state: which tokens may come next, and the tokens so far."""

    def __init__(self, tokenizer: llguidance.LLTokenizer, grammar: str) -> None:
        self._matcher = llguidance.LLMatcher(tokenizer, grammar)
        if self._matcher.is_error():
            raise GrammarError(self._matcher.get_error())

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of `bitmask` ((B, ceil(V/32))
        int32, on the CPU)."""
        v = bitmask[row]
        self._matcher.unsafe_compute_mask_ptr(v.data_ptr(), v.numel() * v.element_size())

    def accept(self, token_id: int) -> bool:
        """Advance past a sampled token; False if the grammar did not allow it."""
        return self._matcher.consume_token(token_id)

    @property
    def done(self) -> bool:
        """The document is complete: only an end-of-sequence token may follow."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self._matcher.get_error() or None


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, W) int32 bitmask -> (B, vocab_size) bool, on the bitmask's device."""
    bits = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    unpacked = (bitmask[:, :, None] >> bits) & 1  # (B, W, 32)
    return unpacked.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()  # (B, V)
