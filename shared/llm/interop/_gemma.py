"""Gemma 2 and Gemma 3 (text): the Llama layout with Gemma's numerics.

Embeddings scaled by sqrt(hidden_size); RMSNorm scaling by (1 + weight); a tanh-GELU
gated MLP; a norm before and after each sublayer; the softmax scaled by
`query_pre_attn_scalar`; sliding-window layers listed in `layer_types`; the final
logits (and in Gemma 2 the attention scores) soft-capped. Gemma 3 adds per-head q/k
norms and its own rope theta for the sliding (local) layers.

HF names the four block norms input_layernorm, post_attention_layernorm (attention
output), pre_feedforward_layernorm and post_feedforward_layernorm; ours are
input_layernorm, attn_output_norm, post_attention_layernorm (before the MLP, as in
every pre-norm family) and mlp_output_norm.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import transformers

from llm.config import ModelConfig
from llm.interop._common import (
    Family,
    Map,
    check_act,
    common_hf_kwargs,
    require,
    require_rope,
    rope_fields,
    rope_params,
    rope_to_hf,
)
from llm.interop._llama import (
    _require_one_bias_flag,
    _sliding_from_layer_types,
    _sliding_to_layer_types,
    llama_mapper,
)

_llama_keys = llama_mapper()
_NORMS = {
    "post_attention_layernorm": "pre_feedforward_layernorm",
    "attn_output_norm": "post_attention_layernorm",
    "mlp_output_norm": "post_feedforward_layernorm",
}


def gemma_mapper(name: str, c: ModelConfig) -> Map:
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "layers" and parts[2] in _NORMS:
        return Map((f"model.layers.{parts[1]}.{_NORMS[parts[2]]}.{parts[3]}",))
    return _llama_keys(name, c)


def _fields(hf: Any, rope: dict[str, Any]) -> dict[str, Any]:
    check_act(hf, "gelu_pytorch_tanh", "gelu_new", field_name="hidden_activation")
    if getattr(hf, "use_bidirectional_attention", False):
        raise NotImplementedError("use_bidirectional_attention=True is not supported")
    flag = getattr(hf, "attention_bias", False)
    return dict(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, hidden_dim=hf.intermediate_size,
        n_layers=hf.num_hidden_layers, n_heads=hf.num_attention_heads,
        n_kv_heads=hf.num_key_value_heads, head_dim=hf.head_dim, norm_eps=hf.rms_norm_eps,
        tie_embeddings=hf.tie_word_embeddings, init_std=hf.initializer_range, **rope,
        mlp_impl="geglu", norm_impl="rms_norm_offset", norm_position="sandwich",
        embed_scale=hf.hidden_size**0.5, attn_scale_dim=hf.query_pre_attn_scalar,
        final_logit_softcap=hf.final_logit_softcapping, attn_bias=flag, attn_out_bias=flag,
        **_sliding_from_layer_types(hf),
    )  # fmt: skip


def _require_gemma(c: ModelConfig, family: str, **expected: Any) -> None:
    require_rope(c, family)
    require(
        c, family, attn_impl="mha", mlp_impl="geglu", norm_impl="rms_norm_offset",
        norm_position="sandwich", position="rope", embed_norm=False, embed_scale=c.dim**0.5,
        attn_scale_factor=1.0, mlp_bias=False, **expected,
    )  # fmt: skip
    _require_one_bias_flag(c, family)


def _kwargs(c: ModelConfig, architecture: str) -> dict[str, Any]:
    layer_types = _sliding_to_layer_types(c)
    layer_types.pop("use_sliding_window")
    return dict(
        hidden_size=c.dim, intermediate_size=c.hidden_dim, num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, head_dim=c.head_dim,
        hidden_activation="gelu_pytorch_tanh", rms_norm_eps=c.norm_eps,
        query_pre_attn_scalar=c.attn_scale_dim or c.head_dim, attention_bias=c.attn_bias,
        final_logit_softcapping=c.final_logit_softcap,
        sliding_window=c.sliding_window, layer_types=layer_types.get("layer_types"),
        pad_token_id=None, **common_hf_kwargs(c, architecture),
    )  # fmt: skip


# -- Gemma 2 ----------------------------------------------------------------------------------


def gemma2_from_hf(hf: Any) -> ModelConfig:
    return ModelConfig(**_fields(hf, rope_fields(hf)), attn_logit_softcap=hf.attn_logit_softcapping)


def gemma2_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    _require_gemma(c, "gemma2", qk_norm=False, sliding_rope_theta=None)
    kwargs = _kwargs(c, "Gemma2ForCausalLM")
    if kwargs["layer_types"] is None:
        kwargs["layer_types"] = ["full_attention"] * c.n_layers
    return transformers.Gemma2Config(
        **kwargs, **rope_to_hf(c), attn_logit_softcapping=c.attn_logit_softcap
    )


# -- Gemma 3 (text) ---------------------------------------------------------------------------


def gemma3_text_from_hf(hf: Any) -> ModelConfig:
    params = rope_params(hf)
    full, local = params.get("full_attention", params), params.get("sliding_attention")
    rope = rope_fields(
        SimpleNamespace(rope_parameters=full, max_position_embeddings=hf.max_position_embeddings)
    )
    fields = _fields(hf, rope)
    if fields.get("sliding_window_layers"):
        if local is None or local.get("rope_type", "default") != "default":
            raise NotImplementedError("gemma3 sliding layers need plain rope (rope_type 'default')")
        fields["sliding_rope_theta"] = float(local["rope_theta"])
    # transformers' Gemma 3 never soft-caps attention scores, whatever the config says.
    return ModelConfig(**fields, qk_norm=True)


def gemma3_text_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    _require_gemma(c, "gemma3_text", qk_norm=True, qk_norm_scope="head", attn_logit_softcap=None)
    if c.sliding_window is not None and c.sliding_rope_theta is None and c.rope_scaling:
        raise ValueError(
            "sliding_rope_theta=None with rope_scaling cannot be expressed as gemma3_text "
            "(its sliding layers rotate without scaling)"
        )
    rope = rope_to_hf(c)
    full = rope.get("rope_scaling") or dict(rope_type="default", rope_theta=c.rope_theta)
    local = dict(rope_type="default", rope_theta=c.sliding_rope_theta or c.rope_theta)
    kwargs = _kwargs(c, "Gemma3ForCausalLM")
    if kwargs["layer_types"] is None:
        kwargs["layer_types"] = ["full_attention"] * c.n_layers
    return transformers.Gemma3TextConfig(
        **kwargs, max_position_embeddings=rope["max_position_embeddings"],
        rope_parameters=dict(full_attention=full, sliding_attention=local),
    )  # fmt: skip


_GEMMA = frozenset({"embed_scale", "final_logit_softcap", "attn_scale_dim"})
FAMILIES = (
    Family(
        "gemma2", gemma2_from_hf, gemma2_to_hf, gemma_mapper,
        features=_GEMMA | {"attn_logit_softcap"},
    ),
    Family(
        "gemma3_text", gemma3_text_from_hf, gemma3_text_to_hf, gemma_mapper,
        features=_GEMMA | {"sliding_rope_theta"},
    ),
)  # fmt: skip
