"""gpt-oss: attention sinks, alternating sliding windows and biased clamped-SwiGLU experts.

Attention follows the Llama layout with biases everywhere plus `self_attn.sinks`, one
learned logit per head. Every layer is MoE: the router (`mlp.router`, with a bias)
picks top-k logits and softmaxes over them; the experts are stored fused and
transposed, `gate_up_proj` (E, dim, 2*hidden) with gate and up columns interleaved
(gate = [..., ::2], up = [..., 1::2]) and `down_proj` (E, hidden, dim), each with a
bias; here they become our (E, 2*hidden, dim) gate|up and (E, dim, hidden). MXFP4
checkpoints (`*_blocks`/`*_scales`, as first published) are refused: dequantize first.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from llm.config import ModelConfig
from llm.interop._common import (
    Family,
    Map,
    common_hf_kwargs,
    require,
    require_rope,
    rope_fields,
    rope_to_hf,
)
from llm.interop._llama import (
    _require_one_bias_flag,
    _sliding_from_layer_types,
    _sliding_to_layer_types,
    llama_mapper,
)

_llama_keys = llama_mapper()


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """(..., 2H) with gate/up alternating -> (..., 2H) gate | up."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)


def _interleave(t: torch.Tensor) -> torch.Tensor:
    """(..., 2H) gate | up -> (..., 2H) with gate/up alternating."""
    gate, up = t.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def gpt_oss_mapper(name: str, c: ModelConfig) -> Map:
    if ".mlp." not in name:
        return _llama_keys(name, c)
    layer, leaf = name.split(".")[1], name.split(".mlp.", 1)[1]
    hf = f"model.layers.{layer}.mlp"
    if leaf.startswith("gate."):
        return Map((f"{hf}.router.{leaf.split('.')[1]}",))
    if leaf == "experts.gate_up_proj":  # ours (E, 2H, D), HF (E, D, 2H) interleaved
        return Map(
            (f"{hf}.{leaf}",),
            join=lambda ts: _deinterleave(ts[0]).transpose(1, 2).contiguous(),
            split=lambda t: [_interleave(t.transpose(1, 2))],
        )
    if leaf == "experts.gate_up_proj_bias":
        return Map(
            (f"{hf}.{leaf}",),
            join=lambda ts: _deinterleave(ts[0]),
            split=lambda t: [_interleave(t)],
        )
    if leaf == "experts.down_proj":  # ours (E, D, H), HF (E, H, D)
        return Map(
            (f"{hf}.{leaf}",),
            join=lambda ts: ts[0].transpose(1, 2).contiguous(),
            split=lambda t: [t.transpose(1, 2)],
        )
    return Map((f"{hf}.{leaf}",))  # experts.down_proj_bias


def gpt_oss_from_hf(hf: Any) -> ModelConfig:
    if getattr(hf, "quantization_config", None):
        raise NotImplementedError(
            "quantized gpt-oss checkpoints (MXFP4 experts) are not supported; use a bf16 one"
        )
    flag = hf.attention_bias
    return ModelConfig(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, hidden_dim=hf.intermediate_size,
        n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads, head_dim=hf.head_dim, norm_eps=hf.rms_norm_eps,
        tie_embeddings=hf.tie_word_embeddings, init_std=hf.initializer_range, **rope_fields(hf),
        attn_bias=flag, attn_out_bias=flag, attn_sinks=True, **_sliding_from_layer_types(hf),
        mlp_impl="moe", n_experts=hf.num_local_experts, n_experts_per_tok=hf.num_experts_per_tok,
        moe_hidden_dim=hf.intermediate_size, router_order="topk_softmax", router_bias=True,
        moe_expert_bias=True, moe_activation="clamped_swiglu", swiglu_alpha=hf.swiglu_alpha,
        swiglu_limit=hf.swiglu_limit, router_aux_loss_coef=hf.router_aux_loss_coef,
    )  # fmt: skip


def gpt_oss_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    require_rope(c, "gpt_oss")
    require(
        c, "gpt_oss", attn_impl="mha", norm_impl="rms_norm", norm_position="pre", position="rope",
        embed_norm=False, attn_scale_factor=1.0, qk_norm=False, attn_sinks=True, mlp_impl="moe",
        moe_dense_layers=(), shared_expert_hidden_dim=None, router_order="topk_softmax",
        router_bias=True, moe_expert_bias=True, moe_activation="clamped_swiglu", router_scale=1.0,
        router_n_groups=None, router_z_loss_coef=0.0, mlp_bias=False,
    )  # fmt: skip
    _require_one_bias_flag(c, "gpt_oss")
    layer_types = _sliding_to_layer_types(c).get("layer_types", ["full_attention"] * c.n_layers)
    return transformers.GptOssConfig(
        hidden_size=c.dim, intermediate_size=c.moe_hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        rms_norm_eps=c.norm_eps, attention_bias=c.attn_bias, sliding_window=c.sliding_window,
        layer_types=layer_types, num_local_experts=c.n_experts,
        num_experts_per_tok=c.n_experts_per_tok, swiglu_alpha=c.swiglu_alpha,
        swiglu_limit=c.swiglu_limit, router_aux_loss_coef=c.router_aux_loss_coef,
        **rope_to_hf(c), **common_hf_kwargs(c, "GptOssForCausalLM"),
    )  # fmt: skip


_FEATURES = frozenset(
    {
        "attn_sinks",
        "router_bias",
        "moe_expert_bias",
        "moe_activation",
        "swiglu_alpha",
        "swiglu_limit",
    }
)
FAMILIES = (Family("gpt_oss", gpt_oss_from_hf, gpt_oss_to_hf, gpt_oss_mapper, features=_FEATURES),)
