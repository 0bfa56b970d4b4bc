"""Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434, section 2.1; also V3).

Keys and values are compressed into one low-rank latent per token (`kv_a_proj_with_mqa`
-> RMSNorm), expanded per head by `kv_b_proj`, plus one rope key shared by all heads
(the "decoupled" rotary part). Queries are full-rank (`q_proj`) or low-rank
(`q_a_proj` -> RMSNorm -> `q_b_proj`).

Two equivalent computations:
- without a cache (training), the latent is expanded to per-head K/V and attention
  runs as ordinary MHA with qk width nope + rope and v width `v_head_dim`;
- with a cache, only the latent and the rope key are stored, and `kv_b_proj` is
  absorbed into the query and the output (the paper's inference form): attention then
  runs as MQA over the latent, so nothing of size n_heads * L is ever materialised.
"""

from __future__ import annotations

import torch
from torch import nn

from llm.core.attn.kernel import attend
from llm.core.kv_cache import LatentKVCache
from llm.core.norm import RMSNorm
from llm.core.registry import ATTENTION_REGISTRY
from llm.core.rope import apply_rope


@ATTENTION_REGISTRY.register("mla")
class MultiHeadLatentAttention(nn.Module):
    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        q_lora_rank: int | None = None,
        bias: bool = False,
        latent_norm_eps: float = 1e-6,
        scale: float | None = None,
        eager: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.n_heads, self.kv_lora_rank = n_heads, kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        if q_lora_rank is None:
            self.q_proj = nn.Linear(dim, n_heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, latent_norm_eps)
            self.q_b_proj = nn.Linear(q_lora_rank, n_heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, latent_norm_eps)
        # No bias here: absorbing kv_b_proj into q and the output relies on it being linear.
        self.kv_b_proj = nn.Linear(
            kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(n_heads * v_head_dim, dim, bias=bias)
        self.low_rank_q = q_lora_rank is not None
        self.scale = scale if scale is not None else qk_dim**-0.5
        self.eager = eager
        self.dropout = dropout
        self.kv_cache: LatentKVCache | None = None

    def setup_cache(
        self, batch_size: int, max_seq_len: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        self.kv_cache = LatentKVCache(
            batch_size, max_seq_len, self.kv_lora_rank, self.rope_dim, dtype=dtype, device=device
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache_rows: torch.Tensor | None = None,
        kv_len: int = 0,
    ) -> torch.Tensor:
        """
        Args:
            x: (B, T, dim) hidden states.
            cos, sin: rope angles (T, dr) or (B, T, dr) for the rope part (dr = qk_rope_head_dim).
            input_pos: (B, T) absolute positions; required when a cache is set.
            cache_rows: (B,) the cache rows (slots) these rows use; None: all, in order.
            kv_len: > 0: attend over the cache's first kv_len positions only (all this
                step's queries sit below it); 0: the whole cache.
            mask: None for causal attention without a cache; else (B, 1, T, L) boolean.
        Returns:
            (B, T, dim)
        """
        B, T, _ = x.shape
        H, dn, dr, dv = self.n_heads, self.nope_dim, self.rope_dim, self.v_dim
        q = (
            self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
            if self.low_rank_q
            else self.q_proj(x)
        )
        q_nope, q_rope = q.view(B, T, H, dn + dr).split(
            [dn, dr], dim=-1
        )  # (B, T, H, dn), (B, T, H, dr)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, dr], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, T, r)
        q_rope = apply_rope(q_rope, cos, sin)
        k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)  # (B, T, dr)
        dropout = self.dropout if self.training else 0.0

        if self.kv_cache is None:
            kv = self.kv_b_proj(latent).view(B, T, H, dn + dv)  # (B, T, H, dn+dv)
            k_nope, v = kv.split([dn, dv], dim=-1)
            k = torch.cat(
                [k_nope, k_rope.unsqueeze(2).expand(B, T, H, dr)], dim=-1
            )  # (B, T, H, dn+dr)
            q = torch.cat([q_nope, q_rope], dim=-1)  # (B, T, H, dn+dr)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, d)
            y = attend(q, k, v, mask, self.scale, dropout, eager=self.eager)  # (B, H, T, dv)
            y = y.transpose(1, 2)  # (B, T, H, dv)
        else:
            latent, k_rope = self.kv_cache.update(
                input_pos, latent, k_rope, cache_rows, kv_len
            )  # (B, L, r), (B, L, dr)
            w = self.kv_b_proj.weight.view(H, dn + dv, self.kv_lora_rank)
            w_k, w_v = w.split([dn, dv], dim=1)  # (H, dn, r), (H, dv, r)
            q_latent = torch.einsum("bthn,hnr->bhtr", q_nope, w_k)  # (B, H, T, r)
            q = torch.cat([q_latent, q_rope.transpose(1, 2)], dim=-1)  # (B, H, T, r+dr)
            k = torch.cat([latent, k_rope], dim=-1).unsqueeze(1)  # (B, 1, L, r+dr)
            y = attend(
                q, k, latent.unsqueeze(1), mask, self.scale, dropout, eager=self.eager
            )  # (B, H, T, r)
            y = torch.einsum("bhtr,hvr->bthv", y, w_v)  # (B, T, H, dv)
        return self.o_proj(y.reshape(B, T, H * dv))
