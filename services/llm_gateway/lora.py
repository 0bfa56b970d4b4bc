"""LoRA adapters through the gateway, as vLLM names them: `POST /v1/load_lora_adapter`
{lora_name, lora_path} and `POST /v1/unload_lora_adapter` {lora_name}, admin keys only
(`admin_keys`; with none set, runtime changes are refused). A load or unload goes to every
engine behind the gateway (they serve the same models). `/v1/models` lists the base and
each adapter with its `parent`, and a request's `model` picks one.

An unload answers at once, as vLLM's: requests naming the adapter are refused from then on
(404), and so are those still queued for it, while those running with it finish with it
(the answer says how many); the engine frees its slot when the last one ends.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import grpc
from fastapi import Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from llm_common.proto.v1 import engine_pb2 as pb
from llm_gateway import errors
from llm_gateway.engine_client import EnginePool, NoEngine
from llm_gateway.errors import OpenAIError

ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
_HTTP = {
    grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.ALREADY_EXISTS: 400,
    grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 400,
}  # fmt: skip


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None  # vLLM's; ignored


def adapter_of(name: str, info: pb.ModelInfoResponse) -> str | None:
    """ "" for the base model, the adapter's name for an adapter, None for neither."""
    if name == info.model_id:
        return ""
    return name if any(a.name == name for a in info.lora_adapters) else None


def model_cards(info: pb.ModelInfoResponse) -> list[dict[str, Any]]:
    """The base model's card and one per adapter, with its `parent` (vLLM's shape)."""
    base = {"id": info.model_id, "object": "model", "created": info.created, "owned_by": "llm",
            "root": info.model_id, "parent": None}  # fmt: skip
    return [base] + [
        {**base, "id": a.name, "root": a.path, "parent": info.model_id} for a in info.lora_adapters
    ]


class LoRAAdmin:
    """The two admin routes: check the admin key, run the call on every engine."""

    def __init__(self, engines: EnginePool, admin_keys: list[str]) -> None:
        self.engines = engines
        self._digests = [hashlib.sha256(k.encode()).digest() for k in admin_keys]

    def _authorize(self, request: Request) -> None:
        if not self._digests:
            raise OpenAIError(
                403, "runtime LoRA adapter changes are off: the gateway has no admin_keys",
                type="permission_error", code="admin_only",
            )  # fmt: skip
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not any(
            [hmac.compare_digest(digest, k) for k in self._digests]
        ):
            raise OpenAIError(
                401, "an admin key is required: send it as 'Authorization: Bearer KEY'",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip

    async def load(self, request: Request, body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        self._authorize(request)
        call = pb.LoadLoRAAdapterRequest(lora_name=body.lora_name, lora_path=body.lora_path)
        await self._everywhere("LoadLoRAAdapter", call)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    async def unload(self, request: Request, body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        self._authorize(request)
        answers = await self._everywhere("UnloadLoRAAdapter", pb.UnloadLoRAAdapterRequest(lora_name=body.lora_name))  # fmt: skip
        text = f"Success: LoRA adapter '{body.lora_name}' removed successfully."
        if running := sum(a.running_requests for a in answers):
            text += f" {running} requests running with it finish first; its slot is freed then."
        return PlainTextResponse(text)

    async def _everywhere(self, method: str, call: Any) -> list[Any]:
        try:
            return await self.engines.on_every_engine(method, call)
        except NoEngine as e:
            raise errors.unavailable(str(e)) from None
        except grpc.aio.AioRpcError as e:
            status = _HTTP.get(e.code())
            if status is None:
                raise errors.from_grpc(e, "lora_name") from None
            code = "model_not_found" if status == 404 else "invalid_lora_adapter"
            raise OpenAIError(status, e.details() or "", param="lora_name", code=code) from None
