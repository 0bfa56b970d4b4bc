"""Gateway settings: defaults < `LLM_GATEWAY_*` environment variables < CLI flags.

API keys come from `LLM_GATEWAY_API_KEYS` (comma-separated, or a JSON list as the Helm
chart's Secret holds) and/or a mounted secret file `LLM_GATEWAY_API_KEYS_FILE` (one key
per line, or a JSON list). They are `SecretStr`s, so a settings repr or a validation error
never prints them. A key may carry its own rate limits: `KEY rpm=60 tpm=100000` as an
entry, or `{"key": KEY, "rpm": 60, "tpm": 100000}` in a JSON list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LOOPBACK = "127.0.0.1"
_LIMITS = ("rpm", "tpm")


@dataclass(frozen=True)
class KeyLimits:
    """A key's own limits per minute: None takes the gateway's default, 0 is unlimited."""

    rpm: int | None = None  # requests
    tpm: int | None = None  # tokens (prompt + max_tokens up front, settled with usage)


class ApiKey(BaseModel):
    """One accepted key and its own limits."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    key: SecretStr = Field(min_length=1)
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)

    @property
    def limits(self) -> KeyLimits:
        return KeyLimits(self.rpm, self.tpm)


def parse_keys(raw: str) -> list[dict[str, Any]]:
    """Key entries `{"key", "rpm"?, "tpm"?}` from `k1,k2`, one entry per line, or a JSON list
    `["k1", {"key": "k2", "rpm": 60}]`; a text entry is `KEY [rpm=N] [tpm=N]`. Blanks are
    dropped. Messages name the entry's position, never a key."""
    raw = raw.strip()
    if raw.startswith("["):
        try:
            values = json.loads(raw)
        except ValueError:
            raise ValueError("API keys: not a valid JSON list") from None
        if not isinstance(values, list) or not all(isinstance(v, (str, dict)) for v in values):
            raise ValueError("API keys: a JSON list must hold strings or {key, rpm, tpm} objects")
        entries = [v if isinstance(v, dict) else {"key": v.strip()} for v in values]
        return [e for e in entries if e.get("key") != ""]
    entries = []
    for i, text in enumerate(t for t in raw.replace("\n", ",").split(",") if t.strip()):
        key, *options = text.split()
        entry: dict[str, Any] = {"key": key}
        for option in options:
            name, _, value = option.partition("=")
            if name not in _LIMITS or not value.isdigit():
                raise ValueError(f"API keys: entry {i + 1}: options are rpm=N and tpm=N")
            entry[name] = int(value)
        entries.append(entry)
    return entries


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LLM_GATEWAY_", extra="ignore",
        cli_shortcuts={"api-keys": "api-key", "admin-keys": "admin-key"},  # one key a flag
    )  # fmt: skip

    engine: Annotated[list[str], NoDecode] = Field(
        default=["127.0.0.1:50051"],
        min_length=1,
        description="engine gRPC targets, comma-separated or repeated: host:port, or "
        "dns:///name:port for every address a name resolves to (a headless Service)",
    )
    host: str | None = Field(
        default=None, description=f"address to bind; unset: {LOOPBACK} (set it to expose)"
    )
    port: int = Field(default=8000, ge=0, le=65535, description="port to bind; 0 picks a free one")
    api_keys: Annotated[list[ApiKey], NoDecode] = Field(
        default_factory=list,
        description="accepted Bearer keys, comma-separated or a JSON list, each may set rpm=,"
        " tpm=; repeatable; prefer the variable or --api-keys-file (a flag shows in the"
        " process list); none (and no file): no auth",
    )
    admin_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="Bearer keys of the admin routes (runtime LoRA adapter loads), comma-"
        "separated; repeatable; none: those routes are off",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="file with more accepted keys, one per line or a JSON list (a mounted"
        " Secret, re-read when it changes)",
    )
    allow_unauthenticated: bool = Field(
        default=False,
        description="serve a non-loopback address with no API key (refused otherwise)",
    )
    max_body_bytes: int = Field(
        default=4 << 20, ge=1024, description="larger request bodies are refused with 413"
    )
    request_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="deadline of one request, seconds, queueing included (504 when passed)",
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0,
        description="a connection that has not sent a request's headers this long after it "
        "opened (or after its last response) is closed",
    )  # fmt: skip
    body_timeout_s: float = Field(
        default=30.0, gt=0, description="a request body not received whole this long after "
        "its headers closes the connection",
    )  # fmt: skip
    max_connections: int = Field(
        default=2048, ge=1,
        description="open connections and requests at once; beyond it new requests get 503",
    )  # fmt: skip
    model_info_ttl_s: float = Field(default=10.0, ge=0, description="how long ModelInfo is cached")
    metrics_port: int = Field(
        default=9091, ge=0, le=65535,
        description="Prometheus /metrics on this port of its own, off the public API port"
        " (0: on the API port, for local use)",
    )  # fmt: skip
    engine_token: SecretStr | None = Field(
        default=None, description="the engines' token (their LLM_ENGINE_AUTH_TOKEN)"
    )
    engine_tls_ca: Path | None = Field(
        default=None, description="CA of the engines' certificates (PEM): TLS to engines"
    )
    engine_tls_cert: Path | None = Field(
        default=None, description="this gateway's client certificate (PEM), for mutual TLS"
    )
    engine_tls_key: Path | None = Field(default=None, description="its private key (PEM)")
    engine_keepalive_s: float = Field(
        default=10.0, ge=1,
        description="ping each engine connection this often; one that does not answer in 3 s"
        " is marked down (a vanished node is noticed in seconds, not at a deadline)",
    )  # fmt: skip
    shutdown_grace_s: float = Field(
        default=10.0, ge=0,
        description="after SIGTERM, how long requests in flight may finish (keep it under"
        " the pod's terminationGracePeriodSeconds)",
    )  # fmt: skip
    health_retry_s: float = Field(
        default=1.0, gt=0, description="wait before re-watching an engine's health"
    )
    resolve_interval_s: float = Field(
        default=10.0, gt=0, description="how often dns:/// targets are resolved again"
    )
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After of a 429")
    rate_limit_rpm: int | None = Field(
        default=None, ge=1,
        description="requests per minute per API key (one bucket without keys), unless a key "
        "sets its own; unset: unlimited",
    )  # fmt: skip
    rate_limit_tpm: int | None = Field(
        default=None, ge=1,
        description="tokens per minute per API key: prompt + max_tokens held when a request "
        "starts, settled with its usage when it ends; unset: unlimited",
    )  # fmt: skip
    rate_limit_redis_url: SecretStr | None = Field(
        default=None,
        description="redis:// (or rediss://, unix://) URL where every gateway replica counts "
        "the limits; unset: each replica counts alone, in memory",
    )  # fmt: skip
    multiplex: bool = Field(
        default=True,
        description="one GenerateMany stream per engine for all generations (one message per"
        " engine step); off: a Generate call per generation",
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ...")

    @field_validator("engine", "admin_keys", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [t.strip() for t in value.split(",") if t.strip()]
        return value

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_keys(value)
        if isinstance(value, list):  # keys given in code
            return [{"key": v} if isinstance(v, str) else v for v in value]
        return value

    def load_admin_keys(self) -> list[str]:
        return [k.get_secret_value() for k in self.admin_keys]

    @field_validator("rate_limit_redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @property
    def bind_host(self) -> str:
        return self.host or LOOPBACK

    def engine_security(self) -> dict[str, Any]:
        """The `EnginePool` keyword arguments for the engines' token and TLS."""
        from llm_common.security import channel_credentials

        tls = None
        if self.engine_tls_ca is not None:
            tls = channel_credentials(self.engine_tls_ca, self.engine_tls_cert, self.engine_tls_key)
        token = self.engine_token.get_secret_value() if self.engine_token else None
        return {"token": token or None, "tls": tls}

    def load_api_keys(self) -> list[str]:
        """Keys from the environment/flags and from `api_keys_file`, without duplicates."""
        return list(self.load_key_limits())

    def load_key_limits(self) -> dict[str, KeyLimits]:
        """Each key (environment/flags first, then `api_keys_file`) and its own limits; a
        key listed twice takes the limits of its last listing."""
        entries = list(self.api_keys)
        if self.api_keys_file is not None:
            raw = parse_keys(self.api_keys_file.read_text())
            try:
                entries += [ApiKey.model_validate(e) for e in raw]
            except ValueError as e:  # pydantic's message names the field, not the key
                raise ValueError(f"API keys file: {_first_error(e)}") from None
        keys: dict[str, KeyLimits] = {}
        for entry in entries:
            keys[entry.key.get_secret_value()] = entry.limits
        return keys


def _first_error(error: ValueError) -> str:
    errors = getattr(error, "errors", None)
    if errors is None:
        return str(error)
    first = errors()[0]
    return f"{'.'.join(map(str, first['loc'])) or 'entry'}: {first['msg']}"
