"""Invariants of `DecoderModel` on the test presets.

Cached decode must reproduce a full recompute, rows of a batch may sit at different
positions, the decode step must compile without graph breaks, and the config must
reject contradictions with the offending field named.
"""

from __future__ import annotations

import pytest
import torch
from tests.support import VOCAB, shrink

from llm.config import PRESETS, ModelConfig
from llm.models.decoder import DecoderModel

B = 2
TOL = dict(atol=1e-5, rtol=1e-5)


# name -> (preset, overrides on top of the shrunk preset)
CASES: dict[str, tuple[str, dict[str, object]]] = {
    **{name: (name, {}) for name in PRESETS if name not in ("tiny", "tiny-moe", "small")},
    "tiny": ("tiny", {}),
    "tiny-moe": ("tiny-moe", {}),
    "tiny-mlp-layer_norm": ("tiny", dict(mlp_impl="mlp", norm_impl="layer_norm")),
    "tiny-untied-bias": ("tiny", dict(
        tie_embeddings=False, attn_bias=True, attn_out_bias=True, mlp_bias=True
    )),
    "tiny-post-ln-geglu": ("tiny", dict(norm_position="post", mlp_impl="geglu")),
    "tiny-nope-layer_norm-nobias": ("tiny", dict(
        position="none", norm_impl="layer_norm", norm_bias=False
    )),
    "tiny-eager-sliding-layers": ("tiny", dict(
        attn_backend="eager", sliding_window=3, sliding_window_layers=(1,)
    )),
    "tiny-moe-topk_softmax-groups-shared": ("tiny-moe", dict(
        router_order="topk_softmax", router_n_groups=2, router_topk_groups=1, router_scale=2.0,
        shared_expert_hidden_dim=40, shared_expert_gate=True, moe_dense_layers=(0,),
    )),
    "mla-low-rank-q": ("deepseek-v2-lite", dict(q_lora_rank=12, attn_bias=True, attn_out_bias=True)),
}  # fmt: skip
COMPILE_CASES = ("tiny", "tiny-moe", "deepseek-v2-lite", "bloom", "mistral")


def build(name: str, **extra: object) -> DecoderModel:
    preset, overrides = CASES[name]
    shrunk = {} if preset.startswith("tiny") else shrink(preset)
    # A larger init than training uses, so logits are far from zero and a wrong cache
    # entry or position shows up well above the tolerance.
    config = ModelConfig.from_preset(preset, init_std=0.1, **{**shrunk, **overrides, **extra})
    torch.manual_seed(0)
    model = DecoderModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norm weights and biases: not their trivial 1 / 0 init
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _tokens(*shape: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", CASES)
@torch.no_grad()
def test_cached_decode_matches_full_forward(name: str) -> None:
    model = build(name)
    T, prefix = 12, 5
    tokens = _tokens(B, T)
    full = model(tokens)  # (B, T, V)

    model.setup_cache(B, max_seq_len=32)
    pos = torch.arange(prefix).expand(B, prefix)  # (B, prefix)
    torch.testing.assert_close(model(tokens[:, :prefix], pos), full[:, :prefix], **TOL)
    for t in range(prefix, T):
        step = model(tokens[:, t : t + 1], torch.full((B, 1), t))  # (B, 1, V)
        torch.testing.assert_close(
            step[:, 0], full[:, t], **TOL, msg=lambda m, t=t: f"pos {t}: {m}"
        )


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "bloom", "mistral", "deepseek-v2-lite"])
@torch.no_grad()
def test_rows_decode_at_different_positions(name: str) -> None:
    model = build(name)
    steps, starts = 4, (3, 7)
    seqs = [_tokens(1, start + steps)[0] for start in starts]
    refs = [model(s[None])[0] for s in seqs]  # (L, V) each, no cache

    # Prefill both rows over positions 0..6; row 0 only has 3 real tokens, so its slots 3..6
    # hold filler that the decode steps must overwrite or mask out.
    model.setup_cache(B, max_seq_len=32)
    filler = _tokens(starts[1] - starts[0])
    prefill = torch.stack([torch.cat([seqs[0][: starts[0]], filler]), seqs[1][: starts[1]]])
    logits = model(prefill, torch.arange(starts[1]).expand(B, -1))  # (B, 7, V)
    torch.testing.assert_close(logits[0, : starts[0]], refs[0][: starts[0]], **TOL)
    torch.testing.assert_close(logits[1], refs[1][: starts[1]], **TOL)

    for k in range(steps):
        pos = torch.tensor([[starts[0] + k], [starts[1] + k]])  # (B, 1)
        step = model(torch.stack([seqs[0][pos[0]], seqs[1][pos[1]]]), pos)  # (B, 1, V)
        for row in range(B):
            torch.testing.assert_close(step[row, 0], refs[row][pos[row, 0]], **TOL)


@pytest.mark.parametrize("name", COMPILE_CASES)
def test_decode_step_has_no_graph_break(name: str) -> None:
    model = build(name)
    model.setup_cache(B, max_seq_len=32)
    torch._dynamo.reset()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(_tokens(B, 1), torch.tensor([[3], [7]]))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(n_heads=4, head_dim=15), "head_dim"),
        (dict(dim=66, n_heads=4), "head_dim"),
        (dict(attn_impl="flash9000"), "attn_impl"),
        (dict(mlp_impl="moe9000"), "mlp_impl"),
        (dict(norm_impl="batch_norm"), "norm_impl"),
        (dict(norm_bias=True), "norm_bias"),
        (dict(sliding_window_layers=(0,)), "sliding_window_layers"),
        (dict(sliding_window=4, sliding_window_layers=(1,)), "sliding_window_layers"),
        (dict(mlp_impl="moe", n_experts=4), "n_experts_per_tok"),
        (
            dict(mlp_impl="moe", n_experts=4, n_experts_per_tok=5, moe_hidden_dim=8),
            "n_experts_per_tok",
        ),
        (
            dict(
                mlp_impl="moe",
                n_experts=4,
                n_experts_per_tok=2,
                moe_hidden_dim=8,
                router_n_groups=3,
                router_topk_groups=1,
            ),
            "router_n_groups",
        ),
        (
            dict(
                mlp_impl="moe",
                n_experts=4,
                n_experts_per_tok=2,
                moe_hidden_dim=8,
                moe_dense_layers=(1,),
            ),
            "moe_dense_layers",
        ),
        (dict(attn_impl="mla", kv_lora_rank=8), "qk_rope_head_dim"),
        (
            dict(
                attn_impl="mla",
                kv_lora_rank=8,
                qk_nope_head_dim=8,
                qk_rope_head_dim=4,
                v_head_dim=8,
                head_dim=16,
            ),
            "head_dim",
        ),
        (dict(position="alibi", rope_scaling=dict(kind="linear", factor=2.0)), "rope_scaling"),
        (dict(rope_scaling=dict(kind="yarn", factor=2.0)), "original_max_seq_len"),
    ],
)
def test_config_errors_name_the_field(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**dict(vocab_size=256, dim=64, n_layers=1, n_heads=4), **overrides})


def test_unknown_preset_raises() -> None:
    with pytest.raises(ValueError, match="unknown preset 'tinyy'"):
        ModelConfig.from_preset("tinyy")


def test_tied_embeddings_share_storage() -> None:
    model = build("tiny")
    assert model.lm_head.weight is model.embed_tokens.weight
    model.to(torch.float64)  # sharing must survive a dtype/device move
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        model.embed_tokens.weight[0, 0] = 123.0
    assert model.lm_head.weight[0, 0] == 123.0
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))

    untied = build("tiny-untied-bias")
    assert untied.lm_head.weight.data_ptr() != untied.embed_tokens.weight.data_ptr()


@torch.no_grad()
def test_state_dict_round_trips() -> None:
    model, tokens = build("tiny-untied-bias"), _tokens(B, 9)
    with torch.device("meta"):
        fresh = DecoderModel(model.config)
    fresh.load_state_dict(model.state_dict(), strict=True, assign=True)
    fresh.tie_weights()
    fresh.reset_buffers("cpu")
    torch.testing.assert_close(fresh.eval()(tokens), model(tokens), atol=0, rtol=0)


def test_setup_cache_beyond_max_seq_len_raises() -> None:
    model = build("tiny")
    with pytest.raises(ValueError, match="max_seq_len"):
        model.setup_cache(B, max_seq_len=model.config.max_seq_len + 1)


def test_input_pos_without_cache_is_an_error() -> None:
    model = DecoderModel(ModelConfig.from_preset("tiny")).eval()
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="setup_cache"):
        model(tokens, torch.arange(3, 6)[None])
    model.setup_cache(1, 16)
    with pytest.raises(ValueError, match="needs input_pos"):
        model(tokens)


def test_rope_tables_stay_fp32_under_dtype_casts() -> None:
    model = DecoderModel(ModelConfig.from_preset("tiny")).to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.rope_cos.dtype == torch.float32
    fresh = DecoderModel(ModelConfig.from_preset("tiny"))
    torch.testing.assert_close(model.rope_sin, fresh.rope_sin, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe", "bloom", "mistral", "deepseek-v2-lite"])
@torch.no_grad()
def test_eager_attention_matches_sdpa(name: str) -> None:
    sdpa, eager = build(name), build(name, attn_backend="eager")
    tokens = _tokens(B, 9)
    torch.testing.assert_close(eager(tokens), sdpa(tokens), **TOL)
    for model in (sdpa, eager):
        model.setup_cache(B, max_seq_len=16)
    pos = torch.arange(9).expand(B, 9)
    torch.testing.assert_close(eager(tokens, pos), sdpa(tokens, pos), **TOL)


def test_mla_cache_holds_the_latent_not_full_kv() -> None:
    model = build("deepseek-v2-lite")
    model.setup_cache(B, max_seq_len=16)
    c, cache = model.config, model.layers[0].self_attn.kv_cache
    assert cache.latent_cache.shape == (B, 16, c.kv_lora_rank)
    assert cache.k_rope_cache.shape == (B, 16, c.qk_rope_head_dim)
    assert model.cache_batch_size == B


def test_router_losses_follow_the_last_forward() -> None:
    dense = build("tiny")
    dense(_tokens(B, 5))
    assert dense.aux_loss() == 0
    model = build("tiny-moe").train()
    logits = model(_tokens(B, 7))
    losses = model.router_losses()
    # Perfect balance gives load_balance == top_k; anything else more. z >= 0 always.
    assert losses["load_balance"] >= model.config.n_experts_per_tok - 1e-5
    assert losses["z"] > 0
    c = model.config
    expected = c.router_aux_loss_coef * losses["load_balance"] + c.router_z_loss_coef * losses["z"]
    torch.testing.assert_close(model.aux_loss(), expected)
    # Differentiable: the router gets gradient from the aux loss alone.
    (logits.sum() * 0 + model.aux_loss()).backward()
    assert model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_a_model_built_on_meta_moves_after_reset_buffers() -> None:
    """Loading builds on the meta device; buffers a family does not use (ALiBi slopes of
    a rope model) must not stay meta tensors, or `.to()` fails."""
    for preset in ("tiny", "bloom"):
        config = ModelConfig.from_preset(preset, **shrink(preset))
        weights = DecoderModel(config).state_dict()
        with torch.device("meta"):
            model = DecoderModel(config)
        model.load_state_dict(weights, assign=True)  # as load_checkpoint does
        model.reset_buffers("cpu")
        assert all(b.device.type == "cpu" for b in model.buffers())
        model.to(torch.float64).to("cpu")  # raised NotImplementedError (meta copy) before
