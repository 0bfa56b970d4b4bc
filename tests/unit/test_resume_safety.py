"""The trainer never resumes from a bad checkpoint and never loses its last good one."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from tests.support import CPU, tiny_settings, train_tiny

from llm import storage
from llm.checkpoint import (
    checkpoint_dir,
    list_checkpoints,
    load_trainer_state,
    read_manifest,
    verify,
)
from llm.settings import load_settings
from llm.training.data import build_data
from llm.training.run import run_training
from llm.training.trainer import Trainer

SMALL = {"training": {"batch_size": 4, "block_size": 32, "progress": False},
         "checkpoint": {"interval": 4}}  # fmt: skip


def _settings(run_dir: Path, fmt: str, base: Path) -> Any:
    if fmt != "adapter":
        return tiny_settings(run_dir, 8, **{**SMALL, "checkpoint": {"interval": 4, "format": fmt}})
    tree = tiny_settings(run_dir, 8, **SMALL).model_dump(mode="json", exclude={"model"})
    tree["checkpoint"]["init_from"] = str(base)
    tree["finetune"] = {"method": "lora", "r": 4}
    return load_settings(tree)


def _train(settings: Any) -> Trainer:
    tok, data = build_data(settings)
    return run_training(settings, tok, data, CPU)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A committed checkpoint to fine-tune adapters over."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    train_tiny(run_dir, 4, **SMALL)
    return run_dir


# The file each format's resume reads that the test corrupts.
CORRUPT = {"full": "model.safetensors", "sharded": "dcp/__0_0.distcp",
           "adapter": "adapter/adapter_model.safetensors"}  # fmt: skip


@pytest.mark.parametrize("fmt", ["full", "sharded", "adapter"])
def test_a_corrupted_newest_checkpoint_resumes_from_the_previous(
    fmt: str, base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run_dir = tmp_path / "run"
    settings = _settings(run_dir, fmt, base)
    _train(settings)
    newest = Path(checkpoint_dir(str(run_dir), 8))
    assert CORRUPT[fmt] in read_manifest(str(newest))["files"]
    data = bytearray((newest / CORRUPT[fmt]).read_bytes())
    data[-1] ^= 0xFF  # same size: only the hash can tell
    (newest / CORRUPT[fmt]).write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="llm.checkpoint"):
        again = _train(settings)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert f"not resuming from {newest}" in warned and f"{CORRUPT[fmt]}: sha256" in warned
    starts = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["step"] for r in starts if r["event"] == "start"] == [0, 4]
    assert again.step == 8
    verify(str(newest))  # step 8 written again, and good this time
    assert load_trainer_state(str(newest))["step"] == 8


def test_retention_that_cannot_delete_keeps_training(
    deny_deletes: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every delete on the store fails: each save warns, and the run goes on to the end."""
    run = storage.join(deny_deletes, "run")
    with caplog.at_level(logging.WARNING, logger="llm"):
        trainer = train_tiny(run, 12, **{**SMALL, "checkpoint": {"interval": 4, "keep_last": 1}})
    assert trainer.step == 12
    failed = [r.getMessage() for r in caplog.records if "could not delete" in r.getMessage()]
    assert failed and all("retain:" in m for m in failed)
    assert [c.rsplit("-", 1)[1] for c in list_checkpoints(run)] == [
        "00000004", "00000008", "00000012",
    ]  # fmt: skip
