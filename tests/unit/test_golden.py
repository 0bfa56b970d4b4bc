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
    4.58443, 4.46262, 4.5641, 4.38565, 4.39485, 4.28013, 4.21723, 4.06913, 4.00011, 4.00242,
    3.88462, 3.80415, 3.73985, 3.71825, 3.53444, 3.53707, 3.44214, 3.43853, 3.35566, 3.43076,
    3.43308, 3.16553, 3.13268, 3.24254, 3.2546, 3.28679, 3.4524, 3.24583, 3.27055, 3.22565,
]  # fmt: skip


def test_tiny_loss_trajectory_is_golden(tmp_path: Path) -> None:
    train_tiny(
        tmp_path, max_steps=30, checkpoint={"interval": 30},
        training={"log_interval": 1, "eval_interval": 30, "eval_batches": 2},
    )  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    losses = [r["loss"] for r in records if r["event"] == "train"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(GOLDEN), rtol=0, atol=2e-4)
