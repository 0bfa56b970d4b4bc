"""Turn `GenerateRequest`/`TokenizeRequest`/`DetokenizeRequest` protos into checked engine
inputs.

Every problem raises `InvalidArgument` whose message starts with the proto field path
(`sampling.temperature: must be >= 0`), which the servicer returns as INVALID_ARGUMENT
and the gateway maps back to an OpenAI `param`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from llm.data.tokenizers import BaseTokenizer
from llm.inference import SamplingParams, max_new_tokens_for
from llm.inference.grammar import (
    TOOL_CALL_MARKERS,
    GrammarError,
    json_object_grammar,
    json_schema_grammar,
    special_tokens,
    tool_call_format,
    tool_call_grammar,
)
from llm_common.proto import MAX_STOP_CHARS
from llm_common.proto.v1 import engine_pb2 as pb

CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_STOP_STRINGS = 16  # each one is searched on every token
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
MAX_LOGIT_BIAS = 100.0  # OpenAI's range: [-100, 100]


class InvalidArgument(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class GenerationSpec:
    """A validated request: what the scheduler needs, nothing from the wire."""

    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int  # already capped by the context; 0: score the prompt only
    stop: tuple[str, ...]
    stop_token_ids: frozenset[int]
    logprobs: bool
    top_logprobs: int = 0
    prompt_logprobs: int | None = None  # alternatives per prompt token; None: not asked
    min_tokens: int = 0  # no stop before this many new tokens
    include_stop: bool = False  # the stop string or token's text ends the output
    skip_special_tokens: bool = True
    grammar: str | None = None  # constrains the output (llm.inference.grammar); None: free
    adapter: str = ""  # the LoRA adapter it runs with (the request's `model`); "": the base
    # A chat with tools: the special tokens that mark its calls (`[TOOL_CALLS]`, ...), whose
    # text the output keeps even with skip_special_tokens, for the calls to be parsed.
    tool_call_tokens: frozenset[int] = frozenset()
    # A chat with tools: the format its answer's calls are parsed in (a
    # `llm_common.tool_calls.FORMATS`); "": no tools, nothing parsed.
    tool_call_format: str = ""


def chat_messages(chat: pb.ChatMessages, field: str) -> list[dict[str, Any]]:
    """The messages as chat templates take them (tool calls in Hugging Face's shape)."""
    if not chat.messages:
        raise InvalidArgument(field, "at least one message is required")
    out = []
    for i, m in enumerate(chat.messages):
        if m.role not in CHAT_ROLES:
            raise InvalidArgument(
                f"{field}.messages[{i}].role", f"{m.role!r} is not one of {sorted(CHAT_ROLES)}"
            )
        message: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": "function",
                 "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                for c in m.tool_calls
            ]  # fmt: skip
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _arguments(text: str) -> Any:
    """A call's arguments as templates render them: the JSON object, or the text if not."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def chat_tools(chat: pb.ChatMessages, field: str) -> list[dict[str, Any]]:
    """The chat's tools, each an OpenAI `tools` entry with a named function."""
    tools = []
    for i, text in enumerate(chat.tools):
        try:
            tool = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidArgument(f"{field}.tools[{i}]", f"not JSON: {e}") from None
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidArgument(f"{field}.tools[{i}]", 'must be {"function": {"name", ...}}')
        tools.append(tool)
    return tools


def encode_chat(
    tokenizer: BaseTokenizer, chat: pb.ChatMessages, field: str, add_generation_prompt: bool,
    add_special_tokens: bool = False,
) -> list[int]:  # fmt: skip
    messages = chat_messages(chat, field)
    tools = chat_tools(chat, field) or None
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tools=tools
        )
    except Exception as e:  # a template may raise anything (jinja, transformers)
        raise InvalidArgument(field, f"the chat template rejected the messages: {e}") from e
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def prompt_ids(request: pb.GenerateRequest, tokenizer: BaseTokenizer, vocab_size: int) -> list[int]:
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("input", "one of text, chat or token_ids is required")
    if kind == "text":
        if not request.text:
            raise InvalidArgument("text", "must not be empty")
        return tokenizer.encode(request.text)
    if kind == "chat":
        return encode_chat(tokenizer, request.chat, "chat", add_generation_prompt=True)
    if not request.token_ids.ids:
        raise InvalidArgument("token_ids.ids", "must not be empty")
    return token_ids(request.token_ids.ids, "token_ids.ids", vocab_size)


def token_ids(ids: Iterable[int], field: str, vocab_size: int) -> list[int]:
    """`ids` as a list, each checked against the vocabulary (`field[i]` names a bad one)."""
    out = list(ids)
    for i, t in enumerate(out):
        if not 0 <= t < vocab_size:
            raise InvalidArgument(
                f"{field}[{i}]", f"{t} is outside the vocabulary [0, {vocab_size})"
            )
    return out


def logit_bias(bias: Mapping[int, float], vocab_size: int) -> dict[int, float]:
    """The checked bias table; `sampling.logit_bias[ID]` names a bad entry."""
    out = {}
    for token, value in sorted(bias.items()):
        field = f"sampling.logit_bias[{token}]"
        if not 0 <= token < vocab_size:
            raise InvalidArgument(
                field, f"token {token} is outside the vocabulary [0, {vocab_size})"
            )
        if not (math.isfinite(value) and -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS):
            raise InvalidArgument(field, f"must be in [-100, 100], got {value}")
        out[token] = value
    return out


def sampling_params(s: pb.SamplingParams, vocab_size: int) -> SamplingParams:
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise InvalidArgument("sampling.temperature", f"must be >= 0, got {s.temperature}")
    # proto3 floats have no presence: 0 means "not set", i.e. no nucleus filtering.
    if not math.isfinite(s.top_p) or not 0 <= s.top_p <= 1:
        raise InvalidArgument("sampling.top_p", f"must be in (0, 1] (0: unset), got {s.top_p}")
    if s.top_k < 0:
        raise InvalidArgument("sampling.top_k", f"must be >= 0, got {s.top_k}")
    if not math.isfinite(s.min_p) or not 0 <= s.min_p <= 1:
        raise InvalidArgument("sampling.min_p", f"must be in [0, 1], got {s.min_p}")
    # proto3: 0 means "not set", i.e. no repetition penalty (1).
    if not math.isfinite(s.repetition_penalty) or s.repetition_penalty < 0:
        raise InvalidArgument(
            "sampling.repetition_penalty", f"must be > 0 (0: unset), got {s.repetition_penalty}"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not math.isfinite(value) or not -2 <= value <= 2:
            raise InvalidArgument(f"sampling.{name}", f"must be in [-2, 2], got {value}")
    return SamplingParams(
        temperature=s.temperature,
        top_k=s.top_k,
        top_p=s.top_p or 1.0,
        min_p=s.min_p,
        repetition_penalty=s.repetition_penalty or 1.0,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        seed=s.seed % 2**63 if s.HasField("seed") else None,  # the sampler's seeds are int64
        logit_bias=logit_bias(s.logit_bias, vocab_size),
    )


def chat_template(tokenizer: BaseTokenizer) -> str:
    """The chat template's text: a Hugging Face tokenizer's (`tok.chat_template`, a text or
    named texts) or our own tokenizer's."""
    template = getattr(getattr(tokenizer, "tok", None), "chat_template", None)
    template = template or getattr(tokenizer, "chat_template", None) or ""
    return "\n".join(template.values()) if isinstance(template, dict) else str(template)


def generation_spec(
    request: pb.GenerateRequest,
    tokenizer: BaseTokenizer,
    *,
    vocab_size: int,
    context_length: int,
) -> GenerationSpec:
    sampling = sampling_params(request.sampling, vocab_size)
    stopping = request.stopping
    if stopping.max_tokens < 0:
        raise InvalidArgument("stopping.max_tokens", f"must be >= 0, got {stopping.max_tokens}")
    if stopping.min_tokens < 0:
        raise InvalidArgument("stopping.min_tokens", f"must be >= 0, got {stopping.min_tokens}")
    if stopping.HasField("max_tokens") and stopping.min_tokens > stopping.max_tokens:
        raise InvalidArgument(
            "stopping.min_tokens",
            f"must be <= max_tokens ({stopping.max_tokens}), got {stopping.min_tokens}",
        )
    if request.HasField("prompt_logprobs") and not (
        0 <= request.prompt_logprobs <= MAX_TOP_LOGPROBS
    ):
        raise InvalidArgument(
            "prompt_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}], got {request.prompt_logprobs}"
        )
    if len(stopping.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument("stopping.stop", f"at most {MAX_STOP_STRINGS} stop strings")
    for i, s in enumerate(stopping.stop):
        if not s:
            raise InvalidArgument(f"stopping.stop[{i}]", "must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise InvalidArgument(
                f"stopping.stop[{i}]", f"at most {MAX_STOP_CHARS} characters, got {len(s)}"
            )
    token_ids(stopping.stop_token_ids, "stopping.stop_token_ids", vocab_size)
    if request.top_logprobs < 0:
        raise InvalidArgument("top_logprobs", f"must be >= 0, got {request.top_logprobs}")
    if request.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidArgument(
            "top_logprobs", f"must be <= {MAX_TOP_LOGPROBS}, got {request.top_logprobs}"
        )

    tools = request.WhichOneof("input") == "chat" and bool(request.chat.tools)
    tool_format, markers = tool_call_syntax(tokenizer) if tools else ("hermes", {})
    grammar = structured_output(request, tool_format, markers)
    ids = prompt_ids(request, tokenizer, vocab_size)
    if not ids:
        raise InvalidArgument("input", "the input encodes to no tokens")
    if len(ids) >= context_length:
        raise InvalidArgument(
            "input",
            f"the prompt has {len(ids)} tokens but the context length is {context_length}; "
            f"at most {context_length - 1} leave room for a new token",
        )
    stop_ids = set(stopping.stop_token_ids)
    if not stopping.ignore_eos:  # EOS, and <|im_end|> for ChatML-tuned models
        stop_ids.update(tokenizer.stop_ids)
    wanted = stopping.max_tokens if stopping.HasField("max_tokens") else context_length
    return GenerationSpec(
        prompt_ids=ids,
        sampling=sampling,
        max_new_tokens=max_new_tokens_for(context_length, len(ids), wanted),
        stop=tuple(stopping.stop),
        stop_token_ids=frozenset(stop_ids),
        logprobs=request.logprobs or request.top_logprobs > 0,
        top_logprobs=request.top_logprobs,
        prompt_logprobs=request.prompt_logprobs if request.HasField("prompt_logprobs") else None,
        min_tokens=stopping.min_tokens,
        include_stop=stopping.include_stop_str_in_output,
        skip_special_tokens=(
            request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        ),
        grammar=grammar,
        tool_call_tokens=frozenset(markers.values()),
        tool_call_format=tool_format if tools else "",
    )


def tool_call_syntax(tokenizer: BaseTokenizer) -> tuple[str, dict[str, int]]:
    """The tool call format the chat template teaches (hermes when it shows none) and those
    of its markers that are special tokens of the tokenizer (text -> id)."""
    fmt = tool_call_format(chat_template(tokenizer)) or "hermes"
    return fmt, special_tokens(tokenizer, TOOL_CALL_MARKERS[fmt])


def structured_output(
    request: pb.GenerateRequest,
    tool_format: str = "hermes",
    markers: Mapping[str, int] | None = None,
) -> str | None:
    """The grammar the output must follow, checked; None for free text. Forced tool calls
    are in `tool_format`, `markers` written as those special tokens (`tool_call_syntax`)."""
    if not request.HasField("structured_output"):
        return None
    kind = request.structured_output.WhichOneof("kind")
    field = f"structured_output.{kind}"
    if kind == "json_schema":
        try:
            return json_schema_grammar(request.structured_output.json_schema)
        except GrammarError as e:
            raise InvalidArgument(field, f"unsupported JSON schema: {e}") from None
    if kind == "json_object" and request.structured_output.json_object:
        return json_object_grammar()
    if kind == "tool_calls":
        if request.WhichOneof("input") != "chat":
            raise InvalidArgument(field, "tool calls need a chat input with tools")
        functions = {t["function"]["name"]: t["function"] for t in chat_tools(request.chat, "chat")}
        names = list(request.structured_output.tool_calls.names) or list(functions)
        for name in names:
            if name not in functions:
                raise InvalidArgument(field, f"{name!r} is not one of the chat's tools")
        try:
            return tool_call_grammar(
                [functions[n] for n in names],
                request.structured_output.tool_calls.parallel,
                tool_format,
                markers,
            )
        except GrammarError as e:
            raise InvalidArgument(field, f"unsupported parameters schema: {e}") from None
    raise InvalidArgument("structured_output", "set json_schema, or json_object to true")


def tokenize(request: pb.TokenizeRequest, tokenizer: BaseTokenizer) -> list[int]:
    kind = request.WhichOneof("input")
    specials = request.add_special_tokens  # unset: false, as Generate encodes
    if kind == "text":
        return tokenizer.encode(request.text, add_special_tokens=specials)
    if kind == "chat":
        return encode_chat(tokenizer, request.chat, "chat", request.add_generation_prompt, specials)
    raise InvalidArgument("input", "one of text or chat is required")


def detokenize(request: pb.DetokenizeRequest, tokenizer: BaseTokenizer, vocab_size: int) -> str:
    """The text of the ids; special tokens show unless `skip_special_tokens` is set."""
    ids = token_ids(request.token_ids, "token_ids", vocab_size)
    return tokenizer.decode(ids, skip_special_tokens=request.skip_special_tokens)


def max_token_bytes(tokenizer: BaseTokenizer, vocab_size: int) -> int:
    """The most UTF-8 bytes any one token decodes to (a token of partial UTF-8 decodes to
    U+FFFD, 3 bytes): a caller can bound a text's token count from below without
    tokenizing it. Once per model load (about a second for a 150k vocabulary)."""
    longest = 1
    for i in range(vocab_size):
        try:
            longest = max(longest, len(tokenizer.decode([i]).encode()))
        except (ValueError, KeyError, IndexError):  # ids the tokenizer does not know
            continue
    return longest
