"""Multi-head attention with grouped KV heads (MHA, GQA, MQA via n_kv_heads).

GQA: Ainslie et al. 2023. One fused QKV projection (one matmul instead of three), PyTorch
SDPA for the kernel. Without a cache the pass is causal over the sequence (training);
with a cache each query attends to cached positions <= its own (prefill and decode).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llm.core.kv_cache import KVCache
from llm.core.registry import ATTENTION_REGISTRY
from llm.core.rope import apply_rope


@ATTENTION_REGISTRY.register("mha")
class Attention(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        out_bias: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.qkv_proj = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=out_bias)
        self.dropout = dropout
        self.kv_cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            x: (B, T, dim) hidden states.
            cos, sin: rope angles for these positions, (T, hd) or (B, T, hd).
            input_pos: (B, T) absolute positions; required when a cache is set.
            mask: (B, 1, T, L) boolean, True where attention is allowed (cached path).
        Returns:
            (B, T, dim)
        """
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)

        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, L, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(
                q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0,
                enable_gqa=True,
            )  # fmt: skip
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)
