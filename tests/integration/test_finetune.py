"""`llm-train --task sft` with LoRA and QLoRA over a base checkpoint, end to end.

The base is a tiny model with a character vocabulary covering the chats, committed as our
checkpoint; fine-tuning trains adapters on held-out-split chat JSONL. The adapter the run
writes must load in PEFT over the base's Hugging Face export with the same logits as ours,
and the merged final checkpoint must serve what base + adapter computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from llm.checkpoint import (
    WEIGHTS,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from llm.config import ModelConfig
from llm.core.qlora import NF4Linear
from llm.interop.hf import from_hf, to_hf
from llm.interop.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_with_adapter
from llm.models.decoder import DecoderModel
from llm.settings import load_settings
from llm.training.data import _char_tokenizer_for_chats, build_data
from llm.training.distributed import DistInfo
from llm.training.run import run_training

CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def chats_and_base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Reverse-a-word chats and a committed tiny base checkpoint with their vocabulary."""
    root = tmp_path_factory.mktemp("finetune")
    chats = root / "chat.jsonl"
    with chats.open("w") as f:
        for i in range(160):
            word = "abcdefgh"[i % 8] * (3 + i % 5) + "xyz"[i % 3]
            msgs = [{"role": "user", "content": f"reverse {word}"},
                    {"role": "assistant", "content": word[::-1]}]  # fmt: skip
            f.write(json.dumps({"messages": msgs}) + "\n")
    tokenizer = _char_tokenizer_for_chats(str(chats))
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=128)
    base = str(root / "base")
    save_checkpoint(base, DecoderModel(config), tokenizer)
    return chats, base


def _common(chats: Path, base: str, run_dir: Path, steps: int) -> dict[str, dict]:
    return {
        "training": {"task": "sft", "max_steps": steps, "batch_size": 8, "block_size": 96,
                     "eval_interval": 10, "eval_batches": 4, "log_interval": 10,
                     "progress": False},
        "data": {"source": str(chats), "val_fraction": 0.2},
        "optimization": {"lr": 1e-2, "warmup_steps": 2, "peak_tflops": 1.0},
        "checkpoint": {"run_dir": str(run_dir), "init_from": base, "interval": 10},
    }  # fmt: skip


def _flags(tree: dict[str, dict]) -> list[str]:
    out = []
    for section, values in tree.items():
        for k, v in values.items():
            flag = f"--{section}.{k.replace('_', '-')}"
            if isinstance(v, bool):
                out.append(flag if v else f"--no-{section}.{k.replace('_', '-')}")
            else:
                out += [flag, ",".join(v) if isinstance(v, list | tuple) else str(v)]
    return out


def test_lora_sft_cli_writes_a_peft_adapter_and_a_merged_checkpoint(
    chats_and_base: tuple[Path, str], tmp_path: Path
) -> None:
    chats, base = chats_and_base
    run_dir = tmp_path / "run"
    tree = _common(chats, base, run_dir, 30)
    tree["finetune"] = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.0,
                        "targets": ["q_proj", "v_proj", "o_proj", "up_proj"],
                        "save_merged": True}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "llm_trainer", *_flags(tree)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    evals = [
        r["val_loss"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r.get("event") == "eval"
    ]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.1, evals

    # Checkpoints hold the adapter, not the base; the final one also the merged weights.
    ckpts = list_checkpoints(str(run_dir))
    assert [c.rsplit("-", 1)[1] for c in ckpts] == ["00000010", "00000020", "00000030"][-2:]
    assert not Path(ckpts[0], WEIGHTS).exists() and Path(ckpts[-1], WEIGHTS).exists()
    adapter = run_dir / "adapter"
    assert {p.name for p in adapter.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    assert json.loads((adapter / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == base

    # PEFT loads the adapter over the base's HF export: the same logits as ours.
    from peft import PeftModel

    base_model = load_checkpoint(base).model
    to_hf(base_model, tmp_path / "hf")
    reference = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf"), adapter
    ).eval()
    ours = load_with_adapter(load_checkpoint(base).model, adapter).eval()
    merged = load_checkpoint(str(run_dir)).model  # the newest checkpoint: servable as is
    tokens = torch.randint(0, base_model.config.vocab_size, (2, 24))
    with torch.no_grad():
        logits = ours(tokens)
        torch.testing.assert_close(logits, reference(tokens).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(merged(tokens), logits, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(base_model(tokens), logits, atol=1e-3)


def test_qlora_trains_and_resumes_from_its_adapter(
    chats_and_base: tuple[Path, str], tmp_path: Path
) -> None:
    chats, base = chats_and_base
    tree = _common(chats, base, tmp_path / "run", 20)
    tree["finetune"] = {
        "method": "qlora",
        "r": 4,
        "targets": ["all-linear"],
        "quant_backend": "torch",
    }
    settings = load_settings(tree)
    tok, data = build_data(settings)
    engine = run_training(settings, tok, data, CPU)
    assert engine.step == 20 and engine.history[-1]["val_loss"] < engine.history[0]["val_loss"]
    assert isinstance(engine.model.layers[0].mlp.down_proj.base, NF4Linear)
    latest = latest_checkpoint(str(tmp_path / "run"))
    assert Path(latest, "adapter", ADAPTER_WEIGHTS).exists() and not Path(latest, WEIGHTS).exists()

    tree["training"]["max_steps"] = 24  # a restarted job: the base again, the adapter resumed
    settings = load_settings(tree)
    tok, data = build_data(settings)
    again = run_training(settings, tok, data, CPU)
    assert again.step == 24 and [r["step"] for r in again.history] == [24]
    assert again.history[0]["val_loss"] < engine.history[0]["val_loss"]


def test_lora_from_a_hugging_face_directory(
    chats_and_base: tuple[Path, str], tmp_path: Path
) -> None:
    from peft import PeftModel

    chats, base = chats_and_base
    loaded = load_checkpoint(base)
    hf_dir = tmp_path / "hf"
    to_hf(loaded.model, hf_dir)
    loaded.tokenizer.save(hf_dir)  # the base's tokenizer travels with it
    tree = _common(chats, str(hf_dir), tmp_path / "run", 10)
    tree["finetune"] = {"method": "lora", "targets": ["q_proj", "k_proj"]}
    settings = load_settings(tree)
    tok, data = build_data(settings)
    assert tok.vocab_size == loaded.tokenizer.vocab_size
    run_training(settings, tok, data, CPU)

    adapter = tmp_path / "run" / "adapter"
    ours = load_with_adapter(from_hf(hf_dir), adapter).eval()
    reference = PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(hf_dir), adapter
    ).eval()
    tokens = torch.randint(0, tok.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), reference(tokens).logits, atol=1e-5, rtol=1e-5)


def test_finetune_settings_errors_exit_2(chats_and_base: tuple[Path, str], tmp_path: Path) -> None:
    chats, base = chats_and_base

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "llm_trainer", "--training.task", "sft", "--data.source",
             str(chats), "--checkpoint.run-dir", str(tmp_path / "r"), *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    proc = run("--finetune.method", "lora")
    assert proc.returncode == 2 and "needs checkpoint.init_from" in proc.stderr
    proc = run("--finetune.method", "lora", "--checkpoint.init-from", base, "--model.dim", "32")
    assert proc.returncode == 2 and "model.dim" in proc.stderr
