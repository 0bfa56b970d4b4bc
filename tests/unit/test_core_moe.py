"""The MoE layer: grouped-GEMM and blocked expert compute against a per-assignment loop
(values and gradients, under skewed routing too, eager and compiled), routing options, and the layer against the
`transformers` sparse blocks it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from llm.core.moe import GroupedExperts, MoE

D, H, E = 13, 11, 5
TOL = dict(atol=1e-5, rtol=1e-5)


def _loop_experts(
    ex: GroupedExperts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[n, j]
            gate, up = (ex.gate_up_proj[e] @ x[n]).chunk(2)
            out[n] = out[n] + w[n, j] * (ex.down_proj[e] @ (F.silu(gate) * up))
    return out


ROUTINGS = {
    "random": lambda n, k: torch.stack([torch.randperm(E)[:k] for _ in range(n)]),
    "all-to-one": lambda n, k: torch.stack([torch.tensor([0, *range(1, k)]) for _ in range(n)]),
    "one-token": lambda n, k: torch.randperm(E)[:k][None],
}


@pytest.mark.parametrize("path", ["grouped_mm", "blocked"])
@pytest.mark.parametrize("routing", ROUTINGS)
@pytest.mark.parametrize("n_tokens", [1, 7, 300])
@pytest.mark.parametrize("k", [1, 3])
def test_grouped_experts_match_loop(path: str, routing: str, n_tokens: int, k: int) -> None:
    torch.manual_seed(0)
    dim, hidden = (16, 12) if path == "grouped_mm" else (D, H)  # odd sizes: not 16-byte rows
    ex = GroupedExperts(dim, hidden, E)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.3)
    torch.nn.init.normal_(ex.down_proj, std=0.3)
    idx = ROUTINGS[routing](n_tokens, k)[:n_tokens]
    x = torch.randn(idx.shape[0], dim, requires_grad=True)
    w = torch.rand(idx.shape[0], k, requires_grad=True)
    assert ex.uses_grouped_mm(x) == (path == "grouped_mm")
    ours, ref = ex(x, idx, w), _loop_experts(ex, x, idx, w)
    torch.testing.assert_close(ours, ref, **TOL)
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(ours, [x, w, ex.gate_up_proj, ex.down_proj], g)
    ref_grads = torch.autograd.grad(ref, [x, w, ex.gate_up_proj, ex.down_proj], g)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, **TOL)


@pytest.mark.parametrize("path", ["grouped_mm", "blocked"])
def test_biased_clamped_experts_match_loop(path: str) -> None:
    """gpt-oss experts: biases on both projections and the clamped SwiGLU, both paths."""
    torch.manual_seed(0)
    dim, hidden = (16, 12) if path == "grouped_mm" else (D, H)
    alpha, limit = 1.702, 0.3  # a limit the random activations cross
    ex = GroupedExperts(
        dim, hidden, E, bias=True, activation="clamped_swiglu", swiglu_alpha=alpha,
        swiglu_limit=limit,
    )  # fmt: skip
    for p in ex.parameters():
        torch.nn.init.normal_(p, std=0.3)
    idx = ROUTINGS["random"](9, 2)
    x = torch.randn(9, dim, requires_grad=True)
    w = torch.rand(9, 2)
    assert ex.uses_grouped_mm(x) == (path == "grouped_mm")
    ref = torch.zeros_like(x)
    for n in range(9):
        for j in range(2):
            e = idx[n, j]
            gate, up = (ex.gate_up_proj[e] @ x[n] + ex.gate_up_proj_bias[e]).chunk(2)
            gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
            h = (up + 1) * gate * torch.sigmoid(alpha * gate)
            ref[n] = ref[n] + w[n, j] * (ex.down_proj[e] @ h + ex.down_proj_bias[e])
    ours = ex(x, idx, w)
    torch.testing.assert_close(ours, ref, **TOL)
    params = [x, *ex.parameters()]
    g = torch.randn_like(ref)
    for a, b in zip(
        torch.autograd.grad(ours, params, g), torch.autograd.grad(ref, params, g), strict=True
    ):
        torch.testing.assert_close(a, b, **TOL)


def test_grouped_mm_compiles_without_graph_breaks() -> None:
    """fp32 grouped GEMM under torch.compile: torch's own fake kernel refuses non-bf16, ours
    runs it as an opaque op; values and gradients equal eager's."""
    torch.manual_seed(0)
    ex = GroupedExperts(16, 12, E)
    torch.nn.init.normal_(ex.gate_up_proj, std=0.3)
    torch.nn.init.normal_(ex.down_proj, std=0.3)
    idx, w = ROUTINGS["random"](40, 2), torch.rand(40, 2)
    x = torch.randn(40, 16, requires_grad=True)
    assert ex.uses_grouped_mm(x)
    compiled = torch.compile(ex, fullgraph=True, backend="aot_eager")
    out, ref = compiled(x, idx, w), ex(x, idx, w)
    torch.testing.assert_close(out, ref, **TOL)
    g = torch.randn_like(ref)
    for a, b in zip(
        torch.autograd.grad(out, [x, ex.gate_up_proj], g),
        torch.autograd.grad(ref, [x, ex.gate_up_proj], g),
        strict=True,
    ):
        torch.testing.assert_close(a, b, **TOL)


def _moe(**kwargs: object) -> MoE:
    torch.manual_seed(0)
    moe = MoE(D, H, 6, 2, **kwargs)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return moe


def test_routing_orders_agree_when_renormalised() -> None:
    logits = torch.randn(20, 6)
    w1, e1 = _moe(renormalize=True).route(logits)
    w2, e2 = _moe(router_order="topk_softmax").route(logits)
    torch.testing.assert_close(e1, e2, atol=0, rtol=0)
    torch.testing.assert_close(w1, w2)
    w3, _ = _moe().route(logits)  # softmax, top-k, not renormalised: a sub-probability
    torch.testing.assert_close(w3, logits.softmax(-1).topk(2).values)


def test_group_limited_routing_and_scale() -> None:
    logits = torch.randn(50, 6)
    weights, experts = _moe(n_groups=3, topk_groups=1, router_scale=2.5).route(logits)
    # Both picks come from the group (pairs of experts) holding the best single expert.
    best_group = logits.argmax(-1) // 2
    assert torch.equal(experts // 2, best_group[:, None].expand(-1, 2))
    torch.testing.assert_close(weights, 2.5 * logits.softmax(-1).gather(1, experts))


def _hf_block(cls: type, config: transformers.PretrainedConfig) -> torch.nn.Module:
    config._experts_implementation = "eager"  # the per-expert loop
    torch.manual_seed(0)
    block = cls(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return block


def test_matches_mixtral_block() -> None:
    cfg = transformers.MixtralConfig(
        hidden_size=D, intermediate_size=H, num_local_experts=E, num_experts_per_tok=2
    )
    hf = _hf_block(MixtralSparseMoeBlock, cfg)
    ours = MoE(D, H, E, 2, renormalize=True)
    ours.gate.weight.data.copy_(hf.gate.weight)
    ours.experts.load_state_dict(hf.experts.state_dict())
    x = torch.randn(3, 8, D)
    torch.testing.assert_close(ours(x), hf(x), **TOL)


def test_matches_qwen2_moe_block_with_gated_shared_expert() -> None:
    cfg = transformers.Qwen2MoeConfig(
        hidden_size=D, moe_intermediate_size=H, shared_expert_intermediate_size=17, num_experts=E,
        num_experts_per_tok=3, norm_topk_prob=False,
    )  # fmt: skip
    hf = _hf_block(Qwen2MoeSparseMoeBlock, cfg)
    ours = MoE(D, H, E, 3, shared_hidden_dim=17, shared_gate=True)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(2, 9, D)
    torch.testing.assert_close(ours(x), hf(x), **TOL)
    stats = ours.router_stats
    torch.testing.assert_close(stats.load.sum(), torch.tensor(3.0))  # top_k slots per token
    torch.testing.assert_close(stats.prob.sum(), torch.tensor(1.0))
