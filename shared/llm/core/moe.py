"""Mixture of experts: a top-k router over SwiGLU experts stored as fixed-shape tensors.

Switch Transformer (Fedus et al. 2022) / Mixtral (Jiang et al. 2024) routing, with the
options the open families differ in: softmax-then-top-k, top-k-then-softmax or sigmoid
scores with a choice-only correction bias (DeepSeek-V3), renormalised or not, a
routed-output scale and group-limited selection (DeepSeek-V2/V3),
an always-on shared expert, optionally sigmoid-gated (Qwen2-MoE, DeepSeek), and a router
bias with biased, clamped-SwiGLU experts (gpt-oss).

Experts run without a loop over experts or tokens and without host syncs. The (token,
expert) assignments are sorted by expert and each projection is one grouped GEMM
(`torch.nn.functional.grouped_mm`, jagged groups given by on-device offsets): the FLOPs
are exactly those of the routed tokens. Where torch has no grouped GEMM for the dtype
(CUDA below bf16's kernels), a blocked layout stands in: each expert's run padded to
blocks of `b` rows, each block fetching its expert's weights, one `bmm` per projection.

Router statistics of the last forward stay on the module (`router_stats`) so
`DecoderModel.router_losses()` can form the load-balancing loss and the z-loss without
changing what `forward` returns.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from llm.core.mlp import SwiGLU
from llm.core.registry import MLP_REGISTRY


class RouterStats(NamedTuple):
    """One MoE layer's routing in its last forward, over its N tokens."""

    load: torch.Tensor  # (E,) routed (token, slot) pairs per expert / N: sums to top_k
    prob: torch.Tensor  # (E,) mean router probability per expert
    z: torch.Tensor  # () mean squared logsumexp of the router logits (ST-MoE z-loss)


class _GatherRows(torch.autograd.Function):
    """`src.index_select(0, index)` whose backward sums rows back with `index_add_`: autograd's
    own backward for it takes a `scatter_add` path that is several times slower on CPU."""

    @staticmethod
    def forward(ctx, src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.n_rows = src.shape[0]
        return src.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (index,) = ctx.saved_tensors
        flat = grad.reshape(grad.shape[0], -1)  # 2-D takes index_add_'s fast path
        out = flat.new_zeros(ctx.n_rows, flat.shape[1]).index_add_(0, index, flat)
        return out.view(ctx.n_rows, *grad.shape[1:]), None


def _gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return _GatherRows.apply(src, index)


@torch.library.custom_op("llm::grouped_mm", mutates_args=())
def _grouped_mm_op(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`F.grouped_mm` behind an opaque op: torch.compile's fake kernel for it accepts only
    bf16, while the CPU kernel runs any float dtype."""
    return F.grouped_mm(a, b, offs=offs)


@_grouped_mm_op.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:  # (M, K) x (G, K, N) -> (M, N)
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[1])  # (K, M) x (M, N) -> (G, K, N)


def _grouped_mm_setup(ctx, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
    a, b, offs = ctx.saved_tensors  # the (M, K) x (G, K, N) forward
    grad = grad.contiguous()
    grad_a = _grouped_mm_op(grad, b.transpose(1, 2), offs)  # (M, K)
    grad_b = _grouped_mm_op(a.t(), grad, offs)  # (G, K, N): each group's a_g^T @ grad_g
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(M, K) rows grouped by `offs` times (G, K, N) -> (M, N)."""
    if a.device.type == "cpu":
        return _grouped_mm_op(a, b, offs)
    return F.grouped_mm(a, b, offs=offs)  # CUDA bf16: torch's kernel, compilable


_GROUPED_MM_DTYPES = {("cpu", torch.float32), ("cpu", torch.bfloat16), ("cuda", torch.bfloat16)}


def _block_rows(n_assignments: int, n_experts: int) -> int:
    """Rows per block: about a quarter of an expert's average load, a power of two in
    [1, 128]. Smaller wastes less padding, larger fetches expert weights less often."""
    target = max(1, n_assignments // (4 * n_experts))
    return min(128, 1 << (target.bit_length() - 1))


class GroupedExperts(nn.Module):
    """E SwiGLU experts: `gate_up_proj` (E, 2*hidden, dim) and `down_proj` (E, dim, hidden),
    the layout of transformers' fused MoE checkpoints.

    Options (gpt-oss): a bias on both projections, and the clamped SwiGLU
    `(clamp(up, -l, l) + 1) * g * sigmoid(alpha * g)` with `g = clamp(gate, max=l)`,
    which bounds what one expert can add to the residual stream.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        n_experts: int,
        *,
        bias: bool = False,
        activation: str = "swiglu",
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
    ) -> None:
        super().__init__()
        if activation not in ("swiglu", "clamped_swiglu"):
            raise ValueError(f"activation={activation!r}: use 'swiglu' or 'clamped_swiglu'")
        self.n_experts, self.hidden_dim = n_experts, hidden_dim
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, hidden_dim))
        self.gate_up_proj_bias = (
            nn.Parameter(torch.zeros(n_experts, 2 * hidden_dim)) if bias else None
        )
        self.down_proj_bias = nn.Parameter(torch.zeros(n_experts, dim)) if bias else None
        self.clamped = activation == "clamped_swiglu"
        self.swiglu_alpha, self.swiglu_limit = swiglu_alpha, swiglu_limit

    def _act(self, gate_up: torch.Tensor) -> torch.Tensor:
        """(..., 2H) gate|up -> (..., H)."""
        gate, up = gate_up.chunk(2, dim=-1)
        if not self.clamped:
            return F.silu(gate) * up
        gate = gate.clamp(max=self.swiglu_limit)
        up = up.clamp(min=-self.swiglu_limit, max=self.swiglu_limit)
        return (up + 1) * gate * torch.sigmoid(gate * self.swiglu_alpha)

    def forward(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            x: (N, dim) tokens.
            experts: (N, k) expert index of each of a token's k assignments.
            weights: (N, k) their mixing weights.
        Returns:
            (N, dim): sum over k of weights * expert(x).
        """
        if self.uses_grouped_mm(x):
            return self._grouped(x, experts, weights)
        return self._blocked(x, experts, weights)

    def uses_grouped_mm(self, x: torch.Tensor) -> bool:
        """Whether torch's grouped GEMM runs `x`: CPU fp32/bf16 or CUDA bf16 on SM80+, with
        rows of dim and hidden_dim a multiple of 16 bytes (the kernel's stride rule)."""
        if (x.device.type, x.dtype) not in _GROUPED_MM_DTYPES:
            return False
        if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
        D, H = self.gate_up_proj.shape[2], self.hidden_dim
        return (D * x.element_size()) % 16 == 0 and (H * x.element_size()) % 16 == 0

    def _grouped(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        (N, D), k = x.shape, experts.shape[1]
        flat = experts.reshape(N * k)  # (M,) token-major
        order = flat.argsort(stable=True)  # (M,) assignments, expert by expert
        counts = torch.zeros(self.n_experts, dtype=torch.long, device=x.device)
        counts = counts.index_add_(0, flat, torch.ones_like(flat))  # (E,)
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's rows
        token = order // k  # (M,) token of each sorted assignment
        x_rows = _gather_rows(x, token)  # (M, D)
        gate_up = _grouped_mm(x_rows, self.gate_up_proj.transpose(1, 2), offs)  # (M, 2H)
        expert = flat[order]  # (M,) expert of each sorted row
        if self.gate_up_proj_bias is not None:
            gate_up = gate_up + self.gate_up_proj_bias[expert]
        y = _grouped_mm(self._act(gate_up), self.down_proj.transpose(1, 2), offs)  # (M, D)
        if self.down_proj_bias is not None:
            y = y + self.down_proj_bias[expert]
        y = y * weights.reshape(N * k)[order].unsqueeze(-1).to(y.dtype)
        return y.new_zeros(N, D).index_add_(0, token, y)  # (N, D)

    def _blocked(
        self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        (N, D), k, E = x.shape, experts.shape[1], self.n_experts
        M = N * k
        b = _block_rows(M, E)
        n_blocks = (M + E * (b - 1)) // b  # >= sum_e ceil(count_e / b) for any routing
        flat = experts.reshape(M)  # (M,) token-major
        onehot = F.one_hot(flat, E)  # (M, E)
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # (M,) index among the expert's assignments
        blocks = (onehot.sum(0) + b - 1) // b  # (E,) blocks per expert
        block_end = blocks.cumsum(0)  # (E,)
        slot = (block_end - blocks)[flat] * b + rank  # (M,) row in the blocked layout
        # Expert of each block; spare blocks at the end hold only zero rows.
        block_ids = torch.arange(n_blocks, device=x.device)
        block_expert = (block_ids[:, None] >= block_end[None, :]).sum(1).clamp(max=E - 1)  # (nb,)
        token = torch.arange(M, device=x.device) // k  # (M,)
        row_token = torch.full((n_blocks * b,), N, device=x.device).scatter(
            0, slot, token
        )  # (nb*b,)

        x_rows = torch.cat([x, x.new_zeros(1, D)]).index_select(
            0, row_token
        )  # (nb*b, D), N -> zeros
        x_rows = x_rows.view(n_blocks, b, D)  # (nb, b, D)
        w_gate_up = _gather_rows(self.gate_up_proj, block_expert)  # (nb, 2H, D)
        w_down = _gather_rows(self.down_proj, block_expert)  # (nb, D, H)
        gate_up = torch.bmm(x_rows, w_gate_up.transpose(1, 2))  # (nb, b, 2H)
        if self.gate_up_proj_bias is not None:  # padding rows get it too, and are dropped below
            gate_up = gate_up + self.gate_up_proj_bias[block_expert][:, None]
        y = torch.bmm(self._act(gate_up), w_down.transpose(1, 2))  # (nb, b, D)
        if self.down_proj_bias is not None:
            y = y + self.down_proj_bias[block_expert][:, None]
        y = _gather_rows(y.view(n_blocks * b, D), slot).view(N, k, D)  # back to assignment order
        return (y * weights.unsqueeze(-1).to(y.dtype)).sum(1)  # (N, D)


@MLP_REGISTRY.register("moe")
class MoE(nn.Module):
    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        n_experts: int,
        top_k: int,
        *,
        router_order: str = "softmax_topk",
        renormalize: bool = False,
        router_scale: float = 1.0,
        n_groups: int | None = None,
        topk_groups: int | None = None,
        shared_hidden_dim: int | None = None,
        shared_gate: bool = False,
        router_bias: bool = False,
        expert_bias: bool = False,
        activation: str = "swiglu",
        swiglu_alpha: float = 1.702,
        swiglu_limit: float = 7.0,
        group_score: str = "max",
        choice_bias: bool = False,
    ) -> None:
        super().__init__()
        orders = ("softmax_topk", "topk_softmax", "sigmoid_topk")
        if router_order not in orders:
            raise ValueError(f"router_order={router_order!r}: use one of {orders}")
        if group_score not in ("max", "top2_sum"):
            raise ValueError(f"group_score={group_score!r}: use 'max' or 'top2_sum'")
        self.n_experts, self.top_k = n_experts, top_k
        self.softmax_first = router_order == "softmax_topk"
        self.sigmoid = router_order == "sigmoid_topk"
        self.renormalize, self.router_scale = renormalize, router_scale
        self.n_groups, self.topk_groups, self.group_score = n_groups, topk_groups, group_score
        self.gate = nn.Linear(dim, n_experts, bias=router_bias)  # the router
        # DeepSeek-V3's load-balancing bias: shifts which experts are chosen, not their
        # weights; set outside backprop, so a buffer (kept in fp32 for routing).
        if choice_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(n_experts))
        else:
            self.e_score_correction_bias = None
        self.experts = GroupedExperts(
            dim, hidden_dim, n_experts, bias=expert_bias, activation=activation,
            swiglu_alpha=swiglu_alpha, swiglu_limit=swiglu_limit,
        )  # fmt: skip
        self.shared_expert = SwiGLU(dim, shared_hidden_dim) if shared_hidden_dim else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if shared_gate else None
        self.router_stats: RouterStats | None = None

    def _keep_groups(self, scores: torch.Tensor, floor: float) -> torch.Tensor:
        """Scores (N, E) with every expert outside the `topk_groups` best groups set to
        `floor`; a group ranks by its best expert (`max`, DeepSeek-V2) or its best two
        (`top2_sum`, DeepSeek-V3)."""
        N, E = scores.shape
        grouped = scores.view(N, self.n_groups, E // self.n_groups)  # (N, G, E/G)
        if self.group_score == "max":
            group_scores = grouped.amax(-1)  # (N, G)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
        best_groups = group_scores.topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
        keep = torch.zeros(N, self.n_groups, dtype=torch.bool, device=scores.device)
        keep = keep.scatter(1, best_groups, True)  # (N, G)
        return grouped.masked_fill(~keep.unsqueeze(-1), floor).view(N, E)

    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, E) fp32 router logits -> (weights, experts), each (N, k)."""
        if self.sigmoid:
            # DeepSeek-V3: independent sigmoid scores; the correction bias only steers the
            # choice, the weights are the chosen experts' own scores.
            probs = logits.sigmoid()
            choice = probs
            if self.e_score_correction_bias is not None:
                choice = probs + self.e_score_correction_bias.float()
            if self.n_groups is not None:
                choice = self._keep_groups(choice, float("-inf"))
            experts = choice.topk(self.top_k, dim=-1).indices  # (N, k)
            weights = probs.gather(1, experts)
            if self.renormalize:
                weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
            return weights * self.router_scale, experts
        scores = logits.softmax(-1) if self.softmax_first else logits
        if self.n_groups is not None:
            scores = self._keep_groups(scores, 0.0 if self.softmax_first else float("-inf"))
        weights, experts = scores.topk(self.top_k, dim=-1)  # (N, k)
        if not self.softmax_first:
            weights = weights.softmax(-1)
        elif self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        return weights * self.router_scale, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B, T, dim)
        Returns:
            (B, T, dim). Side effect: `self.router_stats` holds this pass's routing.
        """
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # (N, D)
        bias = None if self.gate.bias is None else self.gate.bias.float()
        logits = F.linear(x.float(), self.gate.weight.float(), bias)  # (N, E), routing in fp32
        weights, experts = self.route(logits)
        y = self.experts(x, experts, weights)  # (N, D)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        self.router_stats = RouterStats(
            load=F.one_hot(experts, self.n_experts).sum((0, 1)).float() / (B * T),
            prob=logits.softmax(-1).mean(0),
            z=torch.logsumexp(logits, dim=-1).square().mean(),
        )
        return y.view(B, T, D)
