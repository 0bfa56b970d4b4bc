"""OpenAI request models (the subset we serve) and their mapping to `GenerateRequest`s.

A request becomes one engine call per choice: `n` per prompt, choice `i` of a prompt seeded
`seed + i`, choices indexed prompt by prompt as OpenAI does. Parameters the engine cannot
honour yet are declared so they are refused with a 400 naming them, instead of being
silently ignored; unknown extra fields are ignored, as OpenAI does, except vLLM's sampling
extras, which benchmark clients and the OpenAI SDK's `extra_body` send: `top_k`, `min_p`,
`repetition_penalty`, `ignore_eos`, `min_tokens`, `stop_token_ids`,
`include_stop_str_in_output` and `skip_special_tokens`, with vLLM's meaning. Types are
strict (`"5"` is not an integer, `1` is not a boolean: 400), numbers
are bounded to what the engine's proto fields hold, and text must be encodable as UTF-8 (a
JSON `"\\ud800"` is valid JSON but no string protobuf can carry).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)

from llm_common.proto import MAX_MESSAGE_BYTES, MAX_STOP_CHARS
from llm_common.proto.v1 import engine_pb2 as pb
from llm_gateway.errors import OpenAIError, invalid

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
MAX_LOGIT_BIAS_ENTRIES = 1024


def _logit_bias(bias: dict[str, float]) -> dict[str, float]:
    """OpenAI's `logit_bias`: token ids (JSON keys, so strings) -> bias in [-100, 100]."""
    if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
        raise ValueError(f"at most {MAX_LOGIT_BIAS_ENTRIES} tokens may be biased")
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and int(key) <= _I32):
            raise ValueError(f"keys must be token ids (decimal integers), got {key!r}")
        if not -100 <= value <= 100:
            raise ValueError(f"the bias of token {key} must be in [-100, 100], got {value}")
    return bias


LogitBias = Annotated[dict[str, float], AfterValidator(_logit_bias)]
StopText = Annotated[Text, Field(max_length=MAX_STOP_CHARS)]
# By shape, failing at the first bad item: pydantic's smart union validates the value
# against every member and keeps an error per item of each: hundreds of MiB and seconds of
# the event loop for a prompt of millions of tokens.
_Ids = Annotated[list[TokenId], Field(fail_fast=True)]
_PROMPT_SHAPES = {
    str: TypeAdapter(Text),
    "texts": TypeAdapter(Annotated[list[Text], Field(fail_fast=True)]),
    "ids": TypeAdapter(_Ids),
    "lists": TypeAdapter(Annotated[list[_Ids], Field(fail_fast=True)]),
}


def _prompt(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    if isinstance(value, str):
        shape: Any = str
    elif isinstance(value, list) and value:
        first = value[0]
        shape = "texts" if isinstance(first, str) else "lists" if isinstance(first, list) else "ids"
    else:
        return handler(value)  # small: the union's own errors
    try:
        return _PROMPT_SHAPES[shape].validate_python(value, strict=True)
    except ValidationError as e:
        error = e.errors(include_url=False)[0]
        where = "".join(f"[{p}]" for p in error["loc"])
        raise ValueError(f"prompt{where}: {error['msg']}") from None


PromptField = Annotated[
    Text | list[Text] | list[TokenId] | list[list[TokenId]], WrapValidator(_prompt)
]
MaxTokens = Annotated[int | None, Field(ge=1, le=_I32)]
# Choices per prompt; also the most engine calls one request has in flight at once, so
# a stream (whose choices all run at once) has at most MAX_N choices in all.
MAX_N = 16
MAX_CHOICES = 256  # prompts x n, without streaming
MAX_BEST_OF = 20  # OpenAI's limit
Prompt = str | list[int]


@dataclass(frozen=True)
class EngineCall:
    """One choice of a request: its OpenAI index, its prompt and the engine request."""

    index: int
    prompt_index: int
    prompt: Prompt | None  # completions only: the text or token ids as sent
    request: pb.GenerateRequest


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """`response_format.json_schema`: OpenAI's structured outputs. The schema is always
    enforced (`strict` or not); a schema left out allows any JSON value."""

    model_config = _STRICT

    name: Text = Field(min_length=1, max_length=64)
    description: Text | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatSpec(BaseModel):
    model_config = _STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def structured_output(self) -> pb.StructuredOutput | None:
        if self.type == "json_object":
            return pb.StructuredOutput(json_object=True)
        if self.type == "json_schema":
            if self.json_schema is None:
                raise invalid("response_format", 'type "json_schema" needs a json_schema')
            schema = self.json_schema.json_schema
            return pb.StructuredOutput(json_schema=json.dumps({} if schema is None else schema))
        return None


class _OpenAIRequest(BaseModel):
    model_config = _STRICT

    model: Text = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: LogitBias | None = None
    user: Text | None = None
    # vLLM's extras (the OpenAI SDK sends them via extra_body); -1 is vLLM's "no top-k".
    top_k: int | None = Field(default=None, ge=-1, le=_I32)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=100)
    ignore_eos: bool = False  # EOS (and the chat end-of-turn token) does not stop
    min_tokens: int | None = Field(default=None, ge=0, le=_I32)
    stop_token_ids: Annotated[list[TokenId], Field(max_length=64)] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    response_format: ResponseFormatSpec | None = None

    def check_supported(self) -> None:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        for s in stops:
            if not s:
                raise invalid("stop", "stop strings must not be empty")
        limit = self._max_tokens()
        if self.min_tokens and limit is not None and self.min_tokens > limit:
            raise invalid("min_tokens", f"must be <= max_tokens ({limit}), got {self.min_tokens}")

    def _max_tokens(self) -> int | None:
        raise NotImplementedError

    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _fill(
        self, request: pb.GenerateRequest, max_tokens: int | None, request_id: str, k: int,
        defaults: pb.GenerationDefaults,
    ) -> None:  # fmt: skip
        """Sampling and stopping of the `k`-th choice of a prompt. A sampling field the
        request leaves out takes the model's default (its generation_config.json), else
        OpenAI's."""
        request.request_id = request_id
        request.whole = not self.stream  # one engine message per choice, not one per token
        s = request.sampling

        def pick(field: str, fallback: float) -> float:
            value = getattr(self, field)
            if value is not None:
                return value
            return getattr(defaults, field) if defaults.HasField(field) else fallback

        s.temperature = pick("temperature", 1.0)
        s.top_p = pick("top_p", 1.0)
        s.presence_penalty = self.presence_penalty or 0.0
        s.frequency_penalty = self.frequency_penalty or 0.0
        s.top_k = max(int(pick("top_k", 0)), 0)
        s.min_p = pick("min_p", 0.0)
        s.repetition_penalty = pick("repetition_penalty", 0.0)  # 0: unset (1)
        if self.seed is not None:
            # OpenAI seeds are signed int64, the engine's uint64; choice k samples with
            # seed + k, so the n choices differ and each reproduces.
            s.seed = (self.seed + k) & _U64
        if max_tokens is not None:  # unset: up to the context length
            request.stopping.max_tokens = max_tokens
        stopping = request.stopping
        stopping.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop or [])
        stopping.stop_token_ids.extend(self.stop_token_ids or [])
        stopping.ignore_eos = self.ignore_eos
        stopping.min_tokens = self.min_tokens or 0
        stopping.include_stop_str_in_output = self.include_stop_str_in_output
        if not self.skip_special_tokens:
            request.skip_special_tokens = False
        for token, bias in (self.logit_bias or {}).items():
            s.logit_bias[int(token)] = bias
        structured = self.response_format and self.response_format.structured_output()
        if structured:
            request.structured_output.CopyFrom(structured)

    def _texts(self) -> tuple[str, list[str]]:
        """The request's input texts and the parameter that names them."""
        raise NotImplementedError

    def _check_text_length(self, context_length: int, max_token_bytes: int) -> None:
        """A text of B bytes is at least B / max_token_bytes tokens: one far over the context
        (twice the bound, for normalizers that shrink text) is refused here, before n
        copies of it are built and each tokenized by an engine."""
        if not (context_length and max_token_bytes):
            return
        param, texts = self._texts()
        limit = 2 * max_token_bytes * context_length
        for text in texts:
            size = len(text.encode())
            if size > limit:
                raise invalid(
                    param,
                    f"the input is {size} bytes, at least {size // max_token_bytes} tokens; "
                    f"the model's context length is {context_length}",
                    code="context_length_exceeded",
                )

    def _inputs(self) -> list[Any]:
        """The prompts, one per group of `n` choices (chat: one conversation, None)."""
        raise NotImplementedError

    def _tokenize_request(self, prompt: Any) -> pb.TokenizeRequest | None:
        """What an engine tokenizes `prompt` from; None: it is token ids already."""
        raise NotImplementedError

    def check_size(self, info: pb.ModelInfoResponse) -> None:
        """The cheap checks, before anything is built or tokenized: the number of choices,
        token-id prompts against the model's context, and texts far over it."""
        n, prompts, context_length = self.n or 1, self._inputs(), info.context_length
        limit = MAX_N if self.stream else MAX_CHOICES
        if len(prompts) * n > limit:
            param = "n" if len(prompts) == 1 else "prompt"
            how = "a stream carries" if self.stream else "a request has"
            raise invalid(param, f"{how} at most {limit} choices (prompts x n)")
        for prompt in prompts:
            if isinstance(prompt, list):
                self._check_context(len(prompt), context_length)
        self._check_text_length(context_length, info.max_token_bytes)

    def _check_context(self, n_tokens: int, context_length: int) -> None:
        if context_length and n_tokens >= context_length:
            param, _ = self._texts()
            raise invalid(
                param,
                f"the prompt has {n_tokens} tokens; the model's context length is "
                f"{context_length}, and at least one new token must fit",
                code="context_length_exceeded",
            )

    def shared_inputs(self) -> list[pb.TokenizeRequest | None]:
        """With `n` > 1, what an engine tokenizes once per prompt, so that the prompt's
        choices carry its token ids instead of each carrying (and an engine tokenizing) the
        text again; empty with one choice per prompt."""
        if (self.n or 1) == 1:
            return []
        return [self._tokenize_request(p) for p in self._inputs()]

    def engine_calls(
        self, request_id: str, info: pb.ModelInfoResponse | None = None,
        encoded: list[list[int] | None] | None = None,
    ) -> list[EngineCall]:  # fmt: skip
        """`n` calls per prompt. A lone call keeps the request's id; several are told apart
        by their index. `encoded`: a prompt's token ids as an engine tokenized them (the
        `shared_inputs`), which its choices send in place of the text.

        A message larger than the engine accepts is refused here, so it never reaches the
        stream that other requests share."""
        info = info or pb.ModelInfoResponse()
        self.check_size(info)
        n, prompts = self.n or 1, self._inputs()
        encoded = encoded or [None] * len(prompts)
        for ids in encoded:
            if ids is not None:
                if not ids:
                    raise invalid(self._texts()[0], "the input encodes to no tokens")
                self._check_context(len(ids), info.context_length)
        calls = []
        for p, (prompt, ids) in enumerate(zip(prompts, encoded, strict=True)):
            for k in range(n):
                i = p * n + k
                rid = request_id if len(prompts) * n == 1 else f"{request_id}-{i}"
                request = self._build(prompt, ids)
                self._fill(request, self._max_tokens(), rid, k, info.generation_defaults)
                if request.ByteSize() > MAX_MESSAGE_BYTES - (64 << 10):  # room for framing
                    raise OpenAIError(
                        413, f"the request is larger than an engine accepts ({MAX_MESSAGE_BYTES} "
                        "bytes per generation)", code="request_too_large",
                    )  # fmt: skip
                calls.append(EngineCall(i, p, prompt, request))
        return calls

    def _build(self, prompt: Any, ids: list[int] | None) -> pb.GenerateRequest:
        """One choice's engine request for `prompt` (as `ids`, when given), before `_fill`."""
        raise NotImplementedError


class CompletionRequest(_OpenAIRequest):
    prompt: PromptField
    # 0 only with echo: score the prompt without generating (evaluation harnesses).
    max_tokens: Annotated[int | None, Field(ge=0, le=_I32)] = 16
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=5)
    # Candidates per prompt, of which the n most likely are returned (llm_gateway.best_of).
    best_of: int | None = Field(default=None, ge=1, le=MAX_BEST_OF)
    suffix: Text | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.max_tokens == 0 and not self.echo:
            raise invalid("max_tokens", "max_tokens=0 generates nothing: use it with echo")
        n, best_of = self.n or 1, self.best_of
        if best_of is not None and best_of < n:
            raise invalid("best_of", f"best_of ({best_of}) must be at least n ({n})")
        if best_of is not None and best_of > 1 and self.stream:
            raise invalid(
                "best_of", "best_of cannot be streamed: the best choices are known only once "
                "every candidate has finished", code="unsupported_value",
            )  # fmt: skip
        if self.suffix:  # "" appends nothing: harmless
            raise invalid(
                "suffix", "suffix is not supported: this server has no fill-in-the-middle "
                "(insertion) mode; send the text before the insertion point as the prompt",
                code="unsupported_value",
            )  # fmt: skip

    def _texts(self) -> tuple[str, list[str]]:
        return "prompt", [p for p in self.prompts() if isinstance(p, str)]

    def prompts(self) -> list[Prompt]:
        """The prompts, one per choice group: a string, token ids, or a list of either."""
        prompt: Any = self.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            return [prompt]
        if not prompt:
            raise invalid("prompt", "must not be empty")
        return list(prompt)

    def _inputs(self) -> list[Any]:
        return self.prompts()

    def _tokenize_request(self, prompt: Any) -> pb.TokenizeRequest | None:
        return pb.TokenizeRequest(text=prompt) if isinstance(prompt, str) else None

    def _build(self, prompt: Any, ids: list[int] | None) -> pb.GenerateRequest:
        request = pb.GenerateRequest()
        if ids is None and isinstance(prompt, str):
            request.text = prompt
        else:
            request.token_ids.ids.extend(prompt if ids is None else ids)
        if self.logprobs is not None:
            request.logprobs = True
            request.top_logprobs = self.logprobs
        # Echo needs the prompt's token strings: to score them, or to show token ids.
        if self.echo and (self.logprobs is not None or not isinstance(prompt, str)):
            request.prompt_logprobs = self.logprobs or 0
        return request

    def _max_tokens(self) -> int | None:
        return self.max_tokens


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: Text


class FunctionCall(BaseModel):
    model_config = _STRICT

    name: Text = Field(min_length=1)
    arguments: Text  # a JSON object, as text


class ToolCall(BaseModel):
    model_config = _STRICT

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class Function(BaseModel):
    model_config = _STRICT

    name: Text = Field(min_length=1, max_length=64)
    description: Text | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; enforced when a call is forced
    strict: bool | None = None


class Tool(BaseModel):
    model_config = _STRICT

    type: Literal["function"]
    function: Function


class NamedFunction(BaseModel):
    model_config = _STRICT

    name: Text


class NamedToolChoice(BaseModel):
    model_config = _STRICT

    type: Literal["function"]
    function: NamedFunction


class ChatMessage(BaseModel):
    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool's answer to that call

    def proto(self) -> pb.ChatMessage:
        calls = [
            pb.ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
            for c in self.tool_calls or []
        ]
        return pb.ChatMessage(
            role=self.role, content=self.text(), tool_calls=calls,
            tool_call_id=self.tool_call_id or "",
        )  # fmt: skip

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: MaxTokens = None
    max_completion_tokens: MaxTokens = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise invalid("top_logprobs", "top_logprobs requires logprobs to be true")
        choice = self.tool_choice
        names = [t.function.name for t in self.tools or []]
        if choice not in (None, "none", "auto") and not names:
            raise invalid("tool_choice", "tool_choice needs tools")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise invalid("tool_choice", f"{choice.function.name!r} is not one of the tools")
        fmt = self.response_format.type if self.response_format else "text"
        if self.forced_calls() is not None and fmt != "text":
            raise invalid("response_format", "response_format excludes a forced tool call")

    def parses_tool_calls(self) -> bool:
        """The answer's tool calls come back as `tool_calls`."""
        return bool(self.tools) and self.tool_choice != "none"

    def forced_calls(self) -> pb.ToolCallConstraint | None:
        """`required` or a named function: the engine's grammar writes only calls."""
        if not self.tools or self.tool_choice in (None, "none", "auto"):
            return None
        names = [] if self.tool_choice == "required" else [self.tool_choice.function.name]
        return pb.ToolCallConstraint(names=names, parallel=self.parallel_tool_calls)

    def _texts(self) -> tuple[str, list[str]]:
        return "messages", ["".join(m.text() for m in self.messages)]

    def _inputs(self) -> list[Any]:
        return [None]  # the conversation is the one prompt

    def _chat(self) -> pb.ChatMessages:
        tools = [json.dumps(t.model_dump(exclude_none=True)) for t in self.tools or []]
        return pb.ChatMessages(messages=[m.proto() for m in self.messages], tools=tools)

    def _tokenize_request(self, prompt: Any) -> pb.TokenizeRequest | None:
        return pb.TokenizeRequest(chat=self._chat(), add_generation_prompt=True)

    def _build(self, prompt: Any, ids: list[int] | None) -> pb.GenerateRequest:
        request = pb.GenerateRequest(logprobs=self.logprobs)
        if self.logprobs:
            request.top_logprobs = self.top_logprobs or 0
        if ids is None:
            request.chat.CopyFrom(self._chat())
        else:
            request.token_ids.ids.extend(ids)
        forced = self.forced_calls()
        if forced is not None:  # needs the chat's tools: never sent as token ids
            request.ClearField("token_ids")
            request.chat.CopyFrom(self._chat())
            request.structured_output.tool_calls.CopyFrom(forced)
        return request

    def _max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens
