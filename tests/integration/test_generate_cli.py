"""`llm-generate`: one prompt streamed, a JSONL file batched through the slots, bad input."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from llm.checkpoint import load_checkpoint
from llm.inference import SamplingParams, generate
from llm_engine.generate import app

runner = CliRunner()


def _greedy_text(checkpoint: str, prompt: str, n: int) -> str:
    loaded = load_checkpoint(checkpoint)
    tok = loaded.tokenizer
    ids = generate(loaded.model.eval(), tok.encode(prompt), max_new_tokens=n,
                   sampling=SamplingParams(0), stop_token_ids=tok.stop_ids)  # fmt: skip
    return tok.decode([i for i in ids if i not in tok.stop_ids])


def test_one_prompt_streams_the_greedy_text(tiny_checkpoint: str) -> None:
    result = runner.invoke(app, ["The ", "--checkpoint", tiny_checkpoint, "--max-tokens", "20",
                                 "--temperature", "0", "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == _greedy_text(tiny_checkpoint, "The ", 20) + "\n"


def test_jsonl_runs_batched_in_input_order(tiny_checkpoint: str, tmp_path: Path) -> None:
    prompts = ["The ", "def f(x):", "import os", "class A:", "# a", "x = 1"]
    lines = [json.dumps(p) for p in prompts[:3]] + [
        json.dumps({"prompt": p, "max_tokens": 9, "seed": 3}) for p in prompts[3:]
    ]
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["--input", str(path), "--checkpoint", tiny_checkpoint,
                                 "--max-tokens", "12", "--temperature", "0", "--slots", "3"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in rows] == list(range(6))
    for r, p in zip(rows[:3], prompts[:3], strict=True):
        assert r["text"] == _greedy_text(tiny_checkpoint, p, 12)
    assert all(r["completion_tokens"] <= 9 for r in rows[3:])


def test_a_bad_line_names_file_and_line(tiny_checkpoint: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('"ok"\n{"prompt": "x", "temperature": -1}\n')
    result = runner.invoke(app, ["--input", str(path), "--checkpoint", tiny_checkpoint])
    assert result.exit_code == 2
    assert f"{path}:2: temperature: must be >= 0" in result.output
    path.write_text('"ok"\n{not json\n')
    result = runner.invoke(app, ["--input", str(path), "--checkpoint", tiny_checkpoint])
    assert result.exit_code == 2 and f"{path}:2: not JSON" in result.output
    result = runner.invoke(app, ["x", "--checkpoint", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "missing" in result.output
