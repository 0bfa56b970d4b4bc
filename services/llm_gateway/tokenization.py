"""`POST /tokenize` and `POST /detokenize`, in vLLM's shapes, answered by an engine.

    /tokenize   {model?, prompt | messages, add_special_tokens?, add_generation_prompt?}
                -> {count, max_model_len, tokens}
    /detokenize {model?, tokens} -> {prompt}

`model`, when given, must be the served one (404 otherwise). A prompt's ids are those the
engine generates from (no special tokens added) unless `add_special_tokens` is true, which
adds the tokenizer's own (a BOS, say); `messages` are rendered by the chat template, with
the assistant's turn opened unless `add_generation_prompt` is false. `max_model_len` is the
context the engine serves. Detokenized text keeps special tokens, as vLLM's does.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from llm_common.proto.v1 import engine_pb2 as pb
from llm_gateway.dispatch import Dispatcher
from llm_gateway.engine_client import Metadata
from llm_gateway.errors import invalid
from llm_gateway.schemas import ChatMessage, Text, TokenId
from llm_gateway.serving import ServingModels
from llm_gateway.telemetry import trace_metadata

_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest and TokenizeChatRequest in one: `prompt` or
    `messages`."""

    model_config = _STRICT

    model: Text | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = False
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = _STRICT

    model: Text | None = None
    tokens: Annotated[list[TokenId], Field(fail_fast=True)]


class Tokenization:
    """The two handlers: each asks the least busy healthy engine, with the request's trace
    context and deadline."""

    def __init__(self, dispatch: Dispatcher, models: ServingModels, timeout_s: float) -> None:
        self.dispatch, self.models, self.timeout_s = dispatch, models, timeout_s

    async def _info(self, model: str | None, metadata: Metadata) -> pb.ModelInfoResponse:
        if model is None:
            return await self.dispatch.model_info(metadata)
        return await self.models.check(model, metadata)

    async def tokenize(self, body: TokenizeRequest) -> dict[str, Any]:
        if (body.prompt is None) == (body.messages is None):
            raise invalid("prompt", "give either prompt or messages")
        metadata = trace_metadata()
        info = await self._info(body.model, metadata)
        request = pb.TokenizeRequest(
            add_special_tokens=body.add_special_tokens,
            add_generation_prompt=body.add_generation_prompt,
        )
        if body.messages is not None:
            request.chat.messages.extend(
                pb.ChatMessage(role=m.role, content=m.text()) for m in body.messages
            )
            param = "messages"
        else:
            request.text = body.prompt or ""
            param = "prompt"
        tokens = await self.dispatch.tokenize(request, metadata, self.timeout_s, param)
        return {"count": len(tokens), "max_model_len": info.context_length, "tokens": tokens}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        metadata = trace_metadata()
        await self._info(body.model, metadata)
        request = pb.DetokenizeRequest(token_ids=body.tokens)
        answer = await self.dispatch.unary(
            "Detokenize", request, metadata, self.timeout_s, "tokens"
        )
        return {"prompt": answer.text}
