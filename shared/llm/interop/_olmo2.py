"""OLMo 2: the Llama layout with the norms moved onto the sublayer outputs.

Each block computes `x + norm(attn(x))` and `x + norm(mlp(x))` (no norm on the
sublayer inputs) and normalises q and k over the whole projection, all heads at once,
before splitting them into heads. HF names the two output norms
`post_attention_layernorm` and `post_feedforward_layernorm`; ours are
`attn_output_norm` and `mlp_output_norm`.
"""

from __future__ import annotations

from typing import Any

import transformers

from llm.config import ModelConfig
from llm.interop._common import Family, Map, require
from llm.interop._llama import (
    _base_fields,
    _base_kwargs,
    _bias_from_flag,
    _require_dense,
    _require_one_bias_flag,
    llama_mapper,
)

_llama_keys = llama_mapper()
_OUTPUT_NORMS = {
    ".attn_output_norm.": ".post_attention_layernorm.",
    ".mlp_output_norm.": ".post_feedforward_layernorm.",
}


def olmo2_mapper(name: str, c: ModelConfig) -> Map:
    for ours, theirs in _OUTPUT_NORMS.items():
        if ours in name:
            return Map((f"model.{name.replace(ours, theirs)}",))
    return _llama_keys(name, c)


def olmo2_from_hf(hf: Any) -> ModelConfig:
    return ModelConfig(
        **_base_fields(hf), **_bias_from_flag(hf), norm_position="output", qk_norm=True,
        qk_norm_scope="all_heads",
    )  # fmt: skip


def olmo2_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    _require_dense(c, "olmo2")
    require(c, "olmo2", sliding_window=None, qk_norm=True, mlp_bias=False)
    _require_one_bias_flag(c, "olmo2")
    return transformers.Olmo2Config(
        **_base_kwargs(c, "olmo2", "Olmo2ForCausalLM", norm_position="output"),
        attention_bias=c.attn_bias,
    )


FAMILIES = (
    Family(
        "olmo2", olmo2_from_hf, olmo2_to_hf, olmo2_mapper, features=frozenset({"qk_norm_scope"})
    ),
)
