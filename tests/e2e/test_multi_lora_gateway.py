"""Several LoRA adapters behind the gateway, with the official openai client: `model` picks
the adapter (the merged model's greedy text), /v1/models lists each with its parent,
adapters load and unload at run time with an admin key, and an unknown model is a 404
naming it. An unload drains the adapter: a stream running with it completes, a request
queued for it is a 404 naming it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from tests.e2e.e2e_services import running_stack
from tests.support import free_port, long_context_loras

from llm.checkpoint import load_checkpoint
from llm.core.lora import apply_lora, unload_lora
from llm.inference import SamplingParams, generate
from llm.interop.peft import save_adapter

PROMPT = "The "
N = 12


def _adapter(checkpoint: str, out: Path, seed: int, r: int) -> str:
    """A trained-looking adapter (B not zero) and the greedy text of its merged model."""
    loaded = load_checkpoint(checkpoint)
    apply_lora(loaded.model, ["all-linear"], r=r, alpha=2.0 * r)
    torch.manual_seed(seed)
    for name, p in loaded.model.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(p, std=0.3)
    save_adapter(loaded.model, out)
    tok = loaded.tokenizer
    ids = generate(unload_lora(loaded.model).eval(), tok.encode(PROMPT), max_new_tokens=N,
                   sampling=SamplingParams(0), stop_token_ids=())  # fmt: skip
    return tok.decode(ids)


def test_adapters_by_model_name_loaded_and_unloaded_at_run_time(
    tiny_checkpoint: str, tmp_path: Path
) -> None:
    want = {"a": _adapter(tiny_checkpoint, tmp_path / "a", 1, 2),
            "b": _adapter(tiny_checkpoint, tmp_path / "b", 2, 4)}  # fmt: skip
    engine_args = ["--model-name", "base", "--lora", f"a={tmp_path / 'a'}", "--max-loras", "2",
                   "--max-lora-rank", "4"]  # fmt: skip
    with running_stack(tiny_checkpoint, tmp_path, engine_args, ["--admin-key", "root"]) as (
        _,
        gateway,
    ):
        url = f"http://127.0.0.1:{gateway.port}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)

        def complete(model: str) -> str:
            reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=N,
                                              temperature=0, extra_body={"ignore_eos": True})  # fmt: skip
            assert reply.model == model
            return reply.choices[0].text

        models = {m.id: m for m in client.models.list()}
        assert set(models) == {"base", "a"}
        assert models["a"].parent == "base" and models["base"].parent is None
        assert complete("a") == want["a"]
        assert complete("base") != want["a"]

        body = {"lora_name": "b", "lora_path": str(tmp_path / "b")}
        assert httpx.post(f"{url}/v1/load_lora_adapter", json=body).status_code == 401
        wrong = {"Authorization": "Bearer x"}
        assert httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=wrong).status_code == 401  # fmt: skip
        admin = {"Authorization": "Bearer root"}
        loaded = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=admin, timeout=60)
        assert loaded.status_code == 200, loaded.text
        again = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=admin, timeout=60)
        assert again.status_code == 400 and "already loaded" in again.text
        assert {m.id for m in client.models.list()} == {"base", "a", "b"}
        assert complete("b") == want["b"]
        assert client.models.retrieve("b").parent == "base"

        gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "b"}, headers=admin)
        assert gone.status_code == 200, gone.text
        for name in ("b", "nope"):
            with pytest.raises(openai.NotFoundError, match=f"the model '{name}' does not exist"):
                complete(name)
        missing = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "b"}, headers=admin)  # fmt: skip
        assert missing.status_code == 404
        assert complete("a") == want["a"]  # the other adapter is untouched


def test_unloading_an_adapter_in_use_drains_it(tmp_path: Path) -> None:
    """One slot: a stream runs with adapter `a` and another request for `a` waits. Unloading
    `a` answers at once; the waiting request is a 404 model_not_found naming `a`, the
    stream completes with the tokens it gets without an unload, a new request for `a` is a
    404, and once the stream ended adapter `b` loads into the freed slot. The gateway and
    the engine stay up throughout."""
    _, merged, tok = long_context_loras(tmp_path, {"a": 1, "b": 2})
    metrics_port = free_port()
    engine_args = ["--model-name", "base", "--slots", "1", "--lora", f"a={tmp_path / 'a'}",
                   "--max-loras", "1", "--max-lora-rank", "2", "--metrics-port", str(metrics_port)]  # fmt: skip
    with running_stack(str(tmp_path / "base"), tmp_path, engine_args, ["--admin-key", "root"]) as (
        _,
        gateway,
    ):
        url = f"http://127.0.0.1:{gateway.port}"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
        admin = {"Authorization": "Bearer root"}
        long = dict(prompt=PROMPT, max_tokens=1000, temperature=0, extra_body={"ignore_eos": True})

        reference = client.completions.create(model="a", **long).choices[0].text
        assert reference[:N] == tok.decode(generate(merged["a"], tok.encode(PROMPT), max_new_tokens=N, sampling=SamplingParams(0), stop_token_ids=()))  # fmt: skip

        stream = client.completions.create(model="a", stream=True, **long)
        text = next(iter(stream)).choices[0].text
        waited: list[BaseException] = []

        def wait_for_a() -> None:
            try:
                client.completions.create(model="a", prompt=PROMPT, max_tokens=4)
            except openai.APIError as e:
                waited.append(e)

        waiting = threading.Thread(target=wait_for_a)
        waiting.start()
        deadline = time.monotonic() + 10
        while _queue_depth(metrics_port) < 1:  # queued behind the slot
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a"}, headers=admin)  # fmt: skip
        assert gone.status_code == 200 and "1 requests running with it finish first" in gone.text
        waiting.join(30)
        (error,) = waited
        assert isinstance(error, openai.NotFoundError)
        assert error.body["code"] == "model_not_found" and "'a'" in error.body["message"]
        with pytest.raises(openai.NotFoundError, match="the model 'a' does not exist"):
            client.completions.create(model="a", prompt=PROMPT, max_tokens=4)
        text += "".join(c.choices[0].text for c in stream if c.choices)
        assert text == reference

        body = {"lora_name": "b", "lora_path": str(tmp_path / "b")}
        loaded = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=admin, timeout=60)
        assert loaded.status_code == 200, loaded.text
        reply = client.completions.create(model="b", prompt=PROMPT, max_tokens=N, temperature=0,
                                          extra_body={"ignore_eos": True})  # fmt: skip
        want = generate(merged["b"], tok.encode(PROMPT), max_new_tokens=N, sampling=SamplingParams(0), stop_token_ids=())  # fmt: skip
        assert reply.choices[0].text == tok.decode(want)
        assert {m.id for m in client.models.list()} == {"base", "b"}


def _queue_depth(metrics_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] not in ("#", ""))
    return float(values["llm_engine_queue_depth"])
