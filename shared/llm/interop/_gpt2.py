"""GPT-2 and BLOOM: LayerNorm-with-bias families with learned positions or ALiBi.

GPT-2 stores linear weights as Conv1D, (in, out), so every projection is transposed
here, and its `c_attn` already fuses q|k|v in our order. BLOOM fuses q/k/v per head
((H, 3, hd) rows), which is regrouped into our (3, H, hd).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers

from llm.config import ModelConfig
from llm.interop._common import Family, Map, check_act, common_hf_kwargs, require, transposed

_LN_FAMILY = dict(
    attn_impl="mha", mlp_impl="mlp", norm_impl="layer_norm", norm_bias=True, norm_position="pre",
    attn_bias=True, attn_out_bias=True, mlp_bias=True, qk_norm=False, sliding_window=None,
    attn_scale_factor=1.0,
)  # fmt: skip

# -- GPT-2 ------------------------------------------------------------------------------------

_GPT2_LAYER = {
    "input_layernorm": "ln_1", "post_attention_layernorm": "ln_2", "self_attn.qkv_proj": "attn.c_attn",
    "self_attn.o_proj": "attn.c_proj", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj",
}  # fmt: skip
_GPT2_TOP = {"embed_tokens": "wte", "embed_positions": "wpe", "norm": "ln_f"}


def gpt2_mapper(name: str, c: ModelConfig) -> Map:
    if name == "lm_head.weight":
        return Map((name,))
    module, leaf = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, i, rest = module.split(".", 2)
        key = f"transformer.h.{i}.{_GPT2_LAYER[rest]}.{leaf}"
        return transposed(key) if leaf == "weight" else Map((key,))
    return Map((f"transformer.{_GPT2_TOP[module]}.{leaf}",))


def gpt2_from_hf(hf: Any) -> ModelConfig:
    check_act(hf, "gelu_new", "gelu_pytorch_tanh", field_name="activation_function")
    if not hf.scale_attn_weights or hf.scale_attn_by_inverse_layer_idx:
        raise NotImplementedError("GPT-2 attention scaling variants are not supported")
    return ModelConfig(
        vocab_size=hf.vocab_size, dim=hf.n_embd, n_layers=hf.n_layer, n_heads=hf.n_head,
        hidden_dim=hf.n_inner or 4 * hf.n_embd, max_seq_len=hf.n_positions,
        norm_eps=hf.layer_norm_epsilon, position="learned", tie_embeddings=hf.tie_word_embeddings,
        init_std=hf.initializer_range, **{k: v for k, v in _LN_FAMILY.items() if k != "norm_bias"},
    )  # fmt: skip


def gpt2_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    require(c, "gpt2", position="learned", embed_norm=False, n_kv_heads=c.n_heads, **_LN_FAMILY)
    if c.head_dim * c.n_heads != c.dim:
        raise ValueError(f"head_dim={c.head_dim} cannot be expressed as gpt2 (needs dim / n_heads)")
    return transformers.GPT2Config(
        n_embd=c.dim, n_layer=c.n_layers, n_head=c.n_heads, n_inner=c.hidden_dim,
        n_positions=c.max_seq_len, layer_norm_epsilon=c.norm_eps, activation_function="gelu_new",
        **common_hf_kwargs(c, "GPT2LMHeadModel"),
    )  # fmt: skip


# -- BLOOM ------------------------------------------------------------------------------------

_BLOOM_LAYER = {
    "input_layernorm": "input_layernorm", "post_attention_layernorm": "post_attention_layernorm",
    "self_attn.qkv_proj": "self_attention.query_key_value", "self_attn.o_proj": "self_attention.dense",
    "mlp.up_proj": "mlp.dense_h_to_4h", "mlp.down_proj": "mlp.dense_4h_to_h",
}  # fmt: skip
_BLOOM_TOP = {
    "embed_tokens": "word_embeddings",
    "embed_norm": "word_embeddings_layernorm",
    "norm": "ln_f",
}


def _per_head_qkv(key: str, c: ModelConfig) -> Map:
    H, hd = c.n_heads, c.head_dim

    def join(ts: list[torch.Tensor]) -> torch.Tensor:
        t = ts[0]
        return t.view(H, 3, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape)  # (3, H, hd, ...)

    def split(t: torch.Tensor) -> list[torch.Tensor]:
        return [t.view(3, H, hd, *t.shape[1:]).transpose(0, 1).reshape(t.shape)]  # (H, 3, hd, ...)

    return Map((key,), join=join, split=split)


def bloom_mapper(name: str, c: ModelConfig) -> Map:
    if name == "lm_head.weight":
        return Map((name,))
    module, leaf = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, i, rest = module.split(".", 2)
        key = f"transformer.h.{i}.{_BLOOM_LAYER[rest]}.{leaf}"
        return _per_head_qkv(key, c) if rest == "self_attn.qkv_proj" else Map((key,))
    return Map((f"transformer.{_BLOOM_TOP[module]}.{leaf}",))


def bloom_from_hf(hf: Any) -> ModelConfig:
    if hf.apply_residual_connection_post_layernorm:
        raise NotImplementedError("apply_residual_connection_post_layernorm=True is not supported")
    return ModelConfig(
        vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.n_layer, n_heads=hf.n_head,
        hidden_dim=4 * hf.hidden_size, max_seq_len=getattr(hf, "seq_length", None) or 2048,
        norm_eps=hf.layer_norm_epsilon, position="alibi", embed_norm=True,
        tie_embeddings=hf.tie_word_embeddings, init_std=hf.initializer_range,
        **{k: v for k, v in _LN_FAMILY.items() if k != "norm_bias"},
    )  # fmt: skip


def bloom_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    require(
        c, "bloom", position="alibi", embed_norm=True, n_kv_heads=c.n_heads,
        hidden_dim=4 * c.dim, **_LN_FAMILY,
    )  # fmt: skip
    if c.head_dim * c.n_heads != c.dim:
        raise ValueError(
            f"head_dim={c.head_dim} cannot be expressed as bloom (needs dim / n_heads)"
        )
    hf = transformers.BloomConfig(
        hidden_size=c.dim, n_layer=c.n_layers, n_head=c.n_heads, layer_norm_epsilon=c.norm_eps,
        **common_hf_kwargs(c, "BloomForCausalLM"),
    )  # fmt: skip
    hf.seq_length = c.max_seq_len  # BLOOM has no position limit; keep ours for the round trip
    return hf


FAMILIES = (
    Family("gpt2", gpt2_from_hf, gpt2_to_hf, gpt2_mapper),
    Family("bloom", bloom_from_hf, bloom_to_hf, bloom_mapper),
)
