"""The Llama-shaped families: Llama, Mistral, Qwen2, Qwen3 and their MoE relatives
Mixtral, Qwen2-MoE and Qwen3-MoE.

They share one checkpoint layout (`model.layers.N.self_attn.q_proj`, ...), which our
names follow, so the key map is nearly the identity: q/k/v are fused into `qkv_proj`
here, and routed experts are stacked into fixed-shape tensors. Where they differ is
configuration: biases, q/k norm, which layers slide, and routing.
"""

from __future__ import annotations

from typing import Any

import transformers

from llm.config import ModelConfig
from llm.interop._common import (
    Family,
    Map,
    Mapper,
    check_act,
    common_hf_kwargs,
    concat,
    experts,
    qkv_sizes,
    require,
    require_rope,
    rope_fields,
    rope_to_hf,
)

# -- key map ----------------------------------------------------------------------------------


def llama_mapper(
    moe_block: str = "mlp",
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
) -> Mapper:
    """Key map for the Llama layout; `moe_block` / `expert_names` name the on-disk MoE
    tensors (Mixtral: `block_sparse_moe`, w1/w3/w2)."""
    gate, up, down = expert_names

    def mapper(name: str, c: ModelConfig) -> Map:
        if name == "lm_head.weight":
            return Map((name,))
        hf = f"model.{name}"
        if ".qkv_proj." in name:
            return concat(
                [hf.replace("qkv_proj", p) for p in ("q_proj", "k_proj", "v_proj")], qkv_sizes(c)
            )
        if name.startswith("layers.") and c.layer_is_moe(int(name.split(".")[1])):
            layer, leaf = name.split(".")[1], name.split(".mlp.", 1)[1] if ".mlp." in name else None
            disk, memory = f"model.layers.{layer}.{moe_block}", f"model.layers.{layer}.mlp"
            if leaf == "gate.weight":
                return Map((f"{disk}.gate.weight",), fused=f"{memory}.gate.weight")
            if leaf == "experts.gate_up_proj":
                keys = (f"{disk}.experts.{{e}}.{gate}.weight", f"{disk}.experts.{{e}}.{up}.weight")
                return experts(c.n_experts, keys, None, fused=f"{memory}.experts.gate_up_proj")
            if leaf == "experts.down_proj":
                key = f"{disk}.experts.{{e}}.{down}.weight"
                return experts(c.n_experts, None, key, fused=f"{memory}.experts.down_proj")
        return Map((hf,))

    return mapper


# -- config: shared parts ---------------------------------------------------------------------


def _base_fields(hf: Any, **rope: Any) -> dict[str, Any]:
    """The Llama-layout fields; `rope` goes to `rope_fields` (scaling kinds, partial rotary)."""
    check_act(hf, "silu")
    return dict(
        vocab_size=hf.vocab_size,
        dim=hf.hidden_size,
        hidden_dim=hf.intermediate_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        n_kv_heads=getattr(hf, "num_key_value_heads", None),
        head_dim=getattr(hf, "head_dim", None),
        norm_eps=hf.rms_norm_eps,
        tie_embeddings=hf.tie_word_embeddings,
        init_std=hf.initializer_range,
        **rope_fields(hf, **rope),
    )


def _base_kwargs(
    c: ModelConfig, family: str, architecture: str, norm_position: str = "pre", **rope: Any
) -> dict[str, Any]:
    """The Llama-layout kwargs; `rope` goes to `require_rope` (scaling kinds, partial rotary)."""
    require_rope(c, family, **rope)
    require(
        c, family, attn_impl="mha", norm_impl="rms_norm", position="rope",
        norm_position=norm_position, embed_norm=False, attn_scale_factor=1.0,
        qk_norm_scope="all_heads" if norm_position == "output" else "head",
    )  # fmt: skip
    return dict(
        hidden_size=c.dim,
        intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        num_key_value_heads=c.n_kv_heads,
        head_dim=c.head_dim,
        hidden_act="silu",
        rms_norm_eps=c.norm_eps,
        **rope_to_hf(c),
        **common_hf_kwargs(c, architecture),
    )


def _sliding_from_layer_types(hf: Any) -> dict[str, Any]:
    """Qwen2/Qwen3: `layer_types` lists which layers slide (derived from max_window_layers)."""
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None) or []
    sliding = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    if not window or not sliding:
        return {}
    return dict(sliding_window=window, sliding_window_layers=sliding)


def _sliding_to_layer_types(c: ModelConfig) -> dict[str, Any]:
    if c.sliding_window is None:
        return dict(use_sliding_window=False)
    layer_types = [
        "sliding_attention" if c.layer_window(i) else "full_attention" for i in range(c.n_layers)
    ]
    return dict(use_sliding_window=True, sliding_window=c.sliding_window, layer_types=layer_types)


def _whole_model_window(hf: Any) -> dict[str, Any]:
    """Mistral/Mixtral/Qwen3-MoE: one window for every layer, or none."""
    window = getattr(hf, "sliding_window", None)
    return dict(sliding_window=window) if window else {}


def _require_whole_model_window(c: ModelConfig, family: str) -> None:
    if c.sliding_window is not None and len(c.sliding_window_layers) != c.n_layers:
        raise ValueError(
            f"sliding_window_layers={c.sliding_window_layers} cannot be expressed as {family} "
            "(its window applies to every layer)"
        )


def _require_dense(c: ModelConfig, family: str) -> None:
    if c.mlp_impl != "swiglu":
        raise ValueError(
            f"mlp_impl={c.mlp_impl!r} cannot be expressed as {family} (needs 'swiglu')"
        )


def _bias_from_flag(hf: Any) -> dict[str, Any]:
    flag = getattr(hf, "attention_bias", False)
    return dict(attn_bias=flag, attn_out_bias=flag)


def _require_one_bias_flag(c: ModelConfig, family: str) -> None:
    if c.attn_bias != c.attn_out_bias:
        raise ValueError(
            f"attn_bias={c.attn_bias} and attn_out_bias={c.attn_out_bias} must match: "
            f"{family}'s attention_bias covers q/k/v and o_proj alike"
        )


# -- dense families ---------------------------------------------------------------------------


def llama_from_hf(hf: Any) -> ModelConfig:
    return ModelConfig(
        **_base_fields(hf), **_bias_from_flag(hf), mlp_bias=getattr(hf, "mlp_bias", False)
    )


def llama_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    _require_dense(c, "llama")
    require(c, "llama", sliding_window=None, qk_norm=False)
    _require_one_bias_flag(c, "llama")
    return transformers.LlamaConfig(
        **_base_kwargs(c, "llama", "LlamaForCausalLM"),
        attention_bias=c.attn_bias,
        mlp_bias=c.mlp_bias,
    )


def mistral_from_hf(hf: Any) -> ModelConfig:
    return ModelConfig(**_base_fields(hf), **_whole_model_window(hf))


def mistral_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    _require_dense(c, "mistral")
    require(c, "mistral", attn_bias=False, attn_out_bias=False, mlp_bias=False, qk_norm=False)
    _require_whole_model_window(c, "mistral")
    return transformers.MistralConfig(
        **_base_kwargs(c, "mistral", "MistralForCausalLM"), sliding_window=c.sliding_window
    )


def qwen2_from_hf(hf: Any) -> ModelConfig:
    # Qwen2 always has q/k/v biases and never an o_proj bias.
    return ModelConfig(
        **_base_fields(hf), **_sliding_from_layer_types(hf), attn_bias=True, attn_out_bias=False
    )


def qwen2_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    _require_dense(c, "qwen2")
    require(c, "qwen2", attn_bias=True, attn_out_bias=False, mlp_bias=False, qk_norm=False)
    return transformers.Qwen2Config(
        **_base_kwargs(c, "qwen2", "Qwen2ForCausalLM"), **_sliding_to_layer_types(c)
    )


def qwen3_from_hf(hf: Any) -> ModelConfig:
    return ModelConfig(
        **_base_fields(hf), **_sliding_from_layer_types(hf), **_bias_from_flag(hf), qk_norm=True
    )


def qwen3_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    _require_dense(c, "qwen3")
    require(c, "qwen3", mlp_bias=False, qk_norm=True)
    _require_one_bias_flag(c, "qwen3")
    return transformers.Qwen3Config(
        **_base_kwargs(c, "qwen3", "Qwen3ForCausalLM"), attention_bias=c.attn_bias,
        **_sliding_to_layer_types(c),
    )  # fmt: skip


# -- MoE families -----------------------------------------------------------------------------


def _require_moe(c: ModelConfig, family: str, **expected: Any) -> None:
    if c.mlp_impl != "moe":
        raise ValueError(f"mlp_impl={c.mlp_impl!r} cannot be expressed as {family} (needs 'moe')")
    if c.router_order == "sigmoid_topk":
        raise ValueError(f"router_order='sigmoid_topk' cannot be expressed as {family}")
    require(
        c, family, mlp_bias=False, router_scale=1.0, router_n_groups=None, router_z_loss_coef=0.0,
        **expected,
    )  # fmt: skip


def _renormalized(c: ModelConfig) -> bool:
    # Softmax over the top-k logits equals renormalised top-k of the full softmax.
    return c.router_renormalize or c.router_order == "topk_softmax"


def _sparse_layers_from_hf(hf: Any) -> tuple[int, ...]:
    """Qwen-MoE: dense where listed in mlp_only_layers or off the decoder_sparse_step grid."""
    only = set(getattr(hf, "mlp_only_layers", None) or [])
    step = getattr(hf, "decoder_sparse_step", 1)
    return tuple(i for i in range(hf.num_hidden_layers) if i in only or (i + 1) % step)


def _moe_fields(hf: Any, n_experts: int, renormalize: bool) -> dict[str, Any]:
    return dict(
        mlp_impl="moe", n_experts=n_experts, n_experts_per_tok=hf.num_experts_per_tok,
        router_renormalize=renormalize, router_aux_loss_coef=hf.router_aux_loss_coef,
    )  # fmt: skip


def _moe_kwargs(c: ModelConfig) -> dict[str, Any]:
    return dict(
        num_experts_per_tok=c.n_experts_per_tok, router_aux_loss_coef=c.router_aux_loss_coef,
        mlp_only_layers=list(c.moe_dense_layers),
    )  # fmt: skip


def mixtral_from_hf(hf: Any) -> ModelConfig:
    fields = _base_fields(hf)
    return ModelConfig(
        **fields, **_whole_model_window(hf), **_moe_fields(hf, hf.num_local_experts, True),
        moe_hidden_dim=hf.intermediate_size,
    )  # fmt: skip


def mixtral_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    _require_moe(
        c, "mixtral", moe_dense_layers=(), shared_expert_hidden_dim=None, attn_bias=False,
        attn_out_bias=False, qk_norm=False,
    )  # fmt: skip
    if not _renormalized(c):
        raise ValueError(
            "router_renormalize=False cannot be expressed as mixtral (it renormalises)"
        )
    _require_whole_model_window(c, "mixtral")
    kwargs = _base_kwargs(c, "mixtral", "MixtralForCausalLM")
    kwargs.update(intermediate_size=c.moe_hidden_dim)
    return transformers.MixtralConfig(
        **kwargs, sliding_window=c.sliding_window, num_local_experts=c.n_experts,
        num_experts_per_tok=c.n_experts_per_tok, router_aux_loss_coef=c.router_aux_loss_coef,
    )  # fmt: skip


def qwen2_moe_from_hf(hf: Any) -> ModelConfig:
    shared = hf.shared_expert_intermediate_size
    return ModelConfig(
        **_base_fields(hf), **_sliding_from_layer_types(hf),
        **_moe_fields(hf, hf.num_experts, hf.norm_topk_prob), moe_hidden_dim=hf.moe_intermediate_size,
        moe_dense_layers=_sparse_layers_from_hf(hf), shared_expert_hidden_dim=shared or None,
        shared_expert_gate=bool(shared), attn_bias=True, attn_out_bias=False,
    )  # fmt: skip


def qwen2_moe_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    # Qwen2-MoE always builds a gated shared expert and q/k/v biases.
    _require_moe(
        c, "qwen2_moe", shared_expert_gate=True, attn_bias=True, attn_out_bias=False, qk_norm=False
    )
    return transformers.Qwen2MoeConfig(
        **_base_kwargs(c, "qwen2_moe", "Qwen2MoeForCausalLM"), **_sliding_to_layer_types(c),
        **_moe_kwargs(c), num_experts=c.n_experts, moe_intermediate_size=c.moe_hidden_dim,
        shared_expert_intermediate_size=c.shared_expert_hidden_dim,
        norm_topk_prob=_renormalized(c),
    )  # fmt: skip


def qwen3_moe_from_hf(hf: Any) -> ModelConfig:
    return ModelConfig(
        **_base_fields(hf), **_whole_model_window(hf), **_bias_from_flag(hf), qk_norm=True,
        **_moe_fields(hf, hf.num_experts, hf.norm_topk_prob), moe_hidden_dim=hf.moe_intermediate_size,
        moe_dense_layers=_sparse_layers_from_hf(hf),
    )  # fmt: skip


def qwen3_moe_to_hf(c: ModelConfig) -> transformers.PretrainedConfig:
    _require_moe(c, "qwen3_moe", shared_expert_hidden_dim=None, qk_norm=True)
    _require_one_bias_flag(c, "qwen3_moe")
    _require_whole_model_window(c, "qwen3_moe")
    return transformers.Qwen3MoeConfig(
        **_base_kwargs(c, "qwen3_moe", "Qwen3MoeForCausalLM"), attention_bias=c.attn_bias,
        use_sliding_window=c.sliding_window is not None, sliding_window=c.sliding_window,
        **_moe_kwargs(c), num_experts=c.n_experts, moe_intermediate_size=c.moe_hidden_dim,
        norm_topk_prob=_renormalized(c),
    )  # fmt: skip


FAMILIES = (
    Family("llama", llama_from_hf, llama_to_hf, llama_mapper()),
    Family("mistral", mistral_from_hf, mistral_to_hf, llama_mapper()),
    Family("qwen2", qwen2_from_hf, qwen2_to_hf, llama_mapper()),
    Family("qwen3", qwen3_from_hf, qwen3_to_hf, llama_mapper()),
    Family(
        "mixtral",
        mixtral_from_hf,
        mixtral_to_hf,
        llama_mapper("block_sparse_moe", ("w1", "w3", "w2")),
    ),
    Family("qwen2_moe", qwen2_moe_from_hf, qwen2_moe_to_hf, llama_mapper()),
    Family("qwen3_moe", qwen3_moe_from_hf, qwen3_moe_to_hf, llama_mapper()),
)
