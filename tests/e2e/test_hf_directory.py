"""A Hugging Face model directory served as users have one: `llm-serve --checkpoint DIR`
answers the official openai client with `transformers`' own greedy tokens, applies the
directory's generation defaults, and lm-evaluation-harness scores the server exactly as it
scores `transformers` on the same directory."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
import transformers
from tests.e2e.e2e_services import Service, start, stop, wait_ready
from tests.support import chat_tokenizer

from llm.data.corpus import default_corpus

NAME = "tiny-llama"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What does the def statement do?"},
]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama saved by `save_pretrained` in two safetensors shards, with a
    byte-level BPE tokenizer, a ChatML template and a generation config."""
    out = tmp_path_factory.mktemp("hf") / NAME
    tok = chat_tokenizer(CHATML)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.3, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
        bos_token_id=None, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(out, max_shard_size="300KB")
    tok.save_pretrained(out)
    # The directory's sampling default: a request that sets no sampling gets top_k=1.
    generation = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**generation, "top_k": 1}))
    assert len(list(out.glob("*.safetensors"))) == 2
    return out


@pytest.fixture(scope="module")
def served(hf_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    service = start(
        "llm_gateway.serve",
        ["--checkpoint", str(hf_dir), "--port", "0", "--threads", "1"],
        log,
        "gateway_listening",
    )
    try:
        wait_ready(f"http://127.0.0.1:{service.port}")
        yield service
    finally:
        assert stop(service) == 0


def _client(service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{service.port}/v1", api_key="x", max_retries=0)


def test_chat_answer_equals_transformers_generate(hf_dir: Path, served: Service) -> None:
    client = _client(served)
    assert [m.id for m in client.models.list()] == [NAME]  # the directory's name
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(ids, do_sample=False, max_new_tokens=24, top_k=None, top_p=None)
    new = out[0, ids.shape[1] :].tolist()
    stopped = tok.eos_token_id in new
    want = tok.decode(new[: new.index(tok.eos_token_id)] if stopped else new)
    assert len(want) > 5  # a real answer, not an immediate stop

    reply = client.chat.completions.create(
        model=NAME, messages=MESSAGES, max_tokens=24, temperature=0
    )
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason == ("stop" if stopped else "length")
    assert reply.usage.prompt_tokens == ids.shape[1]

    # No sampling fields: the directory's generation_config.json (top_k=1) applies, as in
    # vLLM, so the answer is the greedy one; the request's own fields still win over it.
    default = client.chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=24)
    assert default.choices[0].message.content == want
    sampled = [
        client.chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=24, seed=s, extra_body={"top_k": 0}
        )
        .choices[0]
        .message.content
        for s in range(3)
    ]
    assert any(answer != want for answer in sampled)


MC = [
    {"question": "Question: which keyword defines a function?\nAnswer:",
     "choices": [" def", " class", " lambda", " import"], "answer": 0},
    {"question": "Question: what does a for statement do?\nAnswer:",
     "choices": [" loops", " returns", " raises"], "answer": 0},
    {"question": "The value of an empty list is", "choices": [" true", " false"], "answer": 1},
    {"question": "Python modules are imported with", "choices": [" import", " include", " use"],
     "answer": 0},
]  # fmt: skip


def _tasks(root: Path) -> Path:
    """A multiple-choice task and a rolling-loglikelihood task over local JSONL files."""
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in MC))
    texts = default_corpus()[70:76]
    (root / "ppl.jsonl").write_text("".join(json.dumps({"text": t[:400]}) + "\n" for t in texts))
    (root / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'mc.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    (root / "tiny_ppl.yaml").write_text(
        f"task: tiny_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {root / 'ppl.jsonl'}\ntest_split: test\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
    )
    return root


@pytest.mark.slow
def test_lm_eval_scores_the_server_as_it_scores_transformers(
    hf_dir: Path, served: Service, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = TaskManager(include_path=str(_tasks(tmp_path)))
    names = ["tiny_mc", "tiny_ppl"]
    server = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": NAME, "base_url": f"http://127.0.0.1:{served.port}/v1/completions",
                    "tokenizer_backend": "huggingface", "tokenizer": str(hf_dir),
                    "max_length": 512, "num_concurrent": 1, "max_retries": 1},
        tasks=names, task_manager=tasks,
    )["results"]  # fmt: skip
    reference = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(hf_dir), "dtype": "float32", "max_length": 512},
        tasks=names, task_manager=tasks, device="cpu",
    )["results"]  # fmt: skip
    assert server["tiny_mc"]["acc,none"] == reference["tiny_mc"]["acc,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        got, want = server["tiny_ppl"][metric], reference["tiny_ppl"][metric]
        assert math.isfinite(want) and got == pytest.approx(want, rel=1e-4), metric


FAMILIES = {
    "qwen2": lambda v, t: transformers.Qwen2Config(
        vocab_size=v, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.3, tie_word_embeddings=False, eos_token_id=t,
    ),
    "mistral": lambda v, t: transformers.MistralConfig(
        vocab_size=v, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        sliding_window=16, initializer_range=0.3, eos_token_id=t,
    ),
    "gemma2": lambda v, t: transformers.Gemma2Config(
        vocab_size=v, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=16,
        max_position_embeddings=512, initializer_range=0.3, eos_token_id=t,
    ),
    "phi3": lambda v, t: transformers.Phi3Config(
        vocab_size=v, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        initializer_range=0.3, eos_token_id=t, pad_token_id=0,
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_llm_generate_chats_as_transformers_does(hf_dir: Path, tmp_path: Path, family: str) -> None:
    """More families through a CLI: `llm-generate --chat` on a random directory of each
    (sliding windows included: the prompt is longer than the window) prints transformers'
    greedy answer."""
    from typer.testing import CliRunner

    from llm_engine.generate import app as generate_app

    out = tmp_path / family
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    torch.manual_seed(0)
    config = FAMILIES[family](len(tok), tok.eos_token_id)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    user = [{"role": "user", "content": MESSAGES[1]["content"]}]
    text = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.shape[1] > 16  # past the sliding window
    new = model.generate(ids, do_sample=False, max_new_tokens=12, top_k=None, top_p=None)
    new = new[0, ids.shape[1] :].tolist()
    want = tok.decode(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)
    assert len(want) > 3  # a real answer, not an immediate stop
    result = CliRunner().invoke(generate_app, [MESSAGES[1]["content"], "--checkpoint", str(out),
                                               "--chat", "--max-tokens", "12", "--temperature", "0"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.stdout == want + "\n"
