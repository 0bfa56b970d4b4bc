"""`llm-train` as a user runs it: a real process, real files, clear errors."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from llm.checkpoint import latest_checkpoint
from llm.data.corpus import default_corpus


def run_train(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm_trainer", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, **(env or {})},
    )  # fmt: skip


def test_trains_on_a_text_file_and_commits_a_checkpoint(tmp_path: Path) -> None:
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(default_corpus()[:20]))
    out = tmp_path / "run"
    proc = run_train(
        "--data.source", str(corpus), "--model.preset", "tiny", "--training.max-steps", "30",
        "--training.batch-size", "4", "--training.block-size", "32",
        "--training.eval-interval", "30", "--training.eval-batches", "2",
        env={"LLM_CHECKPOINT__RUN_DIR": str(out)},  # settings from the environment work too
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["event"] == "train_done" and summary["step"] == 30
    assert summary["val_loss"] < 4.0  # ln(vocab) is ~4.5 before training
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    # The character tokenizer on mostly ASCII text: about one token per byte.
    bpb = summary["val_loss"] / math.log(2)
    assert 0.9 * bpb < summary["val_bits_per_byte"] <= 1.01 * bpb
    # One screen at the start (stderr: stdout's last line stays the JSON summary), then ETA.
    assert "run summary" in proc.stderr
    assert "tokens per optimizer step: 128 = batch 4 x block 32 x grad accum 1 x world size 1" in (
        proc.stderr
    )
    assert f"checkpoints: every 500 steps to {out}" in proc.stderr
    assert re.search(r"step 6: [\d.]+ s/step, ETA \dm\d\ds for the remaining 24 steps", proc.stderr)
    assert latest_checkpoint(str(out)).endswith("step-00000030")


def test_bad_input_exits_2_naming_the_problem(tmp_path: Path) -> None:
    run_dir = ("--checkpoint.run-dir", str(tmp_path / "r"))
    proc = run_train(*run_dir, "--model.preset", "huge")
    assert proc.returncode == 2 and "unknown preset 'huge'" in proc.stderr
    proc = run_train(*run_dir, "--data.source", str(tmp_path / "missing.txt"))
    assert proc.returncode == 2 and "missing.txt: no such file" in proc.stderr
    proc = run_train(*run_dir, "--model.preset", "tiny", "--model.n-kv-heads", "3")
    assert proc.returncode == 2 and "n_kv_heads=3" in proc.stderr
    proc = run_train(*run_dir, "--optimization.lr", "-1")
    assert proc.returncode == 2 and "optimization.lr" in proc.stderr


def test_too_small_corpus_is_a_clear_error(tmp_path: Path) -> None:
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("just a few words")
    proc = run_train(
        "--checkpoint.run-dir", str(tmp_path / "r"), "--data.source", str(corpus),
        "--training.block-size", "64",
    )  # fmt: skip
    assert proc.returncode == 2 and "split has" in proc.stderr and "block_size" in proc.stderr


def test_sft_task_on_chat_jsonl(tmp_path: Path) -> None:
    chats = tmp_path / "chat.jsonl"
    with chats.open("w") as f:
        for i in range(120):
            word = "abcdefgh"[i % 8] * (3 + i % 5) + "xyz"[i % 3]
            msgs = [{"role": "user", "content": f"reverse {word}"},
                    {"role": "assistant", "content": word[::-1]}]  # fmt: skip
            f.write(json.dumps({"messages": msgs}) + "\n")
    proc = run_train(
        "--training.task", "sft", "--data.source", str(chats), "--data.val-fraction", "0.2",
        "--model.preset", "tiny", "--training.max-steps", "20", "--training.batch-size", "4",
        "--training.block-size", "96", "--training.eval-interval", "20",
        "--training.eval-batches", "2", "--checkpoint.run-dir", str(tmp_path / "run"),
        "--optimization.peak-tflops", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 20 and summary["val_loss"] < 3.0  # ln(vocab) ~3.4 untrained
    proc = run_train("--training.task", "sft", "--checkpoint.run-dir", str(tmp_path / "r2"))
    assert proc.returncode == 2 and "training.task=sft needs data.source" in proc.stderr


def test_muon_run_learns_and_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    corpus = tmp_path / "docs.txt"
    corpus.write_text("\n\n".join(default_corpus()[:20]))
    out = tmp_path / "run"
    args = (
        "--data.source", str(corpus), "--model.preset", "tiny", "--training.batch-size", "8",
        "--training.block-size", "32", "--training.eval-interval", "10",
        "--training.eval-batches", "4", "--checkpoint.run-dir", str(out),
        "--checkpoint.interval", "30", "--optimization.optimizer", "muon",
        "--optimization.muon-lr", "0.02", "--optimization.lr", "3e-3",
        "--optimization.warmup-steps", "5",
    )  # fmt: skip
    first = run_train(*args, "--training.max-steps", "30")
    assert first.returncode == 0, first.stderr
    evals = [
        json.loads(line)["val_loss"]
        for line in (out / "metrics.jsonl").open()
        if json.loads(line)["event"] == "eval"
    ]
    # ln(vocab) is ~4.5 before training; every evaluation (steps 10, 20, 30) is lower.
    assert len(evals) == 3 and evals[0] > evals[1] > evals[2] and evals[2] < 3.3, evals
    second = run_train(*args, "--training.max-steps", "45")
    assert second.returncode == 0, second.stderr
    assert re.search(r"resumed from \S+step-00000030 at step 30", second.stderr), second.stderr
    summary = json.loads(second.stdout.strip().splitlines()[-1])
    assert summary["event"] == "train_done" and summary["step"] == 45
    assert summary["val_loss"] < evals[-1]  # it went on learning from where it stopped
    assert latest_checkpoint(str(out)).endswith("step-00000045")
