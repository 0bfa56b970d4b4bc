"""Hugging Face <-> `DecoderModel` conversion for the Llama family.

Our parameter names follow the HF checkpoint standard (STYLE.md 8), so the differences
are few: HF nests the base model under `model.`, keeps q/k/v as three projections where
we fuse them into `qkv_proj`, and may omit a tied `lm_head`. Every such rule lives in
this one module so the importer and the exporter cannot drift apart, and nothing else
in the library knows HF names.

Checkpoint directories are read with `safetensors.safe_open` (one file, or shards listed
in `model.safetensors.index.json`), so importing never instantiates the HF model class.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from llm.config import ModelConfig
from llm.models.decoder import DecoderModel

SUPPORTED_MODEL_TYPES = ("llama",)
_QKV = ("q_proj", "k_proj", "v_proj")
# Buffers some older checkpoints saved; we rebuild them from the config instead.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# -- config ---------------------------------------------------------------------------------


def _check_model_type(model_type: str | None) -> None:
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"unsupported Hugging Face model_type {model_type!r}; "
            f"supported: {list(SUPPORTED_MODEL_TYPES)}"
        )


def _rope_theta(hf_config: transformers.PretrainedConfig) -> float:
    # transformers 5 keeps rope settings in `rope_parameters`; 4.x has a `rope_theta`
    # attribute plus an optional `rope_scaling` dict. Only unscaled rope matches `rope_tables`.
    params = (
        getattr(hf_config, "rope_parameters", None)
        or getattr(hf_config, "rope_scaling", None)
        or {}
    )
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"rope_type={rope_type!r} is not supported (only 'default')")
    return float(params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)))


def config_from_hf(hf_config: transformers.PretrainedConfig) -> ModelConfig:
    """Translate a Hugging Face Llama config; other families raise `ValueError`."""
    _check_model_type(getattr(hf_config, "model_type", None))
    if hf_config.hidden_act != "silu":
        raise ValueError(
            f"hidden_act={hf_config.hidden_act!r} is not supported (Llama uses 'silu')"
        )
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        dim=hf_config.hidden_size,
        hidden_dim=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_heads=hf_config.num_attention_heads,
        n_kv_heads=getattr(hf_config, "num_key_value_heads", None),
        head_dim=getattr(hf_config, "head_dim", None),
        max_seq_len=hf_config.max_position_embeddings,
        attn_impl="mha",
        mlp_impl="swiglu",
        norm_impl="rms_norm",
        norm_eps=hf_config.rms_norm_eps,
        rope_theta=_rope_theta(hf_config),
        # Llama's one flag covers q/k/v and o_proj alike.
        attn_bias=hf_config.attention_bias,
        attn_out_bias=hf_config.attention_bias,
        mlp_bias=getattr(hf_config, "mlp_bias", False),
        tie_embeddings=hf_config.tie_word_embeddings,
        init_std=hf_config.initializer_range,
    )


def config_to_hf(config: ModelConfig) -> transformers.LlamaConfig:
    """Express `config` as a `LlamaConfig`; fields Llama cannot express raise `ValueError`.

    `dropout` is not carried over: it only matters in training, not for the weights' meaning.
    """
    for field, llama_value in (
        ("attn_impl", "mha"),
        ("mlp_impl", "swiglu"),
        ("norm_impl", "rms_norm"),
        ("position", "rope"),
    ):
        if getattr(config, field) != llama_value:
            raise ValueError(
                f"{field}={getattr(config, field)!r} cannot be expressed as Llama "
                f"(needs {llama_value!r})"
            )
    if config.attn_bias != config.attn_out_bias:
        raise ValueError(
            f"attn_bias={config.attn_bias} and attn_out_bias={config.attn_out_bias} must match: "
            "Llama's attention_bias covers q/k/v and o_proj alike"
        )
    return transformers.LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.dim,
        intermediate_size=config.hidden_dim,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        hidden_act="silu",
        rms_norm_eps=config.norm_eps,
        rope_theta=config.rope_theta,  # the one spelling both transformers 4 and 5 accept
        attention_bias=config.attn_bias,
        mlp_bias=config.mlp_bias,
        tie_word_embeddings=config.tie_embeddings,
        initializer_range=config.init_std,
        # Token ids belong to the tokenizer, not ModelConfig; Llama's defaults (1, 2) would lie.
        bos_token_id=None,
        eos_token_id=None,
        architectures=["LlamaForCausalLM"],
    )


# -- state dicts ----------------------------------------------------------------------------


def _hf_keys(name: str) -> list[str]:
    """The HF keys holding our parameter `name`: three (q, k, v) for the fused qkv_proj."""
    if ".qkv_proj." in name:
        return [key for p in _QKV for key in _hf_keys(name.replace(".qkv_proj.", f".{p}."))]
    # Everything except the output head lives in HF's base model, `model.`.
    return [name if name.startswith("lm_head.") else f"model.{name}"]


def _qkv_sizes(config: ModelConfig) -> list[int]:
    kv = config.n_kv_heads * config.head_dim
    return [config.n_heads * config.head_dim, kv, kv]


def _param_names(config: ModelConfig) -> list[str]:
    """Our state-dict names for `config`, without a tied lm_head (it is the embedding)."""
    with torch.device("meta"):  # names only: allocate nothing
        names = list(DecoderModel(config).state_dict())
    return [n for n in names if not (config.tie_embeddings and n == "lm_head.weight")]


def state_dict_to_hf(model: DecoderModel) -> dict[str, torch.Tensor]:
    """The model's weights under HF Llama keys: qkv split, no lm_head when tied."""
    config, sd = model.config, model.state_dict()
    names = _param_names(config)
    if extra := sorted(set(sd) - set(names) - {"lm_head.weight"}):
        raise ValueError(f"parameters with no Hugging Face Llama equivalent: {extra}")
    out: dict[str, torch.Tensor] = {}
    for name in names:
        keys = _hf_keys(name)
        parts = sd[name].split(_qkv_sizes(config)) if len(keys) > 1 else (sd[name],)
        for key, t in zip(keys, parts, strict=True):
            out[key] = t.detach().contiguous()
    return out


def state_dict_from_hf(
    sd: Mapping[str, torch.Tensor], config: ModelConfig
) -> dict[str, torch.Tensor]:
    """Map HF Llama tensors to exactly `DecoderModel(config).state_dict()`'s keys.

    A tied lm_head is filled in with the embedding, so `load_state_dict(strict=True)`
    accepts the result. A missing tensor raises `KeyError` naming the HF key; a tensor
    nothing maps to raises `ValueError` (rather than silently dropping weights).
    """
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for name in _param_names(config):
        keys = _hf_keys(name)
        if missing := [k for k in keys if k not in sd]:
            raise KeyError(f"Hugging Face checkpoint has no tensor {missing[0]!r} (for {name!r})")
        out[name] = torch.cat([sd[k] for k in keys]) if len(keys) > 1 else sd[keys[0]]
        used.update(keys)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
        used.add("lm_head.weight")  # tied HF models may still list it (the same tensor)
    if extra := sorted(k for k in sd if k not in used and not k.endswith(_IGNORED_SUFFIXES)):
        raise ValueError(f"unexpected tensors in the Hugging Face checkpoint: {extra}")
    return out


# -- models and directories -----------------------------------------------------------------


def _read_dir(
    path: Path, device: torch.device | str
) -> tuple[transformers.PretrainedConfig, dict[str, torch.Tensor]]:
    # Check the raw model_type first so an unknown family gets our message, not AutoConfig's.
    _check_model_type(json.loads((path / "config.json").read_text()).get("model_type"))
    hf_config = transformers.AutoConfig.from_pretrained(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        files = [single]
    elif index.exists():
        files = sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        raise FileNotFoundError(f"{path} has neither {single.name} nor {index.name}")
    sd: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a Mapping)
                sd[key] = f.get_tensor(key)
    return hf_config, sd


def from_hf(
    model_or_dir: str | os.PathLike[str] | transformers.PreTrainedModel,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> DecoderModel:
    """Build a `DecoderModel` from a loaded `LlamaForCausalLM` or a local checkpoint dir.

    `dtype=None` keeps the checkpoint's dtype. From a loaded model, tensors already on
    `device` in `dtype` are shared with it, not copied (the fused qkv always is a copy).
    """
    if isinstance(model_or_dir, transformers.PreTrainedModel):
        hf_config, hf_sd = model_or_dir.config, model_or_dir.state_dict()
    else:
        hf_config, hf_sd = _read_dir(Path(model_or_dir), device)
    config = config_from_hf(hf_config)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in state_dict_from_hf(hf_sd, config).items()}
    # Build without allocating or initialising weights, then adopt the loaded tensors.
    with torch.device("meta"):
        model = DecoderModel(config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()  # assign=True gave lm_head its own Parameter; share the embedding again
    model.reset_buffers(device)  # rope tables are not in checkpoints and were never built on meta
    return model


def to_hf(model: DecoderModel, out_dir: str | os.PathLike[str]) -> None:
    """Write `config.json` and `model.safetensors` that `transformers` loads as Llama."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_config = config_to_hf(model.config)
    # Lets `from_pretrained(dtype="auto")` restore e.g. bf16 instead of upcasting.
    hf_config.dtype = model.embed_tokens.weight.dtype
    hf_config.save_pretrained(out)
    tensors = {k: v.cpu() for k, v in state_dict_to_hf(model).items()}
    # transformers checks this metadata before trusting a safetensors file as PyTorch.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
