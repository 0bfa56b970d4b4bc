"""Token streams and random next-token windows over them (nanoGPT's `get_batch`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from llm.data.tokenizers import BaseTokenizer


def tokenize_documents(docs: Sequence[str], tokenizer: BaseTokenizer) -> torch.Tensor:
    """Concatenate the documents' tokens, each followed by EOS so boundaries stay visible."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        ids.extend(eos)
    dtype = torch.int32 if tokenizer.vocab_size > 32767 else torch.int16
    return torch.tensor(ids, dtype=dtype)


class TokenWindows:
    """Train/validation split of one token stream, sampled as random (x, y) windows.

    The last `val_fraction` of the stream is validation: deterministic, and disjoint from
    training. Sampling draws from a caller-owned generator, so a resumed run that restores
    the generator's state sees the same batches as an uninterrupted one.
    """

    def __init__(self, tokens: torch.Tensor, block_size: int, val_fraction: float = 0.1) -> None:
        n_val = int(len(tokens) * val_fraction)
        self.block_size = block_size
        self.splits = {"train": tokens[: len(tokens) - n_val], "val": tokens[len(tokens) - n_val :]}
        for name, split in self.splits.items():
            if len(split) <= block_size + 1:
                raise ValueError(
                    f"{name} split has {len(split)} tokens, fewer than block_size+2={block_size + 2}:"
                    " use a larger corpus or a smaller block_size"
                )

    def get_batch(
        self, split: str, batch_size: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        data = self.splits[split]
        starts = torch.randint(len(data) - self.block_size - 1, (batch_size,), generator=generator)
        offsets = torch.arange(self.block_size + 1)
        windows = data[starts[:, None] + offsets].long()  # (B, block+1)
        return windows[:, :-1], windows[:, 1:]
