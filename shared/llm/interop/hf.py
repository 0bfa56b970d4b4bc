"""Hugging Face <-> `DecoderModel` conversion for every supported family.

Supported `model_type`s: llama, mistral, qwen2, qwen3, mixtral, qwen2_moe, qwen3_moe,
deepseek_v2, deepseek_v3, gpt2, bloom, olmo2, phi3, gemma2, gemma3_text, gpt_oss. Our
parameter names follow the HF checkpoint standard, so most keys map by prefix; each
family's exceptions (fused q/k/v, stacked experts, Conv1D transposes, DeepSeek's
interleaved rope dims, BLOOM's per-head q/k/v, OLMo 2's and Gemma's norm names, Phi-3's
fused gate_up_proj, gpt-oss's interleaved transposed experts) live in its private module
next to this one (`_llama`, `_deepseek`, `_gpt2`, `_olmo2`, `_phi3`, `_gemma`,
`_gpt_oss`), and nothing else in the library knows HF names.

Checkpoint directories are read with `safetensors.safe_open` (one file, or shards listed
in `model.safetensors.index.json`), so importing never instantiates the HF model class.
Exports write the on-disk layout `transformers.AutoModelForCausalLM.from_pretrained`
loads (one tensor per expert for MoE families, as the Hub checkpoints have it).
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
from llm.interop import _deepseek, _gemma, _gpt2, _gpt_oss, _llama, _olmo2, _phi3
from llm.interop._common import Family, from_hf_tensors, to_hf_tensors
from llm.models.decoder import DecoderModel

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        *_llama.FAMILIES,
        *_deepseek.FAMILIES,
        *_gpt2.FAMILIES,
        *_olmo2.FAMILIES,
        *_phi3.FAMILIES,
        *_gemma.FAMILIES,
        *_gpt_oss.FAMILIES,
    )
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# Which family a native config exports as: the first that can express it.
_EXPORT_ORDER = (
    "deepseek_v2", "deepseek_v3", "bloom", "gpt2", "mixtral", "qwen2_moe", "qwen3_moe", "llama", "mistral",
    "qwen2", "qwen3", "olmo2", "phi3", "gemma2", "gemma3_text", "gpt_oss",
)  # fmt: skip


def _family(model_type: str | None) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported Hugging Face model_type {model_type!r}; "
            f"supported: {list(SUPPORTED_MODEL_TYPES)}"
        )
    return FAMILIES[model_type]


# -- config ---------------------------------------------------------------------------------


def config_from_hf(hf_config: transformers.PretrainedConfig) -> ModelConfig:
    """Translate a Hugging Face config; unsupported families or settings raise, naming them."""
    return _family(getattr(hf_config, "model_type", None)).config_from_hf(hf_config)


def infer_model_type(config: ModelConfig) -> str:
    """The HF family `config` exports as by default: the first in a fixed order that can
    express every field (plain configs become llama)."""
    reasons = []
    for model_type in _EXPORT_ORDER:
        try:
            FAMILIES[model_type].config_to_hf(config)
        except ValueError as e:
            reasons.append(f"{model_type}: {e}")
        else:
            return model_type
    raise ValueError("no Hugging Face family can express this config:\n  " + "\n  ".join(reasons))


def config_to_hf(
    config: ModelConfig, model_type: str | None = None
) -> transformers.PretrainedConfig:
    """Express `config` as an HF config of `model_type` (default: `infer_model_type`).

    Fields the family cannot express raise `ValueError` naming them. `dropout` is not
    carried over: it only matters in training, not for the weights' meaning.
    """
    return _family(model_type or infer_model_type(config)).config_to_hf(config)


# -- state dicts ----------------------------------------------------------------------------


def state_dict_to_hf(model: DecoderModel, model_type: str | None = None) -> dict[str, torch.Tensor]:
    """The model's weights under the HF keys of `model_type` (default: inferred)."""
    return to_hf_tensors(model, _family(model_type or infer_model_type(model.config)))


def state_dict_from_hf(
    sd: Mapping[str, torch.Tensor], config: ModelConfig, model_type: str | None = None
) -> dict[str, torch.Tensor]:
    """Map HF tensors of `model_type` (default: inferred from `config`) to exactly
    `DecoderModel(config).state_dict()`'s keys.

    A tied lm_head is filled in with the embedding, so `load_state_dict(strict=True)`
    accepts the result. A missing tensor raises `KeyError` naming the HF key; a tensor
    nothing maps to raises `ValueError` (rather than silently dropping weights). MoE
    experts are accepted both per expert (checkpoints) and fused (transformers 5 in memory).
    """
    return from_hf_tensors(sd, config, _family(model_type or infer_model_type(config)))


# -- models and directories -----------------------------------------------------------------


def _read_dir(
    path: Path, device: torch.device | str
) -> tuple[transformers.PretrainedConfig, dict[str, torch.Tensor]]:
    # Check the raw model_type first so an unknown family gets our message, not AutoConfig's.
    _family(json.loads((path / "config.json").read_text()).get("model_type"))
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
    """Build a `DecoderModel` from a loaded HF causal LM or a local checkpoint directory.

    `dtype=None` keeps the checkpoint's dtype. From a loaded model, tensors already on
    `device` in `dtype` are shared with it, not copied (fused or permuted ones are copies).
    """
    if isinstance(model_or_dir, transformers.PreTrainedModel):
        hf_config, hf_sd = model_or_dir.config, model_or_dir.state_dict()
    else:
        hf_config, hf_sd = _read_dir(Path(model_or_dir), device)
    config = config_from_hf(hf_config)
    family = _family(hf_config.model_type)
    sd = {
        k: v.to(device=device, dtype=dtype)
        for k, v in from_hf_tensors(hf_sd, config, family).items()
    }
    # Build without allocating or initialising weights, then adopt the loaded tensors.
    with torch.device("meta"):
        model = DecoderModel(config)
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()  # assign=True gave lm_head its own Parameter; share the embedding again
    model.reset_buffers(device)  # rope tables / slopes are not in checkpoints
    return model


def to_hf(
    model: DecoderModel, out_dir: str | os.PathLike[str], model_type: str | None = None
) -> None:
    """Write `config.json` and `model.safetensors` that `transformers` loads as `model_type`
    (default: `infer_model_type(model.config)`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    family = _family(model_type or infer_model_type(model.config))
    hf_config = family.config_to_hf(model.config)
    # Lets `from_pretrained(dtype="auto")` restore e.g. bf16 instead of upcasting.
    hf_config.dtype = model.embed_tokens.weight.dtype
    hf_config.save_pretrained(out)
    tensors = {k: v.cpu() for k, v in to_hf_tensors(model, family).items()}
    # transformers checks this metadata before trusting a safetensors file as PyTorch.
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
