"""The OpenAI-compatible FastAPI app: `create_app(settings)` builds the handlers once and
routes to them, one line each.

Routes: GET /v1/models, GET /v1/models/{id} (`ServingModels`), POST /v1/completions and
POST /v1/chat/completions (`ServingCompletions`, `ServingChat` in `llm_gateway.serving`;
both with `"stream": true` as server-sent events ending in `data: [DONE]`), POST
/v1/load_lora_adapter and POST /v1/unload_lora_adapter (`llm_gateway.lora`), vLLM's POST
/tokenize and /detokenize (`llm_gateway.tokenization`), GET /healthz (the process is up),
GET /readyz (at least one engine is SERVING) and GET /metrics (Prometheus). The gateway
never touches tensors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llm_gateway import errors
from llm_gateway.dispatch import Dispatcher
from llm_gateway.engine_client import EnginePool
from llm_gateway.errors import ERROR_RESPONSES
from llm_gateway.lora import LoadLoRAAdapterRequest, LoRAAdmin, UnloadLoRAAdapterRequest
from llm_gateway.middleware import ApiKeys, GatewayMiddleware
from llm_gateway.ratelimit import RateLimiter
from llm_gateway.schemas import ChatCompletionRequest, CompletionRequest
from llm_gateway.serving import ServingChat, ServingCompletions, ServingModels
from llm_gateway.settings import GatewaySettings
from llm_gateway.telemetry import Metrics
from llm_gateway.tokenization import DetokenizeRequest, Tokenization, TokenizeRequest

_GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}},
          "description": "the completion, or with `stream: true` server-sent events"},
    **ERROR_RESPONSES,
}  # fmt: skip


def create_app(
    settings: GatewaySettings,
    pool: EnginePool | None = None,
    *,
    tracer_provider: trace.TracerProvider | None = None,
    metrics: Metrics | None = None,
) -> FastAPI:
    """The gateway app. `tracer_provider` defaults to the global one (the CLI installs the
    SDK's); `metrics` to a fresh registry exposed at /metrics."""
    engines = pool or EnginePool(
        settings.engine,
        timeout_s=settings.request_timeout_s,
        model_info_ttl_s=settings.model_info_ttl_s,
        health_retry_s=settings.health_retry_s,
        resolve_interval_s=settings.resolve_interval_s,
        multiplex=settings.multiplex,
        keepalive_s=settings.engine_keepalive_s,
        **settings.engine_security(),
    )
    metrics = metrics or Metrics()
    metrics.watch_pool(engines)
    limiter = RateLimiter.from_settings(settings)
    dispatch = Dispatcher(engines, settings.retry_after_s)
    models = ServingModels(dispatch)
    timeout_s = settings.request_timeout_s
    serving_completions = ServingCompletions(dispatch, models, metrics, timeout_s)
    serving_chat = ServingChat(dispatch, models, metrics, timeout_s)
    tokenization = Tokenization(dispatch, models, timeout_s)
    lora = LoRAAdmin(engines, settings.load_admin_keys())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engines.start()
        yield
        await engines.close()
        await limiter.close()

    # The span, metrics and access log are GatewayMiddleware's: FastAPI's own telemetry
    # would open a second server span and one per dependency, endpoint and serialization
    # (a sixth of the gateway's CPU per request).
    off = {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}
    app = FastAPI(title="llm gateway", version="1", lifespan=lifespan, telemetry=off)
    errors.install(app)
    app.add_middleware(
        GatewayMiddleware,
        metrics=metrics,
        tracer=trace.get_tracer("llm_gateway", tracer_provider=tracer_provider),
        api_keys=ApiKeys(settings.load_key_limits, settings.api_keys_file),
        max_body_bytes=settings.max_body_bytes,
        limiter=limiter,
    )
    app.state.metrics = metrics

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = await engines.ready()
        return JSONResponse(
            {"status": "ready" if ready else "no engine is serving"}, 200 if ready else 503
        )

    if not settings.metrics_port:  # else on a port of its own (llm_gateway.cli)

        @app.get("/metrics", response_class=PlainTextResponse)
        async def prometheus() -> Response:
            return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models() -> dict[str, Any]:
        return await models.listing()

    @app.get("/v1/models/{model_id:path}", responses=ERROR_RESPONSES)
    async def get_model(model_id: str) -> dict[str, Any]:
        return await models.card(model_id)

    @app.post("/v1/completions", responses=_GENERATE_RESPONSES)
    async def completions(request: Request, body: CompletionRequest) -> Any:
        return await serving_completions.create(request, body)

    @app.post("/v1/chat/completions", responses=_GENERATE_RESPONSES)
    async def chat_completions(request: Request, body: ChatCompletionRequest) -> Any:
        return await serving_chat.create(request, body)

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=ERROR_RESPONSES)
    async def load_lora_adapter(request: Request, body: LoadLoRAAdapterRequest) -> Response:
        return await lora.load(request, body)

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=ERROR_RESPONSES)  # fmt: skip
    async def unload_lora_adapter(request: Request, body: UnloadLoRAAdapterRequest) -> Response:
        return await lora.unload(request, body)

    @app.post("/tokenize", responses=ERROR_RESPONSES)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        return await tokenization.tokenize(body)

    @app.post("/detokenize", responses=ERROR_RESPONSES)
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        return await tokenization.detokenize(body)

    return app
