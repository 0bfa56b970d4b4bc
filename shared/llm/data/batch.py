"""The batch the data modules hand to a training step, and the masks that packing needs.

Packed sequences hold several samples in one row. `document_ids` says which sample each
position belongs to and `position_ids` restarts at 0 for each one, so a model given
`block_causal_mask(document_ids)` and those positions computes exactly what it would on
each sample alone (no attention across samples, no position carried over).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace

import numpy as np
import torch

IGNORE_INDEX = -100  # label of a position that has no loss (F.cross_entropy's default)


@dataclass(frozen=True, eq=False)
class Batch(Mapping[str, torch.Tensor]):
    """One rank's share of a global batch; also a read-only mapping of its present fields,
    so code written for `{"input_ids": ..., "labels": ...}` dicts takes it unchanged.

    Attributes:
        input_ids: (B, T) int64 tokens.
        labels: (B, T) int64 next-token targets, IGNORE_INDEX where there is no loss.
        position_ids: (B, T) int64 positions restarting at 0 per document, or None for the
            plain 0..T-1 of an unpacked row.
        document_ids: (B, T) int64 segment of each position within its row, or None when
            the whole row is one causal sequence.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor | None = None
    document_ids: torch.Tensor | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        value = getattr(self, key, None) if key in _FIELDS else None
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[str]:
        return (k for k in _FIELDS if getattr(self, k) is not None)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return replace(
            self,
            **{
                f.name: t.to(device, non_blocking=non_blocking)
                for f in fields(self)
                if (t := getattr(self, f.name)) is not None
            },
        )

    def pin_memory(self) -> Batch:
        return replace(
            self,
            **{
                f.name: t.pin_memory()
                for f in fields(self)
                if (t := getattr(self, f.name)) is not None
            },
        )

    def attention_mask(self) -> torch.Tensor | None:
        """(B, 1, T, T) bool mask, True where attention is allowed; None = plain causal."""
        return None if self.document_ids is None else block_causal_mask(self.document_ids)

    @property
    def n_loss_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


_FIELDS = tuple(f.name for f in fields(Batch))


def block_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """Causal attention restricted to each document: (B, T) ids -> (B, 1, T, T) bool.

    Every row allows at least its own position, so SDPA never sees an all-masked row.
    """
    T = document_ids.shape[-1]
    same = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
    causal = torch.ones(T, T, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal).unsqueeze(1)  # (B, 1, T, T)


def documents_from_eos(x: np.ndarray, eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Document ids and per-document positions for windows `x` (B, T) of a token stream.

    A document ends with its EOS token (the EOS belongs to the document it closes), so the
    position after an EOS starts a new document at position 0.
    """
    B, T = x.shape
    starts_new = np.zeros((B, T), dtype=bool)
    starts_new[:, 1:] = x[:, :-1] == eos_id
    doc = np.cumsum(starts_new, axis=1)  # (B, T)
    idx = np.broadcast_to(np.arange(T), (B, T))
    first = np.maximum.accumulate(np.where(starts_new, idx, 0), axis=1)  # start of own doc
    return doc.astype(np.int64), (idx - first).astype(np.int64)
