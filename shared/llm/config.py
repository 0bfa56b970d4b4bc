"""ModelConfig: every architectural choice as an explicit, validated field.

Only `DecoderModel` reads this; leaf modules take plain numbers (STYLE.md 1-3).
Derived sizes (`head_dim`, `n_kv_heads`, `hidden_dim`) are filled in once here and
contradictions raise with the field named, never silently overwritten.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ModelConfig(BaseModel):
    """Architecture of a decoder-only transformer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(gt=0)
    dim: int = Field(gt=0, description="residual stream width")
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int | None = Field(default=None, gt=0, description="defaults to n_heads (MHA)")
    head_dim: int | None = Field(default=None, gt=0, description="defaults to dim // n_heads")
    hidden_dim: int | None = Field(default=None, gt=0, description="MLP width; derived if unset")
    max_seq_len: int = Field(default=2048, gt=0)

    attn_impl: str = "mha"
    mlp_impl: str = "swiglu"
    norm_impl: str = "rms_norm"
    norm_eps: float = Field(default=1e-5, gt=0)
    position: Literal["rope"] = "rope"
    rope_theta: float = Field(default=10000.0, gt=0)

    attn_bias: bool = Field(default=False, description="bias on the q/k/v projections")
    attn_out_bias: bool = Field(default=False, description="bias on the output projection")
    mlp_bias: bool = False
    tie_embeddings: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    init_std: float = Field(default=0.02, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        dim, n_heads = data.get("dim"), data.get("n_heads")
        if data.get("n_kv_heads") is None and n_heads is not None:
            data["n_kv_heads"] = n_heads
        if data.get("head_dim") is None and isinstance(dim, int) and isinstance(n_heads, int):
            if n_heads > 0 and dim % n_heads:
                raise ValueError(
                    f"dim={dim} is not divisible by n_heads={n_heads}; set head_dim explicitly"
                )
            data["head_dim"] = dim // n_heads if n_heads else None
        if data.get("hidden_dim") is None and isinstance(dim, int):
            if data.get("mlp_impl", "swiglu") == "swiglu":
                # LLaMA: 2/3 of 4*dim, rounded up to a multiple of 64.
                hidden = int(2 * 4 * dim / 3)
                data["hidden_dim"] = 64 * ((hidden + 63) // 64)
            else:
                data["hidden_dim"] = 4 * dim
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        from llm.core.registry import ATTENTION_REGISTRY, MLP_REGISTRY, NORM_REGISTRY

        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rope")
        for field, registry in (
            ("attn_impl", ATTENTION_REGISTRY),
            ("mlp_impl", MLP_REGISTRY),
            ("norm_impl", NORM_REGISTRY),
        ):
            name = getattr(self, field)
            if name not in registry:
                raise ValueError(f"{field}={name!r} is not one of {registry.names()}")
        return self

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """Build a preset by exact name, with fields overridden (unknown names raise)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


# One entry per family/size, differences only; vocab_size is usually set by the tokenizer.
PRESETS: dict[str, dict[str, Any]] = {
    # Tests and CPU demos: a few hundred thousand parameters.
    "tiny": dict(
        vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
        tie_embeddings=True,
    ),
    # The CPU demo: ~3M parameters, trains to readable text in minutes on 2 cores.
    "small": dict(
        vocab_size=256, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=256,
        tie_embeddings=True,
    ),
    # LLaMA-2 7B shape.
    "llama": dict(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32,
        hidden_dim=11008, max_seq_len=4096, norm_eps=1e-5,
    ),
    # LLaMA-3 8B shape (GQA, larger rope theta).
    "llama3": dict(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        hidden_dim=14336, max_seq_len=8192, rope_theta=500000.0,
    ),
}  # fmt: skip
