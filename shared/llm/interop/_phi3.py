"""Phi-3: the Llama layout with fused projections, LongRoPE and partial rotary.

q|k|v are already fused in `qkv_proj` in our order; the MLP's `gate_up_proj` holds our
`gate_proj` and `up_proj` stacked (gate first). RoPE is plain or LongRoPE, rotating the
leading `partial_rotary_factor` of each head (Phi-4-mini). A `sliding_window` applies to
every layer.
"""

from __future__ import annotations

from typing import Any

import transformers

from llm.config import ModelConfig
from llm.interop._common import Family, Map, chunk_of, require, rope_params
from llm.interop._llama import (
    _base_fields,
    _base_kwargs,
    _require_dense,
    _require_whole_model_window,
    _whole_model_window,
)


def phi3_mapper(name: str, c: ModelConfig) -> Map:
    if name == "lm_head.weight":
        return Map((name,))
    for i, part in enumerate(("gate_proj", "up_proj")):
        if f".mlp.{part}." in name:
            return chunk_of(f"model.{name.replace(part, 'gate_up_proj')}", i, 2)
    return Map((f"model.{name}",))


def phi3_from_hf(hf: Any) -> ModelConfig:
    fields = _base_fields(hf, kinds=("longrope",), partial_rotary=True)
    params = rope_params(hf)
    if fields.get("rope_scaling") is not None and "original_max_position_embeddings" not in params:
        raise ValueError("longrope needs original_max_position_embeddings")
    factor = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
    head_dim = fields["head_dim"] or hf.hidden_size // hf.num_attention_heads
    if factor != 1.0:
        fields["rotary_dim"] = int(head_dim * factor)
    return ModelConfig(**fields, **_whole_model_window(hf))


def phi3_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    _require_dense(c, "phi3")
    require(
        c, "phi3", attn_bias=False, attn_out_bias=False, mlp_bias=False, qk_norm=False,
        head_dim=c.dim // c.n_heads,
    )  # fmt: skip
    _require_whole_model_window(c, "phi3")
    kwargs = _base_kwargs(c, "phi3", "Phi3ForCausalLM", kinds=("longrope",), partial_rotary=True)
    del kwargs["head_dim"]  # Phi-3 derives it from hidden_size / num_attention_heads
    factor = c.rope_dim / c.head_dim
    if int(c.head_dim * factor) != c.rope_dim:
        raise ValueError(
            f"rotary_dim={c.rotary_dim} cannot be expressed as a partial_rotary_factor"
        )
    params = kwargs.pop("rope_scaling", None) or dict(rope_type="default", rope_theta=c.rope_theta)
    params["partial_rotary_factor"] = factor
    original = params.get("original_max_position_embeddings", c.max_seq_len)
    return transformers.Phi3Config(
        **kwargs, rope_parameters=params, original_max_position_embeddings=original,
        sliding_window=c.sliding_window, pad_token_id=None,
    )  # fmt: skip


FAMILIES = (
    Family("phi3", phi3_from_hf, phi3_to_hf, phi3_mapper, features=frozenset({"rotary_dim"})),
)
