"""Normalisation layers: RMSNorm (Zhang & Sennrich 2019), its (1 + weight) form, and LayerNorm."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm.core.registry import NORM_REGISTRY


@NORM_REGISTRY.register("rms_norm")
class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back, as LLaMA does."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False) -> None:
        super().__init__()
        if bias:
            raise ValueError("rms_norm has no bias")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)


@NORM_REGISTRY.register("rms_norm_offset")
class OffsetRMSNorm(RMSNorm):
    """RMSNorm scaling by (1 + weight), the weight stored as its offset from 1 and zero
    at init (Gemma's convention; checkpoints hold the offset)."""

    def __init__(self, dim: int, eps: float = 1e-6, bias: bool = False) -> None:
        super().__init__(dim, eps, bias)
        nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 + self.weight.float()
        return (F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * scale).type_as(x)


@NORM_REGISTRY.register("layer_norm")
class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (GPT-2 has one, many newer models do not)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
