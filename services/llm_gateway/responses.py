"""OpenAI response shapes built from engine chunks: completions and chat, whole and streamed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llm_engine.proto.v1 import engine_pb2 as pb

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}


def token_logprob(lp: pb.TokenLogprob) -> dict[str, Any]:
    return {"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()), "top_logprobs": []}  # fmt: skip


@dataclass
class Generation:
    """One request's output as far as it has been read from the engine."""

    id: str
    model: str
    created: int
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, chunk: pb.GenerateChunk) -> None:
        self.text += chunk.text
        self.logprobs.extend(token_logprob(lp) for lp in chunk.logprobs)
        if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self.finish_reason = _FINISH.get(chunk.finish_reason, "stop")
            self.prompt_tokens = chunk.usage.prompt_tokens
            self.completion_tokens = chunk.usage.completion_tokens

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}  # fmt: skip


class CompletionFormat:
    """`/v1/completions`: `text_completion` objects."""

    id_prefix, input_param = "cmpl", "prompt"

    def opening(self, g: Generation) -> dict[str, Any] | None:
        return None  # completions streams start with text

    def chunk(self, g: Generation, chunk: pb.GenerateChunk) -> dict[str, Any]:
        finish = g.finish_reason if chunk.finish_reason else None
        choice = {"index": 0, "text": chunk.text, "logprobs": None, "finish_reason": finish}
        return g.envelope("text_completion", [choice])

    def usage_chunk(self, g: Generation) -> dict[str, Any]:
        return {**g.envelope("text_completion", []), "usage": g.usage()}

    def whole(self, g: Generation) -> dict[str, Any]:
        choice = {"index": 0, "text": g.text, "logprobs": None, "finish_reason": g.finish_reason}
        return {**g.envelope("text_completion", [choice]), "usage": g.usage()}


class ChatFormat:
    """`/v1/chat/completions`: `chat.completion` and `chat.completion.chunk` objects."""

    id_prefix, input_param = "chatcmpl", "messages"

    def __init__(self, logprobs: bool) -> None:
        self.logprobs = logprobs

    def opening(self, g: Generation) -> dict[str, Any] | None:
        delta = {"role": "assistant", "content": ""}  # the first delta announces the role
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
        return g.envelope("chat.completion.chunk", [choice])

    def chunk(self, g: Generation, chunk: pb.GenerateChunk) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "delta": {"content": chunk.text} if chunk.text else {},
            "logprobs": None,
            "finish_reason": g.finish_reason if chunk.finish_reason else None,
        }
        if self.logprobs:
            choice["logprobs"] = {"content": [token_logprob(lp) for lp in chunk.logprobs]}
        return g.envelope("chat.completion.chunk", [choice])

    def usage_chunk(self, g: Generation) -> dict[str, Any]:
        return {**g.envelope("chat.completion.chunk", []), "usage": g.usage()}

    def whole(self, g: Generation) -> dict[str, Any]:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": g.text},
            "logprobs": {"content": g.logprobs} if self.logprobs else None,
            "finish_reason": g.finish_reason,
        }
        return {**g.envelope("chat.completion", [choice]), "usage": g.usage()}


ResponseFormat = CompletionFormat | ChatFormat
