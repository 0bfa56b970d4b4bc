"""DeepSeek-V2 (and V2-Lite) and V3: multi-head latent attention, shared + routed experts.

Two conversions beyond renaming: the rotary dims of q and of the shared rope key are
stored interleaved (pairs 2i, 2i+1) in DeepSeek checkpoints, and permuted here into our
rotate-half layout (i, i + d/2), which leaves every q.k product unchanged; and the MoE
layout follows Qwen2-MoE (`mlp.experts.N.gate_proj`, `mlp.shared_experts`).
transformers' DeepseekV2 ignores `norm_topk_prob`, so a config asking for it raises
rather than converting to something the reference does not compute.

V3 routes by sigmoid scores: the experts are chosen by score plus a load-balancing
correction bias (`mlp.gate.e_score_correction_bias`) within the groups whose best two
experts score highest, and weighted by their plain scores, renormalised and scaled.
Its multi-token-prediction layers (`model.layers.N` for N >= num_hidden_layers) are
left out on import, with a warning.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from llm.config import ModelConfig, yarn_mscale
from llm.interop._common import (
    Family,
    Map,
    check_act,
    common_hf_kwargs,
    permuted,
    require,
    require_rope,
    rope_fields,
    rope_params,
    rope_to_hf,
)
from llm.interop._llama import llama_mapper

_moe_mapper = llama_mapper()


def _interleaved_to_half(rope_dim: int, n_before: int, n_groups: int = 1) -> torch.Tensor:
    """Row order turning each group's trailing interleaved rope rows into rotate-half order.

    Each group is `n_before` untouched rows followed by `rope_dim` rope rows.
    """
    rope = torch.cat([torch.arange(0, rope_dim, 2), torch.arange(1, rope_dim, 2)]) + n_before
    group = torch.cat([torch.arange(n_before), rope])
    width = n_before + rope_dim
    return torch.cat([group + g * width for g in range(n_groups)])


def deepseek_mapper(name: str, c: ModelConfig) -> Map:
    hf = f"model.{name}"
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        return permuted(hf, _interleaved_to_half(c.qk_rope_head_dim, c.qk_nope_head_dim, c.n_heads))
    if ".kv_a_proj_with_mqa." in name:
        return permuted(hf, _interleaved_to_half(c.qk_rope_head_dim, c.kv_lora_rank))
    if ".mlp.shared_expert." in name:
        return Map((hf.replace(".shared_expert.", ".shared_experts."),))
    return _moe_mapper(name, c)


def _mla_moe_fields(hf: Any) -> dict[str, Any]:
    """What DeepSeek-V2 and V3 share: MLA, first-k dense layers, shared + routed experts."""
    check_act(hf, "silu")
    rope = rope_params(hf)
    scale_factor = 1.0
    # transformers sharpens the softmax by mscale(mscale_all_dim)^2 under any rope scaling.
    if rope.get("rope_type", rope.get("type", "default")) != "default" and rope.get(
        "mscale_all_dim"
    ):
        scale_factor = yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
    n_shared = hf.n_shared_experts or 0
    return dict(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, hidden_dim=hf.intermediate_size,
        n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads, norm_eps=hf.rms_norm_eps,
        tie_embeddings=hf.tie_word_embeddings, init_std=hf.initializer_range, **rope_fields(hf),
        attn_impl="mla", q_lora_rank=hf.q_lora_rank, kv_lora_rank=hf.kv_lora_rank,
        qk_nope_head_dim=hf.qk_nope_head_dim, qk_rope_head_dim=hf.qk_rope_head_dim,
        v_head_dim=hf.v_head_dim, attn_bias=hf.attention_bias, attn_out_bias=hf.attention_bias,
        attn_scale_factor=scale_factor, mlp_impl="moe", n_experts=hf.n_routed_experts,
        n_experts_per_tok=hf.num_experts_per_tok, moe_hidden_dim=hf.moe_intermediate_size,
        moe_dense_layers=tuple(range(hf.first_k_dense_replace)),
        shared_expert_hidden_dim=hf.moe_intermediate_size * n_shared or None,
        router_scale=hf.routed_scaling_factor, router_aux_loss_coef=getattr(hf, "aux_loss_alpha", 0.0),
    )  # fmt: skip


def _require_mla_moe(c: ModelConfig, family: str, **expected: Any) -> dict[str, Any]:
    """Check the shared part; return its HF kwargs."""
    require_rope(c, family)
    require(
        c, family, attn_impl="mla", mlp_impl="moe", norm_impl="rms_norm", position="rope",
        norm_position="pre", embed_norm=False, mlp_bias=False, shared_expert_gate=False,
        router_z_loss_coef=0.0, **expected,
    )  # fmt: skip
    if c.moe_dense_layers != tuple(range(len(c.moe_dense_layers))):
        raise ValueError(
            f"moe_dense_layers={c.moe_dense_layers} cannot be expressed as {family} "
            "(only the first k layers can be dense)"
        )
    shared = c.shared_expert_hidden_dim or 0
    if shared % c.moe_hidden_dim:
        raise ValueError(
            f"shared_expert_hidden_dim={shared} must be a multiple of moe_hidden_dim={c.moe_hidden_dim}"
        )
    return dict(
        hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_heads, hidden_act="silu",
        rms_norm_eps=c.norm_eps, q_lora_rank=c.q_lora_rank, kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim, qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim, attention_bias=c.attn_bias, n_routed_experts=c.n_experts,
        num_experts_per_tok=c.n_experts_per_tok, moe_intermediate_size=c.moe_hidden_dim,
        n_shared_experts=shared // c.moe_hidden_dim, first_k_dense_replace=len(c.moe_dense_layers),
        routed_scaling_factor=c.router_scale, **rope_to_hf(c),
    )  # fmt: skip


def _check_scale(
    hf: transformers.PretrainedConfig, c: ModelConfig, family: str, from_hf: Any
) -> None:
    if from_hf(hf).attn_scale_factor != c.attn_scale_factor:
        raise ValueError(
            f"attn_scale_factor={c.attn_scale_factor} cannot be expressed as {family} "
            "(it follows from rope_scaling.mscale_all_dim)"
        )
    hf.aux_loss_alpha = c.router_aux_loss_coef


# -- DeepSeek-V2 ------------------------------------------------------------------------------


def deepseek_v2_from_hf(hf: Any) -> ModelConfig:
    if hf.topk_method not in ("greedy", "group_limited_greedy"):
        raise NotImplementedError(f"topk_method={hf.topk_method!r} is not supported")
    if getattr(hf, "norm_topk_prob", False):
        raise NotImplementedError("norm_topk_prob=True: transformers' DeepseekV2 ignores it")
    groups = {}
    if hf.topk_method == "group_limited_greedy":
        groups = dict(router_n_groups=hf.n_group, router_topk_groups=hf.topk_group)
    return ModelConfig(**_mla_moe_fields(hf), **groups)


def deepseek_v2_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    kwargs = _require_mla_moe(
        c, "deepseek_v2", router_order="softmax_topk", router_renormalize=False
    )
    groups = dict(topk_method="greedy")
    if c.router_n_groups is not None:
        groups = dict(
            topk_method="group_limited_greedy",
            n_group=c.router_n_groups,
            topk_group=c.router_topk_groups,
        )
    hf = transformers.DeepseekV2Config(
        **kwargs, norm_topk_prob=False, **groups, **common_hf_kwargs(c, "DeepseekV2ForCausalLM")
    )
    _check_scale(hf, c, "deepseek_v2", deepseek_v2_from_hf)
    return hf


# -- DeepSeek-V3 ------------------------------------------------------------------------------


def deepseek_v3_from_hf(hf: Any) -> ModelConfig:
    if not getattr(hf, "rope_interleave", True):
        raise NotImplementedError("rope_interleave=False is not supported (checkpoints interleave)")
    if hf.n_group is None:
        raise NotImplementedError("n_group=None is not supported (transformers needs groups)")
    return ModelConfig(
        **_mla_moe_fields(hf), router_order="sigmoid_topk", router_choice_bias=True,
        router_group_score="top2_sum", router_n_groups=hf.n_group,
        router_topk_groups=hf.topk_group, router_renormalize=bool(hf.norm_topk_prob),
    )  # fmt: skip


def deepseek_v3_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    kwargs = _require_mla_moe(
        c, "deepseek_v3", router_order="sigmoid_topk", router_choice_bias=True,
        router_group_score="top2_sum",
    )  # fmt: skip
    if c.router_n_groups is None or c.shared_expert_hidden_dim is None:
        raise ValueError(
            "deepseek_v3 needs group-limited routing (router_n_groups) and a shared expert"
        )
    hf = transformers.DeepseekV3Config(
        **kwargs, n_group=c.router_n_groups, topk_group=c.router_topk_groups,
        norm_topk_prob=c.router_renormalize, rope_interleave=True, pad_token_id=None,
        **common_hf_kwargs(c, "DeepseekV3ForCausalLM"),
    )  # fmt: skip
    _check_scale(hf, c, "deepseek_v3", deepseek_v3_from_hf)
    return hf


def deepseek_v3_mapper(name: str, c: ModelConfig) -> Map:
    if name.endswith(".mlp.e_score_correction_bias"):
        return Map((f"model.{name.replace('.mlp.', '.mlp.gate.')}",))
    return deepseek_mapper(name, c)


def _mtp_layer(key: str, c: ModelConfig) -> str | None:
    """DeepSeek-V3's multi-token-prediction modules sit in layers from num_hidden_layers on;
    they only serve speculative decoding, so import leaves them out (with a warning)."""
    parts = key.split(".")
    is_layer = len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
    if is_layer and int(parts[2]) >= c.n_layers:
        return "multi-token-prediction layers (unused for next-token prediction)"
    return None


FAMILIES = (
    Family("deepseek_v2", deepseek_v2_from_hf, deepseek_v2_to_hf, deepseek_mapper),
    Family(
        "deepseek_v3", deepseek_v3_from_hf, deepseek_v3_to_hf, deepseek_v3_mapper,
        features=frozenset({"router_choice_bias", "router_group_score"}), skip=_mtp_layer,
    ),
)  # fmt: skip
