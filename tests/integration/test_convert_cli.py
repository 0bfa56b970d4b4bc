"""`llm-convert to-hf / from-hf`: transformers loads what we write and generates our greedy
tokens; a Hugging Face directory comes back as a checkpoint with the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from typer.testing import CliRunner

from llm.checkpoint import load_checkpoint, save_checkpoint
from llm.config import ModelConfig
from llm.data.bpe import train_bpe
from llm.data.corpus import default_corpus
from llm.data.tokenizers import HFTokenizer, SimpleCharacterTokenizer
from llm.inference import SamplingParams, generate
from llm.models.decoder import DecoderModel
from llm_trainer.convert import app

runner = CliRunner()
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("convert")
    train_bpe(default_corpus()[:40], root / "tok", vocab_size=600)
    tok = HFTokenizer(root / "tok")
    tok.set_chat_template(TEMPLATE)
    torch.manual_seed(0)
    config = ModelConfig.from_preset(
        "llama", vocab_size=tok.vocab_size, dim=48, n_layers=2, n_heads=4, n_kv_heads=2,
        hidden_dim=64, max_seq_len=64,
    )  # fmt: skip
    save_checkpoint(str(root / "ckpt"), DecoderModel(config), tok)
    return root / "ckpt"


def test_to_hf_loads_in_transformers_and_generates_our_tokens(
    checkpoint: Path, tmp_path: Path
) -> None:
    out = tmp_path / "hf"
    result = runner.invoke(app, ["to-hf", str(checkpoint), str(out)])
    assert result.exit_code == 0, result.output
    ours = load_checkpoint(str(checkpoint))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    prompt = "def main():\n    return"
    ids = ours.tokenizer.encode(prompt)
    assert hf_tok.encode(prompt, add_special_tokens=False) == ids
    want = generate(ours.model.eval(), ids, max_new_tokens=12, sampling=SamplingParams(0),
                    stop_token_ids=())  # fmt: skip
    got = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert got[0, len(ids) :].tolist() == want
    messages = [{"role": "user", "content": "hi"}]
    assert hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == ours.tokenizer.apply_chat_template(messages)
    stop = transformers.GenerationConfig.from_pretrained(out).eos_token_id
    assert ([stop] if isinstance(stop, int) else stop) == ours.tokenizer.stop_ids

    # And back: the same weights and tokenizer, as a committed checkpoint.
    back = tmp_path / "back"
    result = runner.invoke(app, ["from-hf", str(out), str(back)])
    assert result.exit_code == 0, result.output
    again = load_checkpoint(str(back))
    assert again.tokenizer.fingerprint() == ours.tokenizer.fingerprint()
    for (name, a), (_, b) in zip(
        ours.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_bad_inputs_exit_2_naming_the_problem(checkpoint: Path, tmp_path: Path) -> None:
    char = tmp_path / "char"
    tok = SimpleCharacterTokenizer.train("abc ")
    config = ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)
    save_checkpoint(str(char), DecoderModel(config), tok)
    result = runner.invoke(app, ["to-hf", str(char), str(tmp_path / "out")])
    assert result.exit_code == 2 and "SimpleCharacterTokenizer" in result.output

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "llama"}')
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    result = runner.invoke(app, ["from-hf", str(pickled), str(tmp_path / "x")])
    assert result.exit_code == 2 and "pytorch_model.bin" in result.output
    result = runner.invoke(app, ["from-hf", str(tmp_path / "nothing"), str(tmp_path / "y")])
    assert result.exit_code == 2 and "config.json" in result.output

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep").write_text("")
    result = runner.invoke(app, ["to-hf", str(checkpoint), str(full)])
    assert result.exit_code == 2 and "not empty" in result.output


def test_a_hugging_face_directory_serves_as_a_checkpoint(
    checkpoint: Path, tmp_path: Path, s3_bucket: str
) -> None:
    """Every command that takes --checkpoint takes the HF directory, local or s3://."""
    import json

    import s3fs

    from llm.checkpoint import CheckpointError
    from llm_engine.generate import app as generate_app

    out = tmp_path / "my-model"
    assert runner.invoke(app, ["to-hf", str(checkpoint), str(out)]).exit_code == 0
    ours = load_checkpoint(str(checkpoint))
    prompt = ours.tokenizer.encode("def main():")
    want = generate(ours.model, prompt, max_new_tokens=10, sampling=SamplingParams(0),
                    stop_token_ids=())  # fmt: skip
    config = json.loads((out / "generation_config.json").read_text())
    config["eos_token_id"] = [ours.tokenizer.eos_id, want[4]]  # a second EOS id
    (out / "generation_config.json").write_text(json.dumps(config))

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.put(str(out), f"{s3_bucket}/hf/my-model", recursive=True)
    for uri in (str(out), f"{s3_bucket}/hf/my-model"):
        loaded = load_checkpoint(uri)
        assert loaded.name == "my-model"
        assert {ours.tokenizer.eos_id, want[4]} <= set(loaded.tokenizer.stop_ids)
        assert want[4] not in ours.tokenizer.stop_ids
        got = generate(loaded.model, prompt, max_new_tokens=10, sampling=SamplingParams(0),
                       stop_token_ids=())  # fmt: skip
        assert got == want, uri
    # llm-generate stops at the generation config's second EOS id.
    result = runner.invoke(generate_app, ["def main():", "--checkpoint", str(out),
                                          "--max-tokens", "10", "--temperature", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    stops = {*ours.tokenizer.stop_ids, want[4]}
    end = next(i for i, t in enumerate(want) if t in stops)
    assert result.stdout == ours.tokenizer.decode(want[:end]) + "\n"

    (out / "model.safetensors").rename(out / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: pickle weights are refused"):
        load_checkpoint(str(out))
    (out / "pytorch_model.bin").rename(out / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (out / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError, match=r"model-00002-of-00002\.safetensors, which is missing"
    ):
        load_checkpoint(str(out))


def test_full_fine_tuning_takes_the_architecture_of_a_hugging_face_directory(
    checkpoint: Path, tmp_path: Path
) -> None:
    """`checkpoint.init_from=HF_DIR` with no model settings: its config, weights and
    tokenizer (one step at a negligible learning rate leaves the weights as they were)."""
    from llm.settings import load_settings
    from llm.training.data import build_data
    from llm.training.distributed import DistInfo
    from llm.training.run import run_training

    out = tmp_path / "hf"
    assert runner.invoke(app, ["to-hf", str(checkpoint), str(out)]).exit_code == 0
    text = tmp_path / "text.txt"
    text.write_text("".join(default_corpus()[:20]))
    settings = load_settings({
        "training": {"max_steps": 1, "batch_size": 2, "block_size": 32, "eval_interval": 1,
                     "eval_batches": 1, "log_interval": 1, "progress": False},
        "data": {"source": str(text)},
        "optimization": {"lr": 1e-12, "warmup_steps": 0},
        "checkpoint": {"run_dir": str(tmp_path / "run"), "init_from": str(out), "interval": 1},
    })  # fmt: skip
    tok, data = build_data(settings)
    cpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
    run_training(settings, tok, data, cpu)
    base, tuned = load_checkpoint(str(checkpoint)), load_checkpoint(str(tmp_path / "run"))
    assert tuned.config == base.config
    assert tuned.tokenizer.fingerprint() == base.tokenizer.fingerprint()
    for (name, a), (_, b) in zip(
        base.model.state_dict().items(), tuned.model.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)
