"""The attention kernel shared by every attention variant: SDPA or the eager reference.

The eager path is the textbook formula (scores in the input dtype, softmax in fp32, as
HF's `eager_attention_forward`); it exists to check the fused kernel and to run what
SDPA cannot (soft-capped scores, attention sinks). Both take the same mask convention
(`llm.core.attn.masks`). A decode step on the CPU takes `llm.core.cpu_kernels`'
attention kernel instead of SDPA once the inference runner has enabled it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from llm.core import cpu_kernels


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    dropout: float = 0.0,
    eager: bool = False,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Args:
        q: (B, H, T, dk) queries.
        k: (B, Hkv, L, dk) keys; H must be a multiple of Hkv (GQA/MQA).
        v: (B, Hkv, L, dv) values.
        mask: None for plain causal attention with T == L; else a (B, 1|H, T, L) boolean
            (True = attend) or an additive float bias.
        scale: softmax scale.
        dropout: attention dropout probability (pass 0.0 in eval).
        eager: use the explicit reference formula instead of SDPA.
        softcap: scores become `softcap * tanh(scores / softcap)` before the mask (Gemma 2).
            SDPA has no such step, so capped attention always takes the explicit formula.
        sinks: (H,) a learned logit per head that joins each softmax's denominator and
            attends to nothing, so a query may put weight nowhere (gpt-oss). Explicit
            formula only, as for `softcap`.
    Returns:
        (B, H, T, dv)
    """
    if not eager and softcap is None and sinks is None:
        b, heads, t, dk = q.shape
        kv_heads = k.shape[1]
        masked = mask is not None and dropout == 0.0  # inference over a cache
        own_kernel = masked and t == 1 and _cpu_kernel_takes(q, k, v, mask)
        if own_kernel or (masked and kv_heads != heads):
            # The g = heads/kv_heads queries of a KV group become g*T rows over that
            # group's keys and values, read once instead of once per head (SDPA's
            # `enable_gqa` compiles to copies of them, one per head); a decode step on the
            # CPU by our own kernel, one pass over each head's cache (docs/benchmarks.md).
            g = heads // kv_heads
            grouped = q.reshape(b, kv_heads, g * t, dk)
            if own_kernel:
                out = cpu_kernels.decode_attention(grouped, k, v, mask[:, 0, 0], scale)
            else:
                if mask.shape[1] != 1:  # a per-head bias (ALiBi): (B, H, T, L) by group
                    mask = mask.reshape(mask.shape[0], kv_heads, g * t, mask.shape[-1])
                elif t > 1:  # the rows of each query of the group see the same keys
                    mask = mask.repeat(1, 1, g, 1)
                out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=mask, scale=scale)
            return out.reshape(b, heads, t, v.shape[-1])  # out: (B, Hkv, g*T, dv)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=dropout, scale=scale,
            enable_gqa=True,
        )  # fmt: skip
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, H, L, dk)
    v = v.repeat_interleave(groups, dim=1)  # (B, H, L, dv)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, L)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        T, L = scores.shape[-2:]
        mask = torch.ones(T, L, dtype=torch.bool, device=q.device).tril()
    # Boolean masks say where to attend; float ones are additive biases (ALiBi).
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    if sinks is None:
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    else:
        B, H, T, _ = scores.shape
        sink = sinks.view(1, H, 1, 1).expand(B, H, T, 1).to(scores.dtype)
        probs = F.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)
        probs = probs[..., :-1].to(q.dtype)  # the sink's share is dropped
    probs = F.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, v)  # (B, H, T, dv)


def _cpu_kernel_takes(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> bool:
    """Whether a decode step goes to `cpu_kernels`: enabled, float32 on the CPU, a boolean
    mask shared by the heads (a per-head float bias, ALiBi, keeps SDPA)."""
    return (
        cpu_kernels.enabled()
        and q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.float32
        and mask.dtype == torch.bool
        and mask.shape[0] == q.shape[0]  # not one row's mask broadcast over the batch
        and mask.shape[1] == 1
        and k.stride(-1) == 1
        and v.stride(-1) == 1
    )
