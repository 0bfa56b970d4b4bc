"""Engine settings: defaults < `LLM_ENGINE_*` environment variables < CLI flags."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llm_common.cli import Verbatim

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLM_ENGINE_", extra="ignore")

    checkpoint: str = Field(
        description="run directory (its newest committed checkpoint) or one checkpoint, a"
        " path or s3:// URI; or a Hugging Face model directory"
    )
    adapter: str | None = Field(
        default=None, description="a LoRA adapter directory (PEFT layout) to serve on the base"
    )
    merge_adapter: bool = Field(
        default=True, description="fold --adapter into the weights at load (faster decode)"
    )
    lora: Annotated[list[str], Verbatim] = Field(
        default_factory=list,
        description="a LoRA adapter served beside the base, NAME=PATH (a PEFT directory);"
        " repeatable; a request's model picks one",
    )
    enable_lora: bool = Field(
        default=False,
        description="serve LoRA adapters loaded at run time (implied by --lora)",
    )
    max_loras: int = Field(default=4, ge=1, description="LoRA adapters served at once")
    max_lora_rank: int = Field(default=16, ge=1, description="the highest LoRA rank served")
    host: str = Field(default="127.0.0.1", description="address to bind")
    port: int = Field(default=50051, ge=0, le=65535, description="port to bind; 0 picks a free one")
    model_name: str | None = Field(default=None, description="served model id; default: run name")
    max_queue: int = Field(
        default=64, ge=1, description="waiting requests before RESOURCE_EXHAUSTED"
    )
    slots: int = Field(default=8, ge=1, description="KV-cache slots: requests generating at once")
    max_model_len: int | None = Field(
        default=None, ge=2, description="context served (KV cache per slot); default: the model's"
    )
    kv_cache_gib: float | None = Field(
        default=None, gt=0,
        description="memory for the KV cache, GiB; default: 90% of what is free after loading",
    )  # fmt: skip
    prefill_chunk: int = Field(
        default=512, ge=1, description="prompt tokens prefilled per scheduler step"
    )
    compile: bool = Field(
        default=False,
        description="torch.compile the prefill and decode calls at start (on the CPU it needs"
        " a C++ compiler, else they run eager)",
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="port of the Prometheus /metrics; 0: off"
    )
    auth_token: SecretStr | None = Field(
        default=None,
        description="every Engine RPC must carry it (metadata 'authorization: Bearer TOKEN');"
        " health stays open",
    )
    tls_cert: Path | None = Field(default=None, description="server certificate (PEM): TLS on")
    tls_key: Path | None = Field(default=None, description="its private key (PEM)")
    tls_client_ca: Path | None = Field(
        default=None, description="CA of accepted client certificates: mutual TLS"
    )
    device: str = Field(default="cpu", description="torch device, e.g. cpu or cuda")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="weights' dtype; auto: the checkpoint's (float32 for half-precision"
        " weights on the CPU)",
    )
    threads: int = Field(default=0, ge=0, description="torch intra-op threads; 0: torch's default")
    engine_process: bool = Field(
        default=True,
        description="run the model and scheduler in their own process (no GIL shared with"
        " gRPC); --no-engine-process: in this one",
    )
    log_level: str = Field(default="INFO", description="DEBUG, INFO, WARNING, ...")
    shutdown_grace_s: float = Field(
        default=5.0, ge=0, description="after SIGTERM, how long running requests may finish"
    )

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES.get(self.dtype)

    @property
    def loras(self) -> tuple[tuple[str, str], ...]:
        return tuple(tuple(item.split("=", 1)) for item in self.lora)  # type: ignore[misc]

    @model_validator(mode="after")
    def _lora_names(self) -> EngineSettings:
        names = [item.split("=", 1)[0] for item in self.lora]
        if bad := [item for item in self.lora if "=" not in item or not item.split("=", 1)[0]]:
            raise ValueError(f"lora: {bad} is not NAME=PATH")
        if len(set(names)) != len(names):
            raise ValueError(f"lora: names {names} repeat")
        if len(names) > self.max_loras:
            raise ValueError(f"lora: {len(names)} adapters, more than max_loras={self.max_loras}")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> EngineSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs tls_cert and tls_key")
        return self

    def server_options(self) -> dict[str, Any]:
        """The keyword arguments of `start_engine` these settings give (token, TLS)."""
        from llm_common.security import server_credentials

        tls = None
        if self.tls_cert is not None and self.tls_key is not None:
            tls = server_credentials(self.tls_cert, self.tls_key, self.tls_client_ca)
        token = self.auth_token.get_secret_value() if self.auth_token else None
        return {"token": token or None, "tls": tls}

    def load_options(self) -> dict[str, Any]:
        """The keyword arguments of `RunningEngine.load` these settings give."""
        return dict(
            model_name=self.model_name, device=self.device, dtype=self.torch_dtype,
            adapter=self.adapter, merge_adapter=self.merge_adapter, max_queue=self.max_queue,
            n_slots=self.slots, prefill_chunk=self.prefill_chunk, compile=self.compile,
            max_model_len=self.max_model_len, kv_cache_gib=self.kv_cache_gib,
            engine_process=self.engine_process, threads=self.threads, loras=self.loras,
            enable_lora=self.enable_lora, max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
        )  # fmt: skip
