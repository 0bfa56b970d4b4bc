"""OpenAI response shapes built from engine chunks: completions and chat, whole and streamed,
any number of choices, with logprobs in chat's format or the legacy completions format."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_common import tool_calls
from llm_common.proto.v1 import engine_pb2 as pb
from llm_gateway.schemas import EngineCall, Prompt

# "tool_calls" is decided by this gateway's own parse of the text (`_finish`): it may send
# a chat as token ids (no tools for the engine to parse with), and with
# `tool_choice: "none"` calls stay text.
_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


@dataclass
class Choice:
    """One choice as far as it has been read from the engine."""

    index: int
    prompt_index: int
    prompt: Prompt | None
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    # The engine's prompt tokens 1..P-1 (when asked), and the text of token 0 (echo).
    prompt_logprobs: list[pb.TokenLogprob] = field(default_factory=list)
    first_token: str = ""
    sent: bool = False  # streaming: the first chunk (with the echo) went out
    offset: int = 0  # streaming, legacy logprobs: text offset of the next token
    tool_parser: tool_calls.Parser | None = None  # streaming with tools
    tool_calls_sent: int = 0  # streaming with tools: calls announced so far

    @classmethod
    def of(cls, call: EngineCall) -> Choice:
        return cls(call.index, call.prompt_index, call.prompt)

    def add(self, chunk: pb.GenerateChunk) -> None:
        self.text += chunk.text
        self.logprobs.extend(chunk.logprobs)
        self.prompt_logprobs.extend(chunk.prompt_logprobs)
        if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = _FINISH.get(chunk.finish_reason, "stop")
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens = chunk.usage.completion_tokens

    def prompt_text(self) -> str:
        """The prompt as text: as sent, or token ids joined from their strings."""
        if isinstance(self.prompt, str):
            return self.prompt
        return self.first_token + "".join(lp.token for lp in self.prompt_logprobs)

    def first_token_text(self) -> str:
        """The text of prompt token 0 (the engine scores, hence names, tokens 1..P-1 only):
        for a text prompt, what the other tokens leave of it."""
        if not isinstance(self.prompt, str):
            return self.first_token
        rest = "".join(lp.token for lp in self.prompt_logprobs)
        if self.prompt.endswith(rest):
            return self.prompt.removesuffix(rest)
        # Tokens that split a character decode to U+FFFD each: no exact suffix is left.
        return self.prompt[: max(len(self.prompt) - len(rest), 0)]


@dataclass
class Generation:
    """One request's choices as far as they have been read from the engine."""

    id: str
    model: str
    created: int
    choices: list[Choice] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        """Counted once per prompt, however many choices it has (as OpenAI does)."""
        return sum({c.prompt_index: c.prompt_tokens for c in self.choices}.values())

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}  # fmt: skip


# -- logprobs ---------------------------------------------------------------------------

Entry = tuple[str, float | None, dict[str, float] | None]  # token, logprob, alternatives


def _entry(lp: pb.TokenLogprob) -> Entry:
    """Legacy `top_logprobs`: the N most likely tokens and always the chosen one."""
    top = {alt.token: alt.logprob for alt in lp.top}
    top.setdefault(lp.token, lp.logprob)
    return lp.token, lp.logprob, top


def legacy_logprobs(entries: list[Entry], offset: int) -> tuple[dict[str, Any], int]:
    """`{tokens, token_logprobs, top_logprobs, text_offset}`, offsets into the choice's text
    (which starts with the prompt under echo) from `offset`; also the next offset."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}  # fmt: skip
    for token, logprob, top in entries:
        out["tokens"].append(token)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(token)
    return out, offset


def _alternative(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_logprob(lp: pb.TokenLogprob) -> dict[str, Any]:
    alternatives = [_alternative(alt.token, alt.logprob) for alt in lp.top]
    return {**_alternative(lp.token, lp.logprob), "top_logprobs": alternatives}


def _finish(c: Choice, calls: list[Any]) -> str | None:
    """`tool_calls` for an answer with calls, unless `max_tokens` cut it (`length`)."""
    return "tool_calls" if calls and c.finish_reason != "length" else c.finish_reason


# -- formats ----------------------------------------------------------------------------


class CompletionFormat:
    """`/v1/completions`: `text_completion` objects; `echo` starts each choice with its prompt
    (and, with `logprobs`, its tokens: the first one unscored, `null`, as OpenAI does)."""

    id_prefix, input_param = "cmpl", "prompt"

    def __init__(self, echo: bool = False, logprobs: int | None = None) -> None:
        self.echo, self.logprobs = echo, logprobs

    def use_model(self, info: pb.ModelInfoResponse) -> None:
        pass  # nothing in a completion depends on the model's chat template

    def opening(self, g: Generation, c: Choice) -> dict[str, Any] | None:
        return None  # completions streams start with text

    def _echo_entries(self, c: Choice) -> list[Entry]:
        return [(c.first_token_text(), None, None), *map(_entry, c.prompt_logprobs)]

    def _choice(self, c: Choice, text: str, tokens: list[pb.TokenLogprob], echo: bool, finish: str | None) -> dict[str, Any]:  # fmt: skip
        logprobs = None
        if self.logprobs is not None:
            entries = (self._echo_entries(c) if echo else []) + [_entry(lp) for lp in tokens]
            logprobs, c.offset = legacy_logprobs(entries, c.offset)
        if echo:
            text = c.prompt_text() + text
        return {"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": finish}

    def chunk(self, g: Generation, c: Choice, chunk: pb.GenerateChunk) -> dict[str, Any] | None:
        echo = self.echo and not c.sent
        if not (echo or chunk.text or chunk.logprobs or chunk.finish_reason):
            return None
        c.sent = True
        finish = c.finish_reason if chunk.finish_reason else None
        choice = self._choice(c, chunk.text, list(chunk.logprobs), echo, finish)
        return g.envelope("text_completion", [choice])

    def usage_chunk(self, g: Generation) -> dict[str, Any]:
        return {**g.envelope("text_completion", []), "usage": g.usage()}

    def whole(self, g: Generation) -> dict[str, Any]:
        choices = [self._choice(c, c.text, c.logprobs, self.echo, c.finish_reason) for c in g.choices]  # fmt: skip
        return {**g.envelope("text_completion", choices), "usage": g.usage()}


class ChatFormat:
    """`/v1/chat/completions`: `chat.completion` and `chat.completion.chunk` objects."""

    id_prefix, input_param = "chatcmpl", "messages"

    def __init__(self, logprobs: bool, tools: bool = False) -> None:
        # tools: the answer's calls are parsed into `tool_calls`, in the format the model's
        # chat template teaches (`use_model`).
        self.logprobs, self.tools = logprobs, tools
        self.tool_calls: str | None = "hermes" if tools else None  # a `tool_calls.FORMATS`

    def use_model(self, info: pb.ModelInfoResponse) -> None:
        if self.tools:  # a format this gateway does not know (a newer engine's): hermes
            fmt = info.tool_call_format
            self.tool_calls = fmt if fmt in tool_calls.FORMATS else "hermes"

    def message(self, c: Choice) -> tuple[dict[str, Any], str | None]:
        """The choice's message (content and tool calls) and its finish reason."""
        if not self.tool_calls:
            return {"role": "assistant", "content": c.text}, c.finish_reason
        content, calls = tool_calls.parse(c.text, self.tool_calls)
        if not calls:
            return {"role": "assistant", "content": c.text}, c.finish_reason
        return {"role": "assistant", "content": content, "tool_calls": calls}, _finish(c, calls)

    def opening(self, g: Generation, c: Choice) -> dict[str, Any] | None:
        delta = {"role": "assistant", "content": ""}  # the first delta announces the role
        choice = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": None}
        return g.envelope("chat.completion.chunk", [choice])

    def chunk(self, g: Generation, c: Choice, chunk: pb.GenerateChunk) -> dict[str, Any] | None:
        if self.tool_calls:
            return self._tool_chunk(g, c, chunk)
        if not (chunk.text or chunk.logprobs or chunk.finish_reason):
            return None
        choice: dict[str, Any] = {
            "index": c.index,
            "delta": {"content": chunk.text} if chunk.text else {},
            "logprobs": None,
            "finish_reason": c.finish_reason if chunk.finish_reason else None,
        }
        if self.logprobs:
            choice["logprobs"] = {"content": [chat_logprob(lp) for lp in chunk.logprobs]}
        return g.envelope("chat.completion.chunk", [choice])

    def _tool_chunk(
        self, g: Generation, c: Choice, chunk: pb.GenerateChunk
    ) -> dict[str, Any] | None:
        """With tools, as OpenAI streams them: content as it comes (holding back only what
        could start a call), then per call a `tool_calls` delta with its index, id and name,
        then its arguments in pieces as the JSON arrives."""
        if c.tool_parser is None:
            c.tool_parser = tool_calls.Parser(self.tool_calls or "hermes")
        events = c.tool_parser.feed(chunk.text)
        if chunk.finish_reason:
            events += c.tool_parser.finish()
        content = "".join(e.text for e in events if isinstance(e, tool_calls.Content))
        delta: dict[str, Any] = {"content": content} if content else {}
        calls = []
        for e in events:
            if isinstance(e, tool_calls.CallStart):
                c.tool_calls_sent += 1
                function = {"name": e.name, "arguments": ""}
                calls.append({"index": e.index, "id": e.id, "type": "function", "function": function})  # fmt: skip
            elif isinstance(e, tool_calls.Arguments):
                calls.append({"index": e.index, "function": {"arguments": e.text}})
        if calls:
            delta["tool_calls"] = calls
        finish = None
        if chunk.finish_reason:
            finish = _finish(c, [None] * c.tool_calls_sent) if c.tool_calls_sent else c.finish_reason  # fmt: skip
        if not (delta or chunk.logprobs or finish):
            return None
        choice: dict[str, Any] = {"index": c.index, "delta": delta, "logprobs": None, "finish_reason": finish}  # fmt: skip
        if self.logprobs:
            choice["logprobs"] = {"content": [chat_logprob(lp) for lp in chunk.logprobs]}
        return g.envelope("chat.completion.chunk", [choice])

    def usage_chunk(self, g: Generation) -> dict[str, Any]:
        return {**g.envelope("chat.completion.chunk", []), "usage": g.usage()}

    def whole(self, g: Generation) -> dict[str, Any]:
        choices = []
        for c in g.choices:
            message, finish = self.message(c)
            logprobs = {"content": [chat_logprob(lp) for lp in c.logprobs]} if self.logprobs else None  # fmt: skip
            choices.append({"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish})  # fmt: skip
        return {**g.envelope("chat.completion", choices), "usage": g.usage()}


ResponseFormat = CompletionFormat | ChatFormat
