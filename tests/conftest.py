"""Shared fixtures: a briefly trained tiny checkpoint that real servers can load."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from llm.config import ModelConfig
from llm.data.corpus import default_corpus
from llm.data.dataset import tokenize_documents
from llm.data.tokenizers import SimpleCharacterTokenizer
from llm.training.trainer import TrainConfig, TrainResult, train

TINY_STEPS = 300


def train_tiny(run_dir: Path, max_steps: int = TINY_STEPS, **overrides) -> TrainResult:  # noqa: ANN003
    """Train the `tiny` preset on Python's reference docs (a few seconds on 2 cores)."""
    docs = default_corpus()
    tok = SimpleCharacterTokenizer.train("".join(docs))
    cfg = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)
    settings = dict(
        run_dir=str(run_dir), max_steps=max_steps, batch_size=16, block_size=64, lr=3e-3,
        warmup_steps=20, eval_interval=100, eval_batches=10, checkpoint_interval=100,
        log_interval=100,
    )  # fmt: skip
    tcfg = TrainConfig(**{**settings, **overrides})
    return train(cfg, tcfg, tok, tokenize_documents(docs, tok))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TrainResult]:
    logging.getLogger("llm").setLevel(logging.WARNING)
    torch.set_num_threads(2)
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    return run_dir, train_tiny(run_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_run: tuple[Path, TrainResult]) -> str:
    """A run directory holding committed checkpoints of a briefly trained `tiny` model."""
    return str(tiny_run[0])
