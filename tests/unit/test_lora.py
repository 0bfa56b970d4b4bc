"""LoRA against PEFT: same base, same adapter weights, same logits.

Our model is exported with `to_hf`, PEFT's `PeftModel.from_pretrained` loads the adapter
`save_adapter` wrote over that export, and the logits must agree in fp32. Families cover
the mappings: Llama (fused q/k/v onto separate modules, GQA), Qwen2 (q/k/v biases),
GPT-2 (one fused Conv1D `c_attn`: block-diagonal rank, fan_in_fan_out), BLOOM (per-head
fused rows) and DeepSeek-V2 (MLA, rope rows permuted; attention only: PEFT reads
gate/up/down_proj targets of Qwen2-MoE-like models as the fused experts' parameters).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from llm.config import ModelConfig
from llm.core.lora import LoRALinear, apply_lora, lora_modules, merge_lora, unmerge_lora
from llm.inference import generate
from llm.inference.sampling import SamplingParams
from llm.interop.hf import from_hf, to_hf
from llm.interop.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_with_adapter, save_adapter
from llm.models.decoder import DecoderModel

peft = pytest.importorskip("peft", reason="peft is a dev dependency (LoRA parity)")

TOL = dict(atol=1e-5, rtol=1e-5)
LLAMA = dict(
    vocab_size=97, dim=48, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=86, max_seq_len=64
)
# family -> (our config, targets)
CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "llama": (LLAMA, ["q_proj", "v_proj", "o_proj", "down_proj"]),
    "qwen2": ({**LLAMA, "attn_bias": True}, ["k_proj", "gate_proj", "up_proj"]),
    "gpt2": (dict(
        vocab_size=97, dim=36, n_layers=2, n_heads=4, hidden_dim=70, max_seq_len=64,
        mlp_impl="mlp", norm_impl="layer_norm", position="learned", attn_bias=True,
        attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
    ), ["q_proj", "v_proj", "up_proj"]),
    "bloom": (dict(
        vocab_size=97, dim=42, n_layers=2, n_heads=6, hidden_dim=168, max_seq_len=64,
        position="alibi", mlp_impl="mlp", norm_impl="layer_norm", embed_norm=True,
        attn_bias=True, attn_out_bias=True, mlp_bias=True, tie_embeddings=True,
    ), ["qkv_proj", "o_proj"]),
    "deepseek_v2": (dict(
        vocab_size=97, dim=39, n_layers=2, n_heads=3, hidden_dim=43, max_seq_len=64,
        attn_impl="mla", kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4,
        v_head_dim=5, q_lora_rank=13, mlp_impl="moe", n_experts=4, n_experts_per_tok=2,
        moe_hidden_dim=17, shared_expert_hidden_dim=34, moe_dense_layers=(0,),
    ), ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]),
}  # fmt: skip


def _model(config: dict[str, Any], seed: int = 0) -> DecoderModel:
    torch.manual_seed(seed)
    model = DecoderModel(ModelConfig(**config))
    with torch.no_grad():  # random norms and biases too, so a dropped tensor would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


@torch.no_grad()
def _randomise_lora(model: DecoderModel) -> None:
    for _, m in lora_modules(model):
        for b in m.lora_B.values():
            b.normal_(0, 0.1)


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(1))


def _hf(path: Path) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", experts_implementation="eager"
    ).eval()


@pytest.mark.parametrize("family", list(CASES))
@torch.no_grad()
def test_logits_match_peft_over_the_hf_export(family: str, tmp_path: Path) -> None:
    config, targets = CASES[family]
    model = _model(config)
    to_hf(model, tmp_path / "base", model_type=family)
    apply_lora(model, targets, r=4, alpha=8)
    _randomise_lora(model)
    save_adapter(model, tmp_path / "adapter", str(tmp_path / "base"), model_type=family)
    assert {f.name for f in (tmp_path / "adapter").iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}

    reference = peft.PeftModel.from_pretrained(_hf(tmp_path / "base"), tmp_path / "adapter")
    tokens = _tokens(config["vocab_size"])
    ours = model(tokens)
    torch.testing.assert_close(ours, reference.eval()(tokens).logits, **TOL)
    # The adapter changes the output: the comparison is not base against base.
    assert not torch.allclose(ours, _hf(tmp_path / "base")(tokens).logits, **TOL)

    # And back: our reader maps the PEFT layout onto a fresh base.
    again = load_with_adapter(from_hf(tmp_path / "base"), tmp_path / "adapter")
    torch.testing.assert_close(again.eval()(tokens), ours, **TOL)


def test_peft_key_names_for_the_llama_export(tmp_path: Path) -> None:
    from safetensors import safe_open

    model = _model(LLAMA)
    apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    save_adapter(model, tmp_path)
    with safe_open(str(tmp_path / ADAPTER_WEIGHTS), framework="pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert not any("k_proj" in k or "qkv_proj" in k for k in keys)
    assert len(keys) == 2 * 2 * 2  # layers x modules x (A, B)


@torch.no_grad()
def test_loads_an_adapter_peft_trained(tmp_path: Path) -> None:
    """PEFT's own LoRA (per-module ranks and alphas) loads into ours with equal logits."""
    base = _model(LLAMA)
    to_hf(base, tmp_path / "base")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "up_proj"],
        rank_pattern={"up_proj": 2}, alpha_pattern={"up_proj": 3}, lora_dropout=0.1,
    )  # fmt: skip
    reference = peft.get_peft_model(_hf(tmp_path / "base"), config)
    for name, p in reference.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.1)
    reference.save_pretrained(tmp_path / "adapter")

    ours = load_with_adapter(base, tmp_path / "adapter")
    ranks = {name: m.r for name, m in lora_modules(ours)}
    assert ranks["layers.0.self_attn.qkv_proj"] == 4 and ranks["layers.0.mlp.up_proj"] == 2
    tokens = _tokens(LLAMA["vocab_size"])
    torch.testing.assert_close(ours.eval()(tokens), reference.eval()(tokens).logits, **TOL)


@torch.no_grad()
def test_at_init_the_model_equals_the_base() -> None:
    model = _model(LLAMA)
    tokens = _tokens(LLAMA["vocab_size"])
    before = model(tokens)
    names = apply_lora(model, ["all-linear"], r=4, alpha=8, dropout=0.1)
    assert "lm_head" not in names and "layers.0.self_attn.k_proj" in names
    assert torch.equal(model.eval()(tokens), before)


@torch.no_grad()
def test_merged_equals_unmerged_and_unmerge_restores_the_base() -> None:
    model = _model(LLAMA)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, ["q_proj", "k_proj", "o_proj", "gate_proj"], r=4, alpha=8)
    _randomise_lora(model)
    tokens = _tokens(LLAMA["vocab_size"])
    unmerged = model(tokens)
    merge_lora(model)
    assert all(m.merged for _, m in lora_modules(model))
    torch.testing.assert_close(model(tokens), unmerged, **TOL)
    unmerge_lora(model)
    restored = {k.replace(".base.", "."): v for k, v in model.state_dict().items()}
    for k, v in base.items():
        torch.testing.assert_close(restored[k], v, atol=1e-6, rtol=0, msg=k)


def test_training_moves_only_the_adapter() -> None:
    model = _model(LLAMA).train()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, ["q_proj", "v_proj", "down_proj"], r=4, alpha=8, dropout=0.1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = _tokens(LLAMA["vocab_size"])
    for _ in range(3):
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    frozen = {k.replace(".base.", "."): v for k, v in after.items() if ".lora_" not in k}
    assert frozen.keys() == base.keys()
    for k, v in base.items():
        assert torch.equal(frozen[k], v), k
    assert any(after[n].abs().sum() > 0 for n in after if ".lora_B." in n)


def test_a_target_matching_nothing_warns() -> None:
    model = _model(LLAMA)
    with pytest.warns(UserWarning, match=r"\['w_nothing'\] match no linear layer"):
        apply_lora(model, ["q_proj", "w_nothing"])
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(_model(LLAMA), ["w_nothing"])


def test_fused_parts_get_their_own_rows() -> None:
    model = _model(LLAMA)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = apply_lora(model, ["layers.1.self_attn.k_proj"], r=2, alpha=2)
    assert names == ["layers.1.self_attn.k_proj"]
    layer = model.layers[1].self_attn.qkv_proj
    assert isinstance(layer, LoRALinear) and [p.name for p in layer.parts] == ["k_proj"]
    q, kv = 4 * 12, 2 * 12
    assert layer.lora_B["k_proj"].shape == (kv, 2)
    with torch.no_grad():
        layer.lora_B["k_proj"].fill_(1.0)
    delta = layer.delta_weight()
    assert delta[:q].abs().sum() == 0 and delta[q + kv :].abs().sum() == 0
    assert delta[q : q + kv].abs().sum() > 0


@torch.no_grad()
def test_greedy_generation_base_plus_adapter_equals_merged(tmp_path: Path) -> None:
    """What the engine's --adapter serves: the same tokens as the merged model."""
    model = _model(LLAMA)
    apply_lora(model, ["q_proj", "v_proj", "o_proj", "up_proj"], r=4, alpha=8)
    _randomise_lora(model)
    save_adapter(model, tmp_path)
    with_adapter = load_with_adapter(_model(LLAMA), tmp_path)
    merged = load_with_adapter(_model(LLAMA), tmp_path, merge=True)
    greedy, prompt = SamplingParams(temperature=0), [5, 17, 42, 8]
    a = generate(with_adapter.eval(), prompt, max_new_tokens=12, sampling=greedy)
    b = generate(merged.eval(), prompt, max_new_tokens=12, sampling=greedy)
    base = generate(_model(LLAMA), prompt, max_new_tokens=12, sampling=greedy)
    assert a == b and len(a) == 12
    assert a != base  # the adapter matters to what is generated


@torch.no_grad()
def test_mla_cached_decode_sees_the_adapter() -> None:
    """MLA's absorbed decode reads kv_b_proj.weight: it must include the update."""
    config, _ = CASES["deepseek_v2"]
    model = _model(config)
    apply_lora(model, ["kv_b_proj", "q_b_proj"], r=2, alpha=4)
    _randomise_lora(model)
    tokens = _tokens(config["vocab_size"])[:1]
    full = model(tokens)
    model.setup_cache(1, 32)
    pos = torch.arange(tokens.shape[1])[None]
    cached = model(tokens, pos)
    model.clear_cache()
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)
