"""Multi-head attention with grouped KV heads (MHA, GQA, MQA via n_kv_heads).

GQA: Ainslie et al. 2023. One fused QKV projection (one matmul instead of three), an
optional bias on it (Qwen2), optional RMSNorm on q and k before rope ("QK-norm",
Dehghani et al. 2023: per head as Qwen3, or over the whole projection as OLMo 2), and rope, ALiBi (via the mask) or no
positions at all. Sliding windows arrive in the mask too. Without a cache the pass is
causal over the sequence (training); with a cache each query attends to cached
positions the mask allows (prefill and decode).
"""

from __future__ import annotations

import torch
from torch import nn

from llm.core.attn.kernel import attend
from llm.core.kv_cache import KVCache
from llm.core.norm import RMSNorm
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
        *,
        qkv_bias: bool = False,
        out_bias: bool = False,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        qk_norm_all_heads: bool = False,
        norm_cls: type[nn.Module] = RMSNorm,
        softcap: float | None = None,
        sinks: bool = False,
        rope: bool = True,
        scale: float | None = None,
        eager: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.qkv_proj = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=out_bias)
        # Per head (Qwen3), or over all heads of the projection at once (OLMo 2).
        q_width, k_width = (
            (n_heads * head_dim, n_kv_heads * head_dim)
            if qk_norm_all_heads
            else (head_dim, head_dim)
        )
        self.q_norm = norm_cls(q_width, norm_eps) if qk_norm else None
        self.k_norm = norm_cls(k_width, norm_eps) if qk_norm else None
        self.softcap = softcap
        # One learned logit per head in the softmax denominator (gpt-oss's attention sinks).
        self.sinks = nn.Parameter(torch.zeros(n_heads)) if sinks else None
        self.qk_norm_all_heads = qk_norm_all_heads
        self.rope = rope
        self.scale = scale if scale is not None else head_dim**-0.5
        self.eager = eager
        self.dropout = dropout
        self.kv_cache: KVCache | None = None

    def setup_cache(
        self, batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        self.kv_cache = KVCache(
            batch_size, self.n_kv_heads, max_seq_len, self.head_dim, dtype=dtype, device=device
        )

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
        """
        Args:
            x: (B, T, dim) hidden states.
            cos, sin: rope angles for these positions, (T, hd) or (B, T, hd); unused without rope.
            input_pos: (B, T) absolute positions; required when a cache is set.
            cache_rows: (B,) the cache rows (slots) these rows use; None: all, in order.
            kv_len: > 0: attend over the cache's first kv_len positions only (all this
                step's queries sit below it); 0: the whole cache.
            mask: None for plain causal attention without a cache; else (B, 1|H, T, L),
                boolean (True = attend) or an additive bias (ALiBi).
        Returns:
            (B, T, dim)
        """
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        if self.q_norm is not None and self.qk_norm_all_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, nh, hd)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, nkv, hd)
        if self.q_norm is not None and not self.qk_norm_all_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, hd)

        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v, cache_rows, kv_len)  # (B, nkv, L, hd)
        dropout = self.dropout if self.training else 0.0
        # (B, nh, T, hd)
        y = attend(
            q, k, v, mask, self.scale, dropout, eager=self.eager, softcap=self.softcap,
            sinks=self.sinks,
        )  # fmt: skip
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)
