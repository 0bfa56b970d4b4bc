"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right status.

Bad input is always a 4xx with the offending parameter named; an unexpected failure is a
500 with a generic message (details go to the log, never a stack trace to the client).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

# Engine field paths (validation.py) -> OpenAI parameter names.
_ENGINE_FIELDS = {
    "sampling.temperature": "temperature",
    "sampling.top_p": "top_p",
    "sampling.top_k": "top_k",
    "sampling.min_p": "min_p",
    "sampling.repetition_penalty": "repetition_penalty",
    "sampling.seed": "seed",
    "sampling.presence_penalty": "presence_penalty",
    "sampling.frequency_penalty": "frequency_penalty",
    "sampling.logit_bias": "logit_bias",
    "stopping.max_tokens": "max_tokens",
    "stopping.stop": "stop",
    "stopping.stop_token_ids": "stop_token_ids",
    "stopping.min_tokens": "min_tokens",
    "top_logprobs": "top_logprobs",
    "logprobs": "logprobs",
    "prompt_logprobs": "logprobs",
    "structured_output": "response_format",
    "structured_output.json_schema": "response_format",
    "structured_output.json_object": "response_format",
}
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none", "null"}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """The body of every error response (documented in the OpenAPI schema)."""

    error: ErrorDetail


_DESCRIPTIONS = {
    400: "invalid request (`param` names the field)", 401: "missing or wrong API key",
    404: "unknown model or path", 413: "request body too large",
    429: "engine queue full (see Retry-After)", 503: "no engine ready", 504: "timed out",
}  # fmt: skip
# FastAPI `responses=` for the OpenAI routes.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text} for status, text in _DESCRIPTIONS.items()
}


class OpenAIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.refused = False  # an engine refused it before running it: another may take it
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )
        self.headers = headers

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        # json.dumps escapes to ASCII: a message quoting hostile input (a lone surrogate)
        # still encodes, where JSONResponse's UTF-8 rendering would fail with a 500.
        return Response(
            json.dumps(self.body()), self.status, self.headers, media_type="application/json"
        )


def invalid(param: str | None, message: str, code: str | None = "invalid_value") -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def unavailable(message: str) -> OpenAIError:
    return OpenAIError(503, message, type="service_unavailable", code="engine_unavailable")


# What an engine answers when it does not admit a request (llm_engine.server/scheduler).
REFUSALS = frozenset({"the engine is shutting down", "the model is still loading"})


def from_grpc(error: grpc.aio.AioRpcError, input_param: str, retry_after_s: int = 1) -> OpenAIError:
    """Map an engine status to HTTP; `input_param` names the request's input ("prompt"/"messages")."""
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field = details.split(":", 1)[0]
        param = _ENGINE_FIELDS.get(field) or _ENGINE_FIELDS.get(field.split("[", 1)[0])
        if param is None and field.split(".")[0].split("[")[0] in (
            "input",
            "text",
            "chat",
            "token_ids",
        ):
            param = input_param
        return invalid(param, details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        error = OpenAIError(
            429, details, type="rate_limit_error", code="engine_overloaded",
            headers={"Retry-After": str(retry_after_s)},
        )  # fmt: skip
        error.refused = True  # a full queue: nothing of the request ran there
        return error
    if code == grpc.StatusCode.NOT_FOUND:  # a LoRA adapter unloaded since the gateway looked
        return OpenAIError(404, details, param="model", code="model_not_found")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return OpenAIError(504, "the engine did not answer in time", type="timeout", code="timeout")
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        error = unavailable(f"the engine is unavailable: {details}")
        # Only the engine's own refusals are known to come before it admitted the request;
        # a broken connection may have cut a generation that already ran.
        error.refused = code == grpc.StatusCode.UNAVAILABLE and details in REFUSALS
        return error
    log.error("engine_error", extra={"grpc_code": code.name, "details": details})
    return OpenAIError(500, "the engine failed to process the request", type="server_error", code="engine_error")  # fmt: skip


def _param(loc: tuple) -> str | None:
    """("body", "messages", 0, "content") -> "messages[0].content"; union tags are cut."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and part.lower() not in _TYPE_NAMES:
            out += f".{part}" if out else part
        else:
            break  # pydantic names union members ("list[int]", "function-after[...]")
    return out or None


def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    if first.get("type") == "json_invalid":
        return invalid(None, "the request body is not valid JSON").response()
    param = _param(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid value"))
    if param:
        message = f"{message} (parameter {param!r})"
    return invalid(param, message).response()


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
        exc.status_code
    )
    headers = dict(exc.headers) if exc.headers else None
    return OpenAIError(
        exc.status_code, str(exc.detail), type=kind, code=code, headers=headers
    ).response()


def _openai_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, OpenAIError)
    return exc.response()


def _unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled_error", extra={"path": request.url.path})
    return OpenAIError(
        500, "internal server error", type="server_error", code="internal_error"
    ).response()


def install(app: FastAPI) -> None:
    app.add_exception_handler(OpenAIError, _openai_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
