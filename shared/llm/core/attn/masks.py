"""Attention masks and biases, built once per forward from query and key positions.

One function serves training (queries 0..T-1 over keys 0..T-1) and the cached path
(per-row query positions over the whole cache), so the two cannot disagree. The model
builds one mask per distinct sliding window, not one per layer.
"""

from __future__ import annotations

import torch


def attention_mask(
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None = None,
    alibi_slopes: torch.Tensor | None = None,
    document_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Args:
        q_pos: (B, T) absolute query positions.
        k_pos: (L,) absolute key positions (cache slots or 0..T-1), or (B, L) per row
            (packed sequences, where positions restart at each document).
        window: keys at most `window - 1` positions behind the query (None: all of them).
        alibi_slopes: (H,) per-head ALiBi slopes, or None.
        document_ids: (B, T) for packed training rows: a query sees only keys of its own
            document (positions restart per document, so within one document "earlier
            position" is "earlier token").
    Returns:
        (B, 1, T, L) boolean, True where attention is allowed; or, with ALiBi, a
        (B, H, T, L) fp32 additive bias with -inf where it is not.
    """
    k_pos = k_pos if k_pos.dim() == 2 else k_pos[None]  # (1|B, L)
    rel = k_pos[:, None, :] - q_pos[:, :, None]  # (B, T, L): <= 0 for visible keys
    allowed = rel <= 0
    if document_ids is not None:
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])
    if window is not None:
        allowed = allowed & (rel > -window)
    if alibi_slopes is None:
        return allowed.unsqueeze(1)  # (B, 1, T, L)
    bias = alibi_slopes[None, :, None, None] * rel.unsqueeze(1).float()  # (B, H, T, L)
    return bias.masked_fill(~allowed.unsqueeze(1), float("-inf"))
