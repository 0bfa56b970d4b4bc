"""ModelConfig: every architectural choice as an explicit, validated field.

Only `DecoderModel` reads this; leaf modules take plain numbers.
Derived sizes (`head_dim`, `n_kv_heads`, `hidden_dim`, `sliding_window_layers`) are
filled in once here and contradictions raise with the field named, never silently
overwritten. Per-layer differences (which layers slide, which layers stay dense in an
MoE model) are explicit index tuples, never inferred from a family name.
"""

from __future__ import annotations

import math
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RopeScaling(BaseModel):
    """How RoPE frequencies are stretched beyond the trained context.

    - `linear`: positions divided by `factor` (Chen et al. 2023, position interpolation).
    - `dynamic`: NTK-aware base `theta * (factor * L / L0 - factor + 1) ** (d / (d - 2))`,
      with `L` fixed to the model's `max_seq_len` so tables stay static and cached
      decode equals recompute (vLLM does the same; HF re-derives `L` from each input,
      which equals ours for inputs of `max_seq_len` tokens).
    - `yarn`: per-frequency blend of interpolation and extrapolation plus a cos/sin
      magnitude factor (Peng et al. 2023).
    - `llama3`: wavelength-banded interpolation (Llama 3.1).
    - `longrope`: per-frequency divisors, `short_factor` for positions below
      `original_max_seq_len` and `long_factor` from there on, plus a cos/sin magnitude
      factor (Phi-3, Ding et al. 2024). One static table holds both ranges, so cached
      decode equals recompute (vLLM does the same; HF switches every position to the
      long factors once an input passes `original_max_seq_len`, which equals ours for
      inputs within it).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["linear", "dynamic", "yarn", "llama3", "longrope"]
    factor: float = Field(gt=0)
    original_max_seq_len: int | None = Field(default=None, gt=0)
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn, DeepSeek's two-factor form
    mscale_all_dim: float | None = None  # yarn, DeepSeek's two-factor form
    attention_factor: float | None = None  # yarn, longrope: overrides the derived cos/sin factor
    truncate: bool = True  # yarn: round the correction range to whole dims
    short_factor: tuple[float, ...] | None = None  # longrope: one divisor per frequency
    long_factor: tuple[float, ...] | None = None  # longrope

    @model_validator(mode="after")
    def _check(self) -> Self:
        needs_original = ("dynamic", "yarn", "llama3", "longrope")
        if self.kind in needs_original and self.original_max_seq_len is None:
            raise ValueError(f"rope_scaling kind={self.kind!r} needs original_max_seq_len")
        has_factors = self.short_factor is not None and self.long_factor is not None
        if (self.kind == "longrope") != has_factors:
            raise ValueError("short_factor and long_factor go with rope_scaling kind='longrope'")
        if has_factors and len(self.short_factor) != len(self.long_factor):
            raise ValueError("short_factor and long_factor must have the same length")
        return self


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction `0.1 * mscale * ln(factor) + 1` (1 when not stretching)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


class ModelConfig(BaseModel):
    """Architecture of a decoder-only transformer."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    vocab_size: int = Field(gt=0)
    dim: int = Field(gt=0, description="residual stream width")
    n_layers: int = Field(gt=0)
    n_heads: int = Field(gt=0)
    n_kv_heads: int | None = Field(default=None, gt=0, description="defaults to n_heads (MHA)")
    head_dim: int | None = Field(
        default=None,
        gt=0,
        description="q/k width per head; defaults to dim // n_heads (mla: nope + rope)",
    )
    hidden_dim: int | None = Field(
        default=None, gt=0, description="dense MLP width; derived if unset"
    )
    max_seq_len: int = Field(default=2048, gt=0)

    attn_impl: str = "mha"
    mlp_impl: str = "swiglu"
    norm_impl: str = "rms_norm"
    norm_eps: float = Field(default=1e-5, gt=0)
    norm_bias: bool | None = Field(
        default=None, description="layer_norm: True unless set; rms_norm: never"
    )
    norm_position: Literal["pre", "post", "output", "sandwich"] = Field(
        default="pre",
        description=(
            "pre: x + f(norm(x)), final norm; post: norm(x + f(x)), no final norm; "
            "output: x + norm(f(x)), final norm (OLMo 2); "
            "sandwich: x + norm(f(norm(x))), final norm (Gemma 2/3)"
        ),
    )
    embed_norm: bool = Field(default=False, description="a norm right after the embedding (BLOOM)")
    embed_scale: float = Field(
        default=1.0, gt=0, description="embeddings times this, in their dtype (Gemma: sqrt(dim))"
    )
    final_logit_softcap: float | None = Field(
        default=None, gt=0, description="logits = cap * tanh(logits / cap) (Gemma 2/3)"
    )

    # Positions.
    position: Literal["rope", "alibi", "learned", "none"] = "rope"
    rope_theta: float = Field(default=10000.0, gt=0)
    rope_scaling: RopeScaling | None = None
    rotary_dim: int | None = Field(
        default=None, gt=0, description="rotated leading dims of each q/k head; head_dim if unset"
    )
    sliding_rope_theta: float | None = Field(
        default=None,
        gt=0,
        description="sliding-window layers rotate with this theta and no rope_scaling (Gemma 3)",
    )

    # Attention.
    attn_backend: Literal["sdpa", "eager"] = Field(
        default="sdpa",
        description="sdpa: torch kernel; eager: explicit softmax, the reference path",
    )
    attn_scale_factor: float = Field(
        default=1.0, gt=0, description="softmax scale = attn_scale_factor / sqrt(attn_scale_dim)"
    )
    attn_scale_dim: int | None = Field(
        default=None, gt=0, description="head_dim if unset (Gemma's query_pre_attn_scalar)"
    )
    attn_logit_softcap: float | None = Field(
        default=None,
        gt=0,
        description="scores = cap * tanh(scores / cap) before the mask (Gemma 2)",
    )
    attn_sinks: bool = Field(
        default=False, description="a learned per-head logit in each softmax denominator (gpt-oss)"
    )
    attn_bias: bool = Field(default=False, description="bias on the q/k/v projections")
    attn_out_bias: bool = Field(default=False, description="bias on the output projection")
    qk_norm: bool = Field(
        default=False, description="RMSNorm on q and k before rope (Qwen3, OLMo 2)"
    )
    qk_norm_scope: Literal["head", "all_heads"] = Field(
        default="head",
        description="head: one norm per head (Qwen3); all_heads: over the whole q / k projection (OLMo 2)",
    )
    sliding_window: int | None = Field(
        default=None, gt=0, description="keys within this many positions"
    )
    sliding_window_layers: tuple[int, ...] | None = Field(
        default=None, description="layers that use sliding_window; all layers if unset"
    )

    # Multi-head latent attention (attn_impl="mla", DeepSeek-V2/V3).
    q_lora_rank: int | None = Field(default=None, gt=0, description="None: a full-rank q_proj")
    kv_lora_rank: int | None = Field(default=None, gt=0)
    qk_nope_head_dim: int | None = Field(default=None, gt=0)
    qk_rope_head_dim: int | None = Field(default=None, gt=0)
    v_head_dim: int | None = Field(default=None, gt=0)

    # Mixture of experts (mlp_impl="moe").
    n_experts: int | None = Field(default=None, gt=0)
    n_experts_per_tok: int | None = Field(default=None, gt=0)
    moe_hidden_dim: int | None = Field(default=None, gt=0, description="width of one routed expert")
    moe_dense_layers: tuple[int, ...] = Field(
        default=(), description="layers with a dense swiglu MLP of hidden_dim instead of experts"
    )
    shared_expert_hidden_dim: int | None = Field(default=None, gt=0, description="always-on expert")
    shared_expert_gate: bool = Field(default=False, description="sigmoid gate on the shared expert")
    router_order: Literal["softmax_topk", "topk_softmax", "sigmoid_topk"] = Field(
        default="softmax_topk",
        description="sigmoid_topk: top-k of independent sigmoid scores (DeepSeek-V3)",
    )
    router_choice_bias: bool = Field(
        default=False,
        description="a bias on the scores for choosing experts only, not weighting (DeepSeek-V3)",
    )
    router_group_score: Literal["max", "top2_sum"] = Field(
        default="max", description="a group's rank: its best expert (V2) or best two (V3)"
    )
    router_renormalize: bool = Field(
        default=False, description="top-k weights rescaled to sum to 1"
    )
    router_scale: float = Field(
        default=1.0, gt=0, description="routed output multiplier (DeepSeek)"
    )
    router_n_groups: int | None = Field(default=None, gt=0, description="group-limited routing")
    router_topk_groups: int | None = Field(default=None, gt=0)
    router_bias: bool = Field(default=False, description="bias on the router logits (gpt-oss)")
    moe_expert_bias: bool = Field(default=False, description="biases on the expert projections")
    moe_activation: Literal["swiglu", "clamped_swiglu"] = Field(
        default="swiglu",
        description=(
            "clamped_swiglu: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g), "
            "g = min(gate, limit) (gpt-oss)"
        ),
    )
    swiglu_alpha: float = Field(default=1.702, gt=0, description="clamped_swiglu's alpha")
    swiglu_limit: float = Field(default=7.0, gt=0, description="clamped_swiglu's limit")
    router_aux_loss_coef: float = Field(default=0.0, ge=0, description="load-balancing loss weight")
    router_z_loss_coef: float = Field(default=0.0, ge=0, description="router z-loss weight")

    mlp_bias: bool = False
    tie_embeddings: bool = False
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    init_std: float = Field(default=0.02, gt=0)

    @property
    def rope_dim(self) -> int:
        """Width of the rotated part of q/k per head."""
        if self.attn_impl == "mla":
            return self.qk_rope_head_dim
        return self.rotary_dim or self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, None for full causal attention."""
        return self.sliding_window if layer in (self.sliding_window_layers or ()) else None

    def layer_is_moe(self, layer: int) -> bool:
        return self.mlp_impl == "moe" and layer not in self.moe_dense_layers

    @model_validator(mode="before")
    @classmethod
    def _derive(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        dim, n_heads = data.get("dim"), data.get("n_heads")
        if data.get("n_kv_heads") is None and n_heads is not None:
            data["n_kv_heads"] = n_heads
        if data.get("attn_impl") == "mla":
            nope, rope = data.get("qk_nope_head_dim"), data.get("qk_rope_head_dim")
            if data.get("head_dim") is None and isinstance(nope, int) and isinstance(rope, int):
                data["head_dim"] = nope + rope
        if data.get("head_dim") is None and isinstance(dim, int) and isinstance(n_heads, int):
            if n_heads > 0 and dim % n_heads:
                raise ValueError(
                    f"dim={dim} is not divisible by n_heads={n_heads}; set head_dim explicitly"
                )
            data["head_dim"] = dim // n_heads if n_heads else None
        if data.get("hidden_dim") is None and isinstance(dim, int):
            if data.get("mlp_impl", "swiglu") in ("swiglu", "geglu", "moe"):
                # LLaMA: 2/3 of 4*dim, rounded up to a multiple of 64.
                hidden = int(2 * 4 * dim / 3)
                data["hidden_dim"] = 64 * ((hidden + 63) // 64)
            else:
                data["hidden_dim"] = 4 * dim
        if data.get("norm_bias") is None:
            data["norm_bias"] = data.get("norm_impl", "rms_norm") == "layer_norm"
        n_layers = data.get("n_layers")
        slides = (
            data.get("sliding_window") is not None and data.get("sliding_window_layers") is None
        )
        if slides and isinstance(n_layers, int):
            data["sliding_window_layers"] = tuple(range(n_layers))
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        from llm.core.registry import ATTENTION_REGISTRY, MLP_REGISTRY, NORM_REGISTRY

        for field, registry in (
            ("attn_impl", ATTENTION_REGISTRY),
            ("mlp_impl", MLP_REGISTRY),
            ("norm_impl", NORM_REGISTRY),
        ):
            name = getattr(self, field)
            if name not in registry:
                raise ValueError(f"{field}={name!r} is not one of {registry.names()}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.norm_bias and self.norm_impl == "rms_norm":
            raise ValueError("norm_bias=True: rms_norm has no bias")
        self._check_attention()
        self._check_positions()
        if self.mlp_impl == "moe":
            self._check_moe()
        return self

    def _check_attention(self) -> None:
        if self.sliding_window_layers is not None:
            if self.sliding_window is None:
                raise ValueError("sliding_window_layers is set but sliding_window is not")
            _check_layers("sliding_window_layers", self.sliding_window_layers, self.n_layers)
        if self.qk_norm_scope != "head" and not self.qk_norm:
            raise ValueError(f"qk_norm_scope={self.qk_norm_scope!r} needs qk_norm=True")
        if self.attn_impl != "mla":
            return
        needed = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        if missing := [f for f in needed if getattr(self, f) is None]:
            raise ValueError(f"attn_impl='mla' needs {missing}")
        if self.head_dim != self.qk_nope_head_dim + self.qk_rope_head_dim:
            raise ValueError(
                f"head_dim={self.head_dim} must equal qk_nope_head_dim + qk_rope_head_dim "
                f"= {self.qk_nope_head_dim + self.qk_rope_head_dim} for attn_impl='mla'"
            )
        if self.n_kv_heads != self.n_heads:
            raise ValueError(
                "n_kv_heads must equal n_heads for attn_impl='mla' (one shared latent)"
            )
        if self.qk_norm:
            raise ValueError("qk_norm is not defined for attn_impl='mla'")
        if self.attn_logit_softcap is not None or self.attn_sinks:
            raise ValueError(
                "attn_logit_softcap and attn_sinks are not implemented for attn_impl='mla'"
            )
        if self.attn_bias != self.attn_out_bias:
            raise ValueError(
                "attn_impl='mla' has one bias flag: attn_bias must equal attn_out_bias"
            )

    def _check_positions(self) -> None:
        if self.position == "rope" and self.rope_dim % 2:
            raise ValueError(f"head_dim={self.rope_dim} must be even for rope")
        if self.rope_scaling is not None and self.position != "rope":
            raise ValueError(f"rope_scaling needs position='rope', not {self.position!r}")
        if self.sliding_rope_theta is not None and (
            self.position != "rope" or self.sliding_window is None
        ):
            raise ValueError("sliding_rope_theta needs position='rope' and a sliding_window")
        if self.rotary_dim is not None:
            if self.attn_impl == "mla":
                raise ValueError("rotary_dim is not defined for attn_impl='mla' (qk_rope_head_dim)")
            if self.rotary_dim > self.head_dim:
                raise ValueError(f"rotary_dim={self.rotary_dim} exceeds head_dim={self.head_dim}")
        s = self.rope_scaling
        if s is not None and s.kind == "longrope" and len(s.short_factor) != self.rope_dim // 2:
            raise ValueError(
                f"rope_scaling.short_factor has {len(s.short_factor)} entries; "
                f"rotary width {self.rope_dim} needs {self.rope_dim // 2}"
            )
        if self.attn_impl == "mla" and self.position != "rope":
            raise ValueError(
                f"attn_impl='mla' needs position='rope' (its decoupled key), not {self.position!r}"
            )

    def _check_moe(self) -> None:
        needed = ("n_experts", "n_experts_per_tok", "moe_hidden_dim")
        if missing := [f for f in needed if getattr(self, f) is None]:
            raise ValueError(f"mlp_impl='moe' needs {missing}")
        if self.n_experts_per_tok > self.n_experts:
            raise ValueError(
                f"n_experts_per_tok={self.n_experts_per_tok} exceeds n_experts={self.n_experts}"
            )
        _check_layers("moe_dense_layers", self.moe_dense_layers, self.n_layers)
        if self.shared_expert_gate and self.shared_expert_hidden_dim is None:
            raise ValueError("shared_expert_gate needs shared_expert_hidden_dim")
        if self.router_choice_bias and self.router_order != "sigmoid_topk":
            raise ValueError("router_choice_bias needs router_order='sigmoid_topk'")
        if (
            self.router_group_score == "top2_sum"
            and self.n_experts // (self.router_n_groups or 1) < 2
        ):
            raise ValueError("router_group_score='top2_sum' needs groups of at least 2 experts")
        if (self.router_n_groups is None) != (self.router_topk_groups is None):
            raise ValueError("router_n_groups and router_topk_groups go together")
        if self.router_n_groups is not None:
            if self.n_experts % self.router_n_groups:
                raise ValueError(
                    f"router_n_groups={self.router_n_groups} must divide n_experts={self.n_experts}"
                )
            if self.router_topk_groups > self.router_n_groups:
                raise ValueError(
                    f"router_topk_groups={self.router_topk_groups} exceeds router_n_groups={self.router_n_groups}"
                )

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """Build a preset by exact name, with fields overridden (unknown names raise)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


def _check_layers(field: str, layers: tuple[int, ...], n_layers: int) -> None:
    if bad := [i for i in layers if not 0 <= i < n_layers]:
        raise ValueError(f"{field} has layer indices {bad} outside 0..{n_layers - 1}")


# One entry per family/size, differences only; vocab_size is usually set by the tokenizer.
# Shapes follow each family's reference checkpoint (named in the comment).
PRESETS: dict[str, dict[str, Any]] = {
    # Tests and CPU demos: a few hundred thousand parameters.
    "tiny": dict(
        vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
        tie_embeddings=True,
    ),
    "tiny-moe": dict(
        vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256,
        tie_embeddings=True, mlp_impl="moe", n_experts=4, n_experts_per_tok=2, moe_hidden_dim=96,
        router_renormalize=True, router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
    ),
    # The CPU demo: ~3M parameters, trains to readable text in minutes on 2 cores.
    "small": dict(
        vocab_size=256, dim=192, n_layers=4, n_heads=6, n_kv_heads=2, max_seq_len=256,
        tie_embeddings=True,
    ),
    # openai-community/gpt2.
    "gpt2-small": dict(
        vocab_size=50257, dim=768, n_layers=12, n_heads=12, hidden_dim=3072, max_seq_len=1024,
        mlp_impl="mlp", norm_impl="layer_norm", position="learned", attn_bias=True,
        attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
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
    # Llama-3.1 8B: llama3 rope scaling to 128k.
    "llama3.1": dict(
        vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        hidden_dim=14336, max_seq_len=131072, rope_theta=500000.0,
        rope_scaling=dict(kind="llama3", factor=8.0, original_max_seq_len=8192),
    ),
    # mistralai/Mistral-7B-v0.1: GQA + a 4096-token sliding window on every layer.
    "mistral": dict(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        hidden_dim=14336, max_seq_len=32768, sliding_window=4096,
    ),
    # Qwen/Qwen2-7B: q/k/v bias (no o_proj bias).
    "qwen2": dict(
        vocab_size=152064, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
        hidden_dim=18944, max_seq_len=32768, rope_theta=1e6, norm_eps=1e-6, attn_bias=True,
    ),
    # Qwen/Qwen3-8B: per-head q/k RMSNorm, explicit head_dim.
    "qwen3": dict(
        vocab_size=151936, dim=4096, n_layers=36, n_heads=32, n_kv_heads=8, head_dim=128,
        hidden_dim=12288, max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, qk_norm=True,
    ),
    # mistralai/Mixtral-8x7B-v0.1: 8 experts, top-2, renormalised.
    "mixtral": dict(
        vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
        max_seq_len=32768, rope_theta=1e6, mlp_impl="moe", n_experts=8, n_experts_per_tok=2,
        moe_hidden_dim=14336, router_renormalize=True, router_aux_loss_coef=0.02,
    ),
    # Qwen/Qwen1.5-MoE-A2.7B: 60 fine-grained experts, top-4, a gated shared expert.
    "qwen2-moe": dict(
        vocab_size=151936, dim=2048, n_layers=24, n_heads=16, hidden_dim=5632,
        max_seq_len=8192, rope_theta=1e6, norm_eps=1e-6, attn_bias=True, mlp_impl="moe",
        n_experts=60, n_experts_per_tok=4, moe_hidden_dim=1408, shared_expert_hidden_dim=5632,
        shared_expert_gate=True, router_aux_loss_coef=0.001,
    ),
    # Qwen/Qwen3-30B-A3B: 128 experts, top-8, renormalised, q/k norm.
    "qwen3-moe": dict(
        vocab_size=151936, dim=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128,
        hidden_dim=6144, max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, qk_norm=True,
        mlp_impl="moe", n_experts=128, n_experts_per_tok=8, moe_hidden_dim=768,
        router_renormalize=True, router_aux_loss_coef=0.001,
    ),
    # deepseek-ai/DeepSeek-V2-Lite: MLA (no q compression), first layer dense, 64 experts
    # top-6 plus two shared experts, YaRN x40 whose mscale also sharpens the softmax.
    "deepseek-v2-lite": dict(
        vocab_size=102400, dim=2048, n_layers=27, n_heads=16, hidden_dim=10944,
        max_seq_len=163840, norm_eps=1e-6, attn_impl="mla", kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        rope_scaling=dict(
            kind="yarn", factor=40.0, original_max_seq_len=4096, beta_fast=32.0, beta_slow=1.0,
            mscale=0.707, mscale_all_dim=0.707,
        ),
        attn_scale_factor=yarn_mscale(40.0, 0.707) ** 2,
        mlp_impl="moe", n_experts=64, n_experts_per_tok=6, moe_hidden_dim=1408,
        shared_expert_hidden_dim=2 * 1408, moe_dense_layers=(0,), router_aux_loss_coef=0.001,
    ),
    # bigscience/bloom-560m: ALiBi, LayerNorm with bias, a norm after the embedding.
    "bloom": dict(
        vocab_size=250880, dim=1024, n_layers=24, n_heads=16, hidden_dim=4096,
        max_seq_len=2048, position="alibi", mlp_impl="mlp", norm_impl="layer_norm",
        embed_norm=True, attn_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
    ),
}  # fmt: skip
