"""Evaluation reports perplexity and bits per byte beside the loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from tests.unit.test_trainer_data import train
from tests.unit.test_trainer_paths import FAST, SMALL

from llm.training.trainer import val_tokens_per_byte


def test_bits_per_byte_counts_utf8_bytes(tmp_path: Path) -> None:
    # 'a' is one byte, 'é' two, ' ' one: 3 characters (tokens) per 4 bytes.
    corpus = tmp_path / "text.txt"
    corpus.write_text("aé " * 4000)
    trainer = train(
        tmp_path / "run", 2, data={"source": str(corpus)},
        training={**SMALL, "eval_interval": 2}, optimization=FAST, checkpoint={"interval": 2},
    )  # fmt: skip
    tok = trainer.data.tokenizer
    assert val_tokens_per_byte(trainer.data, tok) == pytest.approx(0.75, abs=1e-3)
    record = trainer.history[-1]
    loss = record["val_loss"]
    assert record["val_ppl"] == pytest.approx(math.exp(loss))
    assert record["val_bits_per_byte"] == pytest.approx(loss * 0.75 / math.log(2), rel=1e-3)
    evals = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    assert evals[-1]["event"] == "eval" and evals[-1]["val_bits_per_byte"] == pytest.approx(
        record["val_bits_per_byte"]
    )
