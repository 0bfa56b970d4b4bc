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
