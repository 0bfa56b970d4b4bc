"""Pretraining windows over token shards: next-token (x, y) pairs, train and validation.

The validation split is the tail of the token stream (`val_fraction` of it), moved to the
nearest document start so no document is split between the two; it is deterministic and
disjoint from training. Training windows are either uniformly random starts (`random`,
nanoGPT's `get_batch`) or non-overlapping windows visited once per epoch in a fresh order
(`shuffled`); both are counter-based (see `llm.data.batch_order`).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import numpy as np
import torch

from llm.data.batch import Batch, documents_from_eos
from llm.data.batch_order import epoch_indices, random_starts
from llm.data.shards import TokenShards

log = logging.getLogger(__name__)

Sampling = Literal["random", "shuffled"]


class PretrainData:
    def __init__(
        self,
        shards: TokenShards,
        seq_len: int,
        val_fraction: float,
        seed: int,
        sampling: Sampling = "random",
        document_masking: bool = False,
    ) -> None:
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        self.sampling, self.document_masking = sampling, document_masking
        n, need = shards.n_tokens, seq_len + 1
        boundary = n - int(n * val_fraction)
        ends = shards.doc_ends
        k = int(np.searchsorted(ends, boundary))  # first document ending at or after it
        if k < len(ends) and need <= ends[k] <= n - need:
            boundary = int(ends[k])
        self.n_train, self.n_val = boundary, n - boundary
        for name, size in (("train", self.n_train), ("val", self.n_val)):
            if size < need:
                raise ValueError(
                    f"{shards.uri}: {name} split has {size} tokens, fewer than seq_len+1={need}:"
                    " use more data, a smaller seq_len or another val_fraction"
                )
        self.n_val_windows = (self.n_val - 1) // seq_len
        log.info("pretrain data: %d train / %d val tokens", self.n_train, self.n_val)

    def train_starts(self, step: int, count: int) -> np.ndarray:
        if self.sampling == "random":
            return random_starts(self.seed, step, count, self.n_train - self.seq_len)
        n_windows = (self.n_train - 1) // self.seq_len
        return epoch_indices(self.seed, step, count, n_windows) * self.seq_len

    def n_val_batches(self, count: int) -> int:
        return math.ceil(self.n_val_windows / count)

    def val_starts(self, k: int, count: int) -> np.ndarray:
        """Consecutive non-overlapping windows; the last batch wraps around to stay full."""
        idx = (np.arange(k * count, (k + 1) * count)) % self.n_val_windows
        return self.n_train + idx * self.seq_len

    def batch(self, starts: np.ndarray) -> Batch:
        T = self.seq_len
        rows = np.stack([self.shards.read(int(s), T + 1) for s in starts]).astype(np.int64)
        x, y = np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])
        if not self.document_masking:
            return Batch(torch.from_numpy(x), torch.from_numpy(y))
        docs, pos = documents_from_eos(x, self.shards.eos_id)
        return Batch(
            torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(pos), torch.from_numpy(docs)
        )
