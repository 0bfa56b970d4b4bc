"""Gateway settings: defaults < `LLM_GATEWAY_*` environment variables < CLI flags."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLM_GATEWAY_", extra="ignore")

    engine: str = Field(
        default="127.0.0.1:50051",
        description="engine gRPC target: host:port, or dns:///svc:port for round robin",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535, description="0 picks a free port")
    api_keys: list[str] = Field(
        default_factory=list, description="accepted Bearer keys (JSON list); empty: no auth"
    )
    request_timeout_s: float = Field(default=600.0, gt=0, description="gRPC deadline per request")
    model_info_ttl_s: float = Field(default=10.0, ge=0, description="how long ModelInfo is cached")
    log_level: str = "INFO"
