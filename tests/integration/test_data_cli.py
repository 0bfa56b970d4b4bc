"""`llm-tokenizer train` and `llm-data prepare|inspect` as a user runs them: real processes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from llm.data.corpus import default_corpus
from llm.data.datamodule import DataConfig, TextDataModule
from llm.data.shards import TokenShards
from llm.data.tokenizers import HFTokenizer


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm_data", *args], capture_output=True, text=True, timeout=300
    )


def _summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_train_tokenizer_prepare_and_read_back(tmp_path: Path) -> None:
    src = tmp_path / "corpus.jsonl"
    docs = default_corpus()[:30]
    src.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    tok_dir = tmp_path / "tok"
    s = _summary(
        run(
            "tokenizer",
            "train",
            str(src),
            "--field",
            "body",
            "--out",
            str(tok_dir),
            "--vocab-size",
            "400",
            "--quiet",
        )
    )
    assert s["vocab_size"] == 400 and s["eos_id"] is not None and s["pad_id"] is not None
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tok_dir)).chat_template  # loadable, with ChatML

    out = tmp_path / "tokens"
    s = _summary(
        run(
            "prepare",
            str(src),
            "--field",
            "body",
            "--tokenizer",
            str(tok_dir),
            "--out",
            str(out),
            "--shard-tokens",
            "5000",
            "--workers",
            "2",
            "--quiet",
        )
    )
    assert s["event"] == "prepare_done" and s["documents"] == 30 and s["shards"] > 1
    tok = HFTokenizer(tok_dir)
    shards = TokenShards(str(out), tok.fingerprint())
    expected = np.concatenate([[*tok.encode(d), tok.eos_id] for d in docs])
    assert np.array_equal(np.asarray(shards.read(0, shards.n_tokens)), expected)
    dm = TextDataModule(DataConfig(dataset_path=str(out), seq_len=64, global_batch_size=4))
    assert dm.next_batch().input_ids.shape == (4, 64)

    info = json.loads(run("inspect", str(out)).stdout)
    assert info["n_tokens"] == s["tokens"] and info["tokenizer"]["fingerprint"] == tok.fingerprint()


def test_bad_input_exits_2_with_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "data.jsonl"
    src.write_text('{"text": "good line"}\n{"text": oops}\n{"text": "another"}\n')
    out = str(tmp_path / "out")
    proc = run("prepare", str(src), "--tokenizer", "char", "--out", out, "--strict", "--quiet")
    assert proc.returncode == 2 and "data.jsonl:2: invalid JSON" in proc.stderr
    assert "Traceback" not in proc.stderr
    s = _summary(run("prepare", str(src), "--tokenizer", "char", "--out", out, "--quiet"))
    assert s["documents"] == 2 and s["malformed"] == 1
    proc = run("prepare", str(tmp_path / "missing"), "--tokenizer", "char", "--out", out)
    assert proc.returncode == 2 and "missing: no such file or directory" in proc.stderr
    proc = run("prepare", str(src), "--tokenizer", str(tmp_path / "none"), "--out", out)
    assert proc.returncode == 2 and "no tokenizer found" in proc.stderr
