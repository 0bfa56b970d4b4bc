"""`llm-engine --adapter`: a base checkpoint plus a PEFT-layout LoRA adapter answers as the
merged model does (greedy, fp32), and differently from the base alone; on a base that is
a Hugging Face directory too. Adapters served beside the base (`--lora`) unload by
draining."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest
import torch
from tests.integration.test_engine import GREEDY, ids_of, start_engine
from tests.support import long_context_loras
from typer.testing import CliRunner

from llm.checkpoint import load_checkpoint, save_checkpoint
from llm.config import ModelConfig
from llm.core.lora import apply_lora, unload_lora
from llm.inference import SamplingParams, generate
from llm.interop.peft import load_with_adapter, save_adapter
from llm.models.decoder import DecoderModel
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
    from llm.data.bpe import train_bpe
    from llm.data.corpus import default_corpus
    from llm.data.tokenizers import HFTokenizer

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


def test_unloading_an_adapter_drains_it(tmp_path: Path) -> None:
    """UnloadLoRAAdapter while a generation runs with the adapter and another waits for it
    (one slot): the waiting one ends NOT_FOUND naming the adapter, the running one finishes
    with it (the tokens of the same request before the unload), a new one is NOT_FOUND,
    and once the running one ended another adapter loads into the freed slot."""
    base, merged, tok = long_context_loras(tmp_path, {"a": 1, "b": 2})
    prompt = tok.encode("The ")

    def request(model: str, max_tokens: int) -> pb.GenerateRequest:
        stopping = pb.StoppingCriteria(max_tokens=max_tokens, ignore_eos=True)
        return pb.GenerateRequest(text="The ", model=model, sampling=GREEDY, stopping=stopping)

    def greedy(model: DecoderModel, n: int) -> list[int]:
        return generate(model, prompt, max_new_tokens=n, sampling=SamplingParams(0), stop_token_ids=())  # fmt: skip

    with start_engine(str(tmp_path / "base"), tmp_path / "engine.log", "--slots", "1",
                      "--lora", f"a={tmp_path / 'a'}", "--max-loras", "1",
                      "--max-lora-rank", "2") as engine:  # fmt: skip
        stub = engine.stub
        reference = ids_of(list(stub.Generate(request("a", 1000), timeout=120)))
        assert reference[:12] == greedy(merged["a"], 12) != greedy(base, 12)

        running = stub.Generate(request("a", 1000), timeout=120)
        first = next(running)
        waiting = stub.Generate(request("a", 4), timeout=120)
        deadline = time.monotonic() + 10
        while engine.metrics()["llm_engine_queue_depth"] < 1:  # queued behind the slot
            assert time.monotonic() < deadline
            time.sleep(0.01)
        unloaded = stub.UnloadLoRAAdapter(pb.UnloadLoRAAdapterRequest(lora_name="a"))
        assert unloaded.running_requests == 1
        with pytest.raises(grpc.RpcError) as e:
            list(waiting)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'a'" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(request("a", 4), timeout=30))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND and "'a'" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:  # its slot is still taken
            stub.LoadLoRAAdapter(pb.LoadLoRAAdapterRequest(lora_name="b", lora_path=str(tmp_path / "b")))  # fmt: skip
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        rest = list(running)
        assert ids_of([first, *rest]) == reference
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH

        stub.LoadLoRAAdapter(pb.LoadLoRAAdapterRequest(lora_name="b", lora_path=str(tmp_path / "b")))  # fmt: skip
        assert ids_of(list(stub.Generate(request("b", 12), timeout=60))) == greedy(merged["b"], 12)
        info = stub.ModelInfo(pb.ModelInfoRequest())
        assert [a.name for a in info.lora_adapters] == ["b"]
