"""A transformer block, pre-LN (GPT-2 onwards) or post-LN (Vaswani et al. 2017).

pre:  x = x + attn(norm1(x));  x = x + mlp(norm2(x))
post: x = norm1(x + attn(x));  x = norm2(x + mlp(x))
"""

from __future__ import annotations

import torch
from torch import nn


class TransformerBlock(nn.Module):
    """Takes already-built sub-modules so it stays independent of the config."""

    def __init__(
        self,
        self_attn: nn.Module,
        mlp: nn.Module,
        input_layernorm: nn.Module,
        post_attention_layernorm: nn.Module,
        dropout: float = 0.0,
        pre_norm: bool = True,
    ) -> None:
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp
        self.resid_dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache_rows: torch.Tensor | None = None,
        kv_len: int = 0,
    ) -> torch.Tensor:
        """x: (B, T, dim) -> (B, T, dim); the other arguments go to attention."""
        if self.pre_norm:
            h = self.self_attn(
                self.input_layernorm(x), cos, sin, input_pos, mask, cache_rows, kv_len
            )
            x = x + self.resid_dropout(h)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = self.input_layernorm(
            x + self.resid_dropout(self.self_attn(x, cos, sin, input_pos, mask, cache_rows, kv_len))
        )
        return self.post_attention_layernorm(x + self.mlp(x))
