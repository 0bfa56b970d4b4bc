"""FSDP2 (`fully_shard`) under torchrun: 2 CPU processes (gloo) train, write sharded
checkpoints (torch.distributed.checkpoint), resume exactly, and the engine's loader reads
the shards back as one model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tests.support import free_port

from llm.checkpoint import (
    MANIFEST,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    load_trainer_state,
    read_manifest,
)
from llm.data.corpus import default_corpus

pytestmark = pytest.mark.slow


def torchrun_fsdp(
    corpus: Path, run_dir: Path, max_steps: int, *extra: str
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2",
        f"--master-port={free_port()}", "-m", "llm_trainer",
        "--data.source", str(corpus), "--model.preset", "tiny", "--distributed.strategy", "fsdp",
        "--training.max-steps", str(max_steps), "--training.batch-size", "4",
        "--training.block-size", "32", "--training.eval-interval", "4",
        "--training.eval-batches", "2", "--training.log-interval", "2",
        "--checkpoint.interval", "4", "--checkpoint.run-dir", str(run_dir),
        "--optimization.peak-tflops", "1", "--distributed.timeout-s", "60", *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_fsdp_trains_and_resumes_exactly(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(default_corpus()[:15]))
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run_dir in (straight, resumed):
        proc = torchrun_fsdp(corpus, run_dir, 8)
        assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 8 and summary["val_loss"] < 4.6  # ln(vocab) before training
    # Sharded: each rank wrote its own shard through torch.distributed.checkpoint, and no
    # rank gathered the full weights.
    files = set(read_manifest(checkpoint_dir(str(straight), 8))["files"])
    assert {"dcp/.metadata", "dcp/__0_0.distcp", "dcp/__1_0.distcp"} <= files
    assert "model.safetensors" not in files
    # As if the job died while committing step 8: the rerun resumes from step 4.
    (Path(checkpoint_dir(str(resumed), 8)) / MANIFEST).unlink()
    assert load_trainer_state(latest_checkpoint(str(resumed)))["step"] == 4
    proc = torchrun_fsdp(corpus, resumed, 8)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr
    a = load_checkpoint(str(straight)).model.state_dict()
    b = load_checkpoint(str(resumed)).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_fsdp_with_activation_checkpointing_trains_the_same_weights(tmp_path: Path) -> None:
    """Checkpointing is applied before fully_shard (torchtitan's order): the blocks FSDP
    shards recompute in backward and the run ends where one without it does."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(default_corpus()[:15]))
    ac = ("--optimization.activation-checkpointing", "full")
    for name, extra in (("plain", ()), ("ac", ac)):
        proc = torchrun_fsdp(corpus, tmp_path / name, 4, *extra)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = load_checkpoint(str(tmp_path / "plain")).model.state_dict()
    b = load_checkpoint(str(tmp_path / "ac")).model.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
