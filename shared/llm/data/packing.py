"""Packing SFT samples into fixed-length rows, and the SFT data behind the DataModule.

A sample of n tokens gives n-1 (input, label) pairs. Best-fit decreasing puts several
samples into one row of `seq_len` (deterministic: by length, ties by input order); each
sample keeps positions 0..n-2 and its own document id, and the rest of the row is a
padding segment with labels IGNORE_INDEX. Unpacked, every row holds one sample.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

from llm.data.batch import IGNORE_INDEX, Batch
from llm.data.batch_order import epoch_indices
from llm.data.sft import Sample

ROW_KEYS = ("input_ids", "labels", "position_ids", "document_ids")


def _bins(lengths: list[int], seq_len: int, pack: bool) -> list[list[int]]:
    if not pack:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin id), sorted: best fit = first with room
    for i in order:
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j == len(free):
            bins.append([i])
            bisect.insort(free, (seq_len - lengths[i], len(bins) - 1))
        else:
            room, b = free.pop(j)
            bins[b].append(i)
            bisect.insort(free, (room - lengths[i], b))
    return [sorted(b) for b in bins]


def pack_samples(
    samples: list[Sample], seq_len: int, pad_id: int, pack: bool = True
) -> dict[str, np.ndarray]:
    """Rows (N, seq_len) of input_ids, labels, position_ids and document_ids."""
    xs = [ids[:-1] for ids, _ in samples]
    ys = [np.where(mask[1:], ids[1:], IGNORE_INDEX) for ids, mask in samples]
    if any(len(x) > seq_len for x in xs):
        raise ValueError(f"a sample is longer than seq_len={seq_len}; truncate before packing")
    bins = _bins([len(x) for x in xs], seq_len, pack)
    rows = {k: np.zeros((len(bins), seq_len), dtype=np.int64) for k in ROW_KEYS}
    for r, members in enumerate(bins):
        pos = 0
        for d, i in enumerate([*members, None]):  # None: the padding segment
            n = len(xs[i]) if i is not None else seq_len - pos
            if n == 0:
                continue
            sl = slice(pos, pos + n)
            rows["input_ids"][r, sl] = xs[i] if i is not None else pad_id
            rows["labels"][r, sl] = ys[i] if i is not None else IGNORE_INDEX
            rows["position_ids"][r, sl] = np.arange(n)
            rows["document_ids"][r, sl] = d
            pos += n
    return rows


class SFTData:
    """Packed train and validation rows, sampled without replacement epoch by epoch."""

    def __init__(self, train: dict[str, np.ndarray], val: dict[str, np.ndarray], seed: int) -> None:
        self.train, self.val, self.seed = train, val, seed
        self.n_train, self.n_val = len(train["input_ids"]), len(val["input_ids"])

    def train_rows(self, step: int, count: int) -> np.ndarray:
        return epoch_indices(self.seed, step, count, self.n_train)

    def n_val_batches(self, count: int) -> int:
        return -(-self.n_val // count)

    def val_rows(self, k: int, count: int) -> np.ndarray:
        """Rows in file order; the last batch wraps around to stay full."""
        return np.arange(k * count, (k + 1) * count) % self.n_val

    @staticmethod
    def batch(rows: dict[str, np.ndarray], idx: np.ndarray) -> Batch:
        return Batch(*(torch.from_numpy(rows[k][idx]) for k in ROW_KEYS))
