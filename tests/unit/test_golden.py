"""A golden loss trajectory: fixed seed, `tiny` preset, 30 steps, every loss checked in.

Any change to initialisation, data order, the model's math or the optimizer moves these
numbers; update them only for a change that is meant to. The tolerance (2e-4) absorbs
only last-bit differences from CPU kernels with other vector widths.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from support import train_tiny

GOLDEN = [
    4.52504, 4.5906, 4.49939, 4.45416, 4.31215, 4.29044, 4.17038, 4.17202, 4.05171, 3.97896,
    3.90691, 3.82486, 3.74477, 3.69141, 3.58091, 3.46066, 3.43676, 3.37474, 3.3722, 3.49395,
    3.22705, 3.34305, 3.25784, 3.27485, 3.23927, 3.40537, 3.33144, 3.22523, 3.23877, 3.26611,
]  # fmt: skip


def test_tiny_loss_trajectory_is_golden(tmp_path: Path) -> None:
    train_tiny(
        tmp_path, max_steps=30, checkpoint={"interval": 30},
        training={"log_interval": 1, "eval_interval": 30, "eval_batches": 2},
    )  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(GOLDEN), rtol=0, atol=2e-4)
