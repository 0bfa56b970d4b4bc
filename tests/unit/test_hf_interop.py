"""Parity of `llm.interop.hf` against `transformers`' own Llama.

Tiny random models with odd sizes, fp32 on CPU; logits must match the HF reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from llm.config import ModelConfig
from llm.interop.hf import config_from_hf, config_to_hf, from_hf, state_dict_from_hf, to_hf
from llm.models.decoder import DecoderModel

VOCAB, B, T = 151, 2, 17
TOL = dict(atol=1e-4, rtol=1e-4)

VARIANTS = {
    "untied": {},
    "tied": dict(tie_word_embeddings=True),
    "bias": dict(attention_bias=True, mlp_bias=True),
}


@torch.no_grad()
def _randomise(model: torch.nn.Module) -> None:
    # Default inits leave norms at 1 and biases at 0, which would hide a swapped or dropped
    # tensor; random values everywhere make every weight matter to the logits.
    for name, p in model.named_parameters():
        p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))


def make_hf(**overrides: object) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=48,
        intermediate_size=86,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        num_hidden_layers=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        attn_implementation="eager",  # the plain reference, not the SDPA kernel we also use
        **overrides,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    _randomise(model)
    return model


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _assert_same_logits(ours: DecoderModel, ref: torch.nn.Module, tokens: torch.Tensor) -> None:
    torch.testing.assert_close(ours(tokens), ref(tokens).logits, **TOL)


@pytest.mark.parametrize("variant", VARIANTS)
def test_from_loaded_model_matches_logits(variant: str, tokens: torch.Tensor) -> None:
    hf = make_hf(**VARIANTS[variant])
    ours = from_hf(hf)
    assert ours.config.tie_embeddings == (variant == "tied")
    assert ours.config.attn_bias == ours.config.attn_out_bias == (variant == "bias")
    _assert_same_logits(ours, hf, tokens)


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_from_dir_matches_logits(
    variant: str, sharded: bool, tokens: torch.Tensor, tmp_path: Path
) -> None:
    hf = make_hf(**VARIANTS[variant])
    # Both transformers 4.35+ and 5 write safetensors by default.
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "50GB")
    index = tmp_path / "model.safetensors.index.json"
    if sharded:
        assert len(set(json.loads(index.read_text())["weight_map"].values())) > 1
    else:
        assert (tmp_path / "model.safetensors").exists() and not index.exists()
    ours = from_hf(tmp_path)
    _assert_same_logits(ours, hf, tokens)
    if variant == "tied":
        assert ours.lm_head.weight is ours.embed_tokens.weight


def test_from_hf_dtype(tmp_path: Path) -> None:
    make_hf().save_pretrained(tmp_path)
    ours = from_hf(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert ours.rope_cos.dtype == torch.float32  # rope tables stay exact


@pytest.mark.parametrize("variant", VARIANTS)
def test_to_hf_round_trip(variant: str, tokens: torch.Tensor, tmp_path: Path) -> None:
    ours = from_hf(make_hf(**VARIANTS[variant]))
    to_hf(ours, tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in saved) == (variant != "tied")
    assert not any("qkv_proj" in k for k in saved)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(ref, transformers.LlamaForCausalLM)
    _assert_same_logits(ours, ref, tokens)
    # And back again: the same weights, bit for bit.
    again = from_hf(tmp_path)
    for (name, a), b in zip(ours.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_native_model_exports(tokens: torch.Tensor, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, dim=40, n_layers=2, n_heads=5, n_kv_heads=1, hidden_dim=74)
    ours = DecoderModel(cfg).eval()
    _randomise(ours)
    to_hf(ours, tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    _assert_same_logits(ours, ref, tokens)
    assert config_from_hf(config_to_hf(cfg)) == cfg


def test_unsupported_model_type_raises(tmp_path: Path) -> None:
    transformers.OPTConfig(hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'opt'"):
        from_hf(tmp_path)
    with pytest.raises(ValueError, match="'opt'"):
        config_from_hf(transformers.OPTConfig())


def test_missing_tensor_raises(tmp_path: Path) -> None:
    make_hf().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    sd = load_file(path)
    del sd["model.layers.1.self_attn.k_proj.weight"]
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        from_hf(tmp_path)


def test_unexpected_tensor_raises() -> None:
    hf = make_hf()
    sd = dict(hf.state_dict())
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(6)  # tolerated
    config = config_from_hf(hf.config)
    state_dict_from_hf(sd, config)
    sd["model.layers.2.mlp.up_proj.weight"] = torch.ones(1)
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        state_dict_from_hf(sd, config)


def test_unsupported_config_fields_raise() -> None:
    scaled = transformers.LlamaConfig(
        max_position_embeddings=16384,
        rope_parameters=dict(
            rope_type="longrope", rope_theta=5e5, short_factor=[1.0] * 32,
            long_factor=[2.0] * 32, original_max_position_embeddings=8192,
        ),
    )  # fmt: skip
    with pytest.raises(NotImplementedError, match="longrope"):
        config_from_hf(scaled)
    with pytest.raises(ValueError, match="hidden_act"):
        config_from_hf(transformers.LlamaConfig(hidden_act="gelu"))
    with pytest.raises(ValueError, match="mlp_impl"):
        config_to_hf(ModelConfig.from_preset("tiny", mlp_impl="mlp"))
    with pytest.raises(ValueError, match="norm_impl"):
        config_to_hf(ModelConfig.from_preset("tiny", norm_impl="layer_norm"))


def test_legacy_rope_theta_attribute() -> None:
    # transformers 4.x configs carry `rope_theta` directly and no `rope_parameters`.
    legacy = transformers.LlamaConfig(hidden_size=48, num_attention_heads=4)
    legacy.rope_parameters = None
    legacy.rope_theta = 123.0
    assert config_from_hf(legacy).rope_theta == 123.0
