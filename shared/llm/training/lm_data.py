"""Random next-token windows over an in-memory token stream, rank-aware and resumable.

Every rank draws the same global batch from one seeded generator and keeps its own
slice, so N ranks see disjoint parts of each global batch, and restoring the
generator's state after a crash continues with exactly the batches an uninterrupted
run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from llm.data.dataset import TokenWindows


class RandomWindowData:
    def __init__(
        self,
        windows: TokenWindows,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        eval_batches: int = 20,
    ) -> None:
        self.windows, self.batch_size, self.seed = windows, batch_size, seed
        self.rank, self.world_size, self.eval_batches = rank, world_size, eval_batches
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def _slice(self, split: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x, y = self.windows.get_batch(split, self.batch_size * self.world_size, generator)
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return {"input_ids": x[lo:hi], "labels": y[lo:hi]}

    def next_batch(self) -> dict[str, torch.Tensor]:
        self.batches_drawn += 1
        return self._slice("train", self.generator)

    def val_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        generator = torch.Generator().manual_seed(0)  # the same validation windows every time
        for _ in range(self.eval_batches):
            yield self._slice("val", generator)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "batches_drawn": self.batches_drawn,
                "world_size": self.world_size, "batch_size": self.batch_size}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.batches_drawn = state["batches_drawn"]
