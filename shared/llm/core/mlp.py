"""Feed-forward blocks: GELU MLP (GPT-2, BLOOM), SwiGLU (LLaMA) and GeGLU (Shazeer 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm.core.registry import MLP_REGISTRY


@MLP_REGISTRY.register("mlp")
class MLP(nn.Module):
    """up -> GELU (tanh approximation, GPT-2's `gelu_new`) -> down."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x), approximate="tanh")))


class _GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)); subclasses pick the activation."""

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def act(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x)))


@MLP_REGISTRY.register("swiglu")
class SwiGLU(_GatedMLP):
    """down(silu(gate(x)) * up(x))."""

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


@MLP_REGISTRY.register("geglu")
class GeGLU(_GatedMLP):
    """down(gelu(gate(x)) * up(x)), tanh-approximated GELU as Gemma uses."""

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")
