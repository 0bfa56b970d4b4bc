"""A transformer block: where the norms sit around the two sublayers.

pre:    x = x + attn(norm1(x));         x = x + mlp(norm2(x))           (GPT-2 onwards)
post:   x = norm1(x + attn(x));         x = norm2(x + mlp(x))           (Vaswani et al. 2017)
output: x = x + norm_a(attn(x));        x = x + norm_m(mlp(x))          (OLMo 2)
sandwich: x = x + norm_a(attn(norm1(x)));  x = x + norm_m(mlp(norm2(x)))  (Gemma 2/3)

`output` and `sandwich` normalise what each sublayer adds to the residual stream, which
keeps the stream's growth in check.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class TransformerBlock(nn.Module):
    """Takes already-built sub-modules so it stays independent of the config.

    `input_layernorm` / `post_attention_layernorm` are the norms before attention and
    before the MLP (pre) or after each residual add (post); None leaves that input as
    it is. `attn_output_norm` / `mlp_output_norm`, when given, normalise the sublayer
    outputs before the residual add.
    """

    def __init__(
        self,
        self_attn: nn.Module,
        mlp: nn.Module,
        input_layernorm: nn.Module | None,
        post_attention_layernorm: nn.Module | None,
        dropout: float = 0.0,
        pre_norm: bool = True,
        attn_output_norm: nn.Module | None = None,
        mlp_output_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.input_layernorm = input_layernorm
        self.self_attn = self_attn
        self.post_attention_layernorm = post_attention_layernorm
        self.mlp = mlp
        self.attn_output_norm = attn_output_norm
        self.mlp_output_norm = mlp_output_norm
        self.resid_dropout = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        # Set from outside (llm.training.distributed.apply_activation_checkpointing): when
        # training, keep only the block's input and recompute the rest in backward.
        self.activation_checkpointing = False
        if not pre_norm and (input_layernorm is None or post_attention_layernorm is None):
            raise ValueError("a post-norm block needs both norms")

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
        args = (x, cos, sin, input_pos, mask, cache_rows, kv_len)
        if self.activation_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._forward, *args, use_reentrant=False)
        return self._forward(*args)

    def _forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        input_pos: torch.Tensor | None,
        mask: torch.Tensor | None,
        cache_rows: torch.Tensor | None,
        kv_len: int,
    ) -> torch.Tensor:
        if not self.pre_norm:
            h = self.self_attn(x, cos, sin, input_pos, mask, cache_rows, kv_len)
            x = self.input_layernorm(x + self.resid_dropout(h))
            return self.post_attention_layernorm(x + self.mlp(x))
        h = x if self.input_layernorm is None else self.input_layernorm(x)
        h = self.self_attn(h, cos, sin, input_pos, mask, cache_rows, kv_len)
        if self.attn_output_norm is not None:
            h = self.attn_output_norm(h)
        x = x + self.resid_dropout(h)
        h = x if self.post_attention_layernorm is None else self.post_attention_layernorm(x)
        h = self.mlp(h)
        if self.mlp_output_norm is not None:
            h = self.mlp_output_norm(h)
        return x + h
