"""OpenAI request models (the subset we serve) and their mapping to `GenerateRequest`.

Parameters the engine cannot honour yet are declared so they are refused with a 400
naming them, instead of being silently ignored; unknown extra fields are ignored, as
OpenAI does. Types are strict (`"5"` is not an integer, `1` is not a boolean: 400), numbers
are bounded to what the engine's proto fields hold, and text must be encodable as UTF-8 (a
JSON `"\\ud800"` is valid JSON but no string protobuf can carry).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from llm_engine.proto.v1 import engine_pb2 as pb
from llm_gateway.errors import invalid

_U64 = (1 << 64) - 1
_I32 = (1 << 31) - 1  # proto int32 fields: max_tokens, token ids
_STRICT = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


def _utf8(value: str) -> str:
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError("must be valid UTF-8 text (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(_utf8)]
TokenId = Annotated[int, Field(ge=0, le=_I32)]
MaxTokens = Annotated[int | None, Field(ge=1, le=_I32)]


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class _Request(BaseModel):
    model_config = _STRICT

    model: Text = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: Text | None = None

    def check_supported(self) -> None:
        if (self.n or 1) > 1:
            raise invalid("n", "only n=1 is supported", code="unsupported_value")
        if self.logit_bias:
            raise invalid("logit_bias", "logit_bias is not supported", code="unsupported_value")
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        for s in stops:
            if not s:
                raise invalid("stop", "stop strings must not be empty")

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _fill(self, request: pb.GenerateRequest, max_tokens: int | None, request_id: str) -> None:
        request.request_id = request_id
        s = request.sampling
        s.temperature = 1.0 if self.temperature is None else self.temperature
        s.top_p = 1.0 if self.top_p is None else self.top_p
        s.presence_penalty = self.presence_penalty or 0.0
        s.frequency_penalty = self.frequency_penalty or 0.0
        if self.seed is not None:
            s.seed = self.seed & _U64  # OpenAI seeds are signed int64, the engine's uint64
        if max_tokens:  # unset: up to the context length
            request.stopping.max_tokens = max_tokens
        request.stopping.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop or [])


class CompletionRequest(_Request):
    prompt: Text | list[Text] | list[TokenId] | list[list[TokenId]]
    max_tokens: MaxTokens = 16
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    best_of: int | None = Field(default=None, ge=1)
    suffix: Text | None = None

    def check_supported(self) -> None:
        super().check_supported()
        for name, unsupported in (
            ("echo", self.echo),
            ("logprobs", self.logprobs is not None),
            ("best_of", (self.best_of or 1) > 1),
            ("suffix", bool(self.suffix)),  # "" appends nothing: harmless
        ):
            if unsupported:
                raise invalid(name, f"{name} is not supported", code="unsupported_value")

    def to_engine(self, request_id: str) -> pb.GenerateRequest:
        request = pb.GenerateRequest()
        prompt: Any = self.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise invalid("prompt", "only one prompt per request is supported", code="unsupported_value")  # fmt: skip
            prompt = prompt[0]
        if isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt)
        self._fill(request, self.max_tokens, request_id)
        return request


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ResponseFormatSpec(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["text", "json_object", "json_schema"]


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens = None
    max_completion_tokens: MaxTokens = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    response_format: ResponseFormatSpec | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs:
            raise invalid("top_logprobs", "top_logprobs is not supported", code="unsupported_value")
        if self.tools:
            raise invalid("tools", "tools are not supported", code="unsupported_value")
        kind = self.response_format.type if self.response_format else "text"
        if kind != "text":
            raise invalid(
                "response_format",
                f"response_format type {kind!r} is not supported: this server has no "
                'constrained (JSON) decoding yet; omit response_format or use {"type": "text"}',
                code="unsupported_value",
            )

    def to_engine(self, request_id: str) -> pb.GenerateRequest:
        request = pb.GenerateRequest(logprobs=self.logprobs)
        request.chat.messages.extend(
            pb.ChatMessage(role=m.role, content=m.text()) for m in self.messages
        )
        self._fill(request, self.max_completion_tokens or self.max_tokens, request_id)
        return request
