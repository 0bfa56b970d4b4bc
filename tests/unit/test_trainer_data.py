"""The trainer on the data library's `TextDataModule`: lm on text, sft on chat JSONL, resume."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tests.support import CPU, tiny_settings

from llm.checkpoint import (
    MANIFEST,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    load_trainer_state,
)
from llm.training.data import build_data
from llm.training.run import run_training
from llm.training.trainer import Trainer


def train(
    run_dir: Path, max_steps: int, loss_fn: Callable | None = None, **sections: dict[str, Any]
) -> Trainer:
    """`llm-train` in-process: settings -> build_data -> run_training, on the CPU."""
    settings = tiny_settings(run_dir, max_steps, **sections)
    tok, data = build_data(settings)
    extra = {"loss_fn": loss_fn} if loss_fn is not None else {}
    return run_training(settings, tok, data, CPU, **extra)


def test_lm_resume_restores_the_data_position_exactly(tmp_path: Path) -> None:
    sections: dict[str, Any] = {
        "checkpoint": {"interval": 10},
        "training": {"batch_size": 4, "block_size": 32, "eval_interval": 20, "eval_batches": 2},
    }
    straight = train(tmp_path / "straight", 20, **sections)
    train(tmp_path / "resumed", 20, **sections)
    last = Path(checkpoint_dir(str(tmp_path / "resumed"), 20))
    (last / MANIFEST).unlink()  # as if killed while committing step 20
    state = load_trainer_state(latest_checkpoint(str(tmp_path / "resumed")))
    assert state["step"] == 10 and state["data"]["step"] == 10  # TextDataModule's position
    resumed = train(tmp_path / "resumed", 20, **sections)
    a = load_checkpoint(str(tmp_path / "straight")).model.state_dict()
    b = load_checkpoint(str(tmp_path / "resumed")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history[-1] == straight.history[-1]


def write_chats(path: Path, n: int = 200) -> None:
    """A learnable chat task: the assistant reverses the user's word."""
    rng = random.Random(0)
    with path.open("w") as f:
        for _ in range(n):
            word = "".join(rng.choice("abcdefgh") for _ in range(rng.randint(3, 8)))
            msgs = [
                {"role": "user", "content": f"reverse {word}"},
                {"role": "assistant", "content": word[::-1]},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    with path.open("a") as f:
        f.write("not json\n")  # counted as malformed, not fatal


def test_sft_on_chat_jsonl_lowers_validation_loss(tmp_path: Path) -> None:
    chats = tmp_path / "chat.jsonl"
    write_chats(chats)
    settings = tiny_settings(
        tmp_path / "run", 40,
        training={"task": "sft", "batch_size": 4, "block_size": 96, "eval_interval": 10,
                  "eval_batches": 2},
        data={"source": str(chats), "val_fraction": 0.2},
        checkpoint={"interval": 40},
        optimization={"lr": 3e-3, "warmup_steps": 5, "peak_tflops": 1.0},
    )  # fmt: skip
    tok, data = build_data(settings)
    assert data.report is not None and data.report.malformed  # the bad line was reported
    batch = data.train_batch(0)
    # Packed rows: several chats per row, loss on assistant tokens only.
    assert int(batch.document_ids.max()) >= 2 and 0 < batch.n_loss_tokens < batch.labels.numel() / 3
    trainer = run_training(settings, tok, data, CPU)
    first, last = trainer.history[0]["val_loss"], trainer.history[-1]["val_loss"]
    assert last < first - 0.2, trainer.history
    assert load_trainer_state(latest_checkpoint(str(tmp_path / "run")))["data"]["task"] == "sft"


def test_prepared_shards_via_dataset_path_use_their_own_tokenizer(tmp_path: Path) -> None:
    from llm.data.tokenizers import tokenizer_fingerprint

    base = {"training": {"batch_size": 4, "block_size": 32}}
    tok, from_text = build_data(tiny_settings(tmp_path, **base))
    shards = from_text.config.dataset_path  # what `llm-data prepare` writes
    tok2, prepared = build_data(tiny_settings(tmp_path, data={"dataset_path": shards}, **base))
    assert tokenizer_fingerprint(tok2) == tokenizer_fingerprint(tok)
    assert torch.equal(prepared.train_batch(3).input_ids, from_text.train_batch(3).input_ids)
