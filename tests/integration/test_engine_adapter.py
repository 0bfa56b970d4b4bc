"""`llm-engine --adapter`: a base checkpoint plus a PEFT-layout LoRA adapter answers as the
merged model does (greedy, fp32), and differently from the base alone; on a base that is
a Hugging Face directory too."""

from __future__ import annotations

from pathlib import Path

import torch
from tests.integration.test_engine import GREEDY, ids_of, start_engine
from typer.testing import CliRunner

from llm.checkpoint import load_checkpoint
from llm.core.lora import apply_lora, unload_lora
from llm.inference import SamplingParams, generate
from llm.interop.peft import load_with_adapter, save_adapter
from llm_common.proto.v1 import engine_pb2 as pb
from llm_trainer.convert import app as convert_app

PROMPTS = ["The ", "def f(x):"]


def test_adapter_equals_merged_model(tiny_checkpoint: str, tmp_path: Path) -> None:
    loaded = load_checkpoint(tiny_checkpoint)
    torch.manual_seed(0)
    apply_lora(loaded.model, ["all-linear"], r=4, alpha=8)
    for name, p in loaded.model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.3)  # a trained-looking adapter, not a no-op
    save_adapter(loaded.model, tmp_path / "adapter")
    tok = loaded.tokenizer

    def local(model: torch.nn.Module) -> list[list[int]]:
        return [generate(model.eval(), tok.encode(p), max_new_tokens=24,
                         sampling=SamplingParams(0)) for p in PROMPTS]  # fmt: skip

    merged = local(unload_lora(loaded.model))
    unmerged = local(load_with_adapter(load_checkpoint(tiny_checkpoint).model, tmp_path / "adapter", merge=False))  # fmt: skip
    base = local(load_checkpoint(tiny_checkpoint).model)
    with start_engine(tiny_checkpoint, tmp_path / "engine.log",
                      "--adapter", str(tmp_path / "adapter")) as engine:  # fmt: skip
        stopping = pb.StoppingCriteria(max_tokens=24, ignore_eos=True)
        requests = [pb.GenerateRequest(text=p, sampling=GREEDY, stopping=stopping) for p in PROMPTS]
        served = [ids_of(list(engine.stub.Generate(r, timeout=60))) for r in requests]
    assert served == merged == unmerged
    assert served != base


def test_an_adapter_on_a_hugging_face_base_directory(tmp_path: Path) -> None:
    """The base as `llm-convert to-hf` writes it serves the adapter as our checkpoint does."""
    from llm.checkpoint import save_checkpoint
    from llm.config import ModelConfig
    from llm.data.bpe import train_bpe
    from llm.data.corpus import default_corpus
    from llm.data.tokenizers import HFTokenizer
    from llm.models.decoder import DecoderModel

    train_bpe(default_corpus()[:40], tmp_path / "tok", vocab_size=600)
    tok = HFTokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    config = ModelConfig.from_preset("llama", vocab_size=tok.vocab_size, dim=48, n_layers=2,
                                     n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64,
                                     init_std=0.2)  # fmt: skip
    model = DecoderModel(config)
    save_checkpoint(str(tmp_path / "base"), model, tok)
    apply_lora(model, ["all-linear"], r=4, alpha=8)
    for name, p in model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.3)
    save_adapter(model, tmp_path / "adapter")
    hf_dir = tmp_path / "base-hf"
    result = CliRunner().invoke(convert_app, ["to-hf", str(tmp_path / "base"), str(hf_dir)])
    assert result.exit_code == 0, result.output
    stopping = pb.StoppingCriteria(max_tokens=16, ignore_eos=True)
    requests = [pb.GenerateRequest(text=p, sampling=GREEDY, stopping=stopping) for p in PROMPTS]
    served = []
    for base in (tmp_path / "base", hf_dir):
        with start_engine(str(base), tmp_path / f"{base.name}.log",
                          "--adapter", str(tmp_path / "adapter")) as engine:  # fmt: skip
            served.append([ids_of(list(engine.stub.Generate(r, timeout=60))) for r in requests])
    merged = unload_lora(model).eval()
    want = [generate(merged, tok.encode(p), max_new_tokens=16, sampling=SamplingParams(0),
                     stop_token_ids=()) for p in PROMPTS]  # fmt: skip
    assert served[0] == served[1] == want
