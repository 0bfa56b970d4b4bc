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

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import grpc
from pydantic import BaseModel, ConfigDict, Field

from llm_common.proto.v1 import engine_pb2 as pb
from llm_gateway import errors
from llm_gateway.engine_client import EnginePool, Metadata, NoEngine
from llm_gateway.errors import OpenAIError, invalid
from llm_gateway.schemas import ChatMessage, Text, TokenId
from llm_gateway.telemetry import trace_metadata

_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
CheckModel = Callable[[str, Metadata], Awaitable[pb.ModelInfoResponse]]
ModelInfo = Callable[[Metadata], Awaitable[pb.ModelInfoResponse]]


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

    def __init__(
        self, engines: EnginePool, check_model: CheckModel, model_info: ModelInfo,
        timeout_s: float, retry_after_s: int,
    ) -> None:  # fmt: skip
        self.engines, self.check_model, self.model_info = engines, check_model, model_info
        self.timeout_s, self.retry_after_s = timeout_s, retry_after_s

    async def _info(self, model: str | None, metadata: Metadata) -> pb.ModelInfoResponse:
        if model is None:
            return await self.model_info(metadata)
        return await self.check_model(model, metadata)

    async def _call(self, method: str, request: Any, metadata: Metadata, param: str) -> Any:
        try:
            ep = (await self.engines.candidates())[0]
            return await getattr(ep.stub, method)(
                request, timeout=self.timeout_s, metadata=metadata
            )
        except NoEngine as e:
            raise errors.unavailable(str(e)) from None
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:  # an engine older than the RPC
                raise OpenAIError(
                    501, f"the engine does not implement {method}: upgrade it",
                    type="server_error", code="not_implemented",
                ) from None  # fmt: skip
            raise errors.from_grpc(e, param, self.retry_after_s) from None

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
        answer = await self._call("Tokenize", request, metadata, param)
        tokens = list(answer.token_ids)
        return {"count": len(tokens), "max_model_len": info.context_length, "tokens": tokens}

    async def detokenize(self, body: DetokenizeRequest) -> dict[str, Any]:
        metadata = trace_metadata()
        await self._info(body.model, metadata)
        request = pb.DetokenizeRequest(token_ids=body.tokens)
        answer = await self._call("Detokenize", request, metadata, "tokens")
        return {"prompt": answer.text}
