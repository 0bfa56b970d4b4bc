"""Helpers shared by tests (a module, not conftest, so tests can import it by name)."""

from __future__ import annotations

import asyncio
import http.client
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from llm.config import PRESETS
from llm.settings import load_settings
from llm.training.data import build_data
from llm.training.distributed import DistInfo
from llm.training.run import run_training
from llm.training.trainer import Trainer

TINY_STEPS = 300
VOCAB = 97  # the vocabulary of shrunk test models
CPU = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))


def tiny_settings(run_dir: Path, max_steps: int = TINY_STEPS, **sections: dict[str, Any]) -> Any:
    """Settings for the `tiny` preset on Python's reference docs (seconds on 2 cores)."""
    base: dict[str, dict[str, Any]] = {
        "model": {"preset": "tiny"},
        "training": {"max_steps": max_steps, "batch_size": 16, "block_size": 64,
                     "eval_interval": 100, "eval_batches": 10, "log_interval": 100},
        "optimization": {"lr": 3e-3, "warmup_steps": 20},
        "checkpoint": {"run_dir": str(run_dir), "interval": 100},
    }  # fmt: skip
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return load_settings(base)


def train_tiny(run_dir: Path, max_steps: int = TINY_STEPS, **sections: dict[str, Any]) -> Trainer:
    settings = tiny_settings(run_dir, max_steps, **sections)
    tok, data = build_data(settings)
    return run_training(settings, tok, data, CPU)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 20) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; the exit code."""
    proc.terminate()
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextmanager
def serve_gateway(app: object) -> Iterator[str]:
    """The app on a real uvicorn server on 127.0.0.1 in a thread (real HTTP connections,
    so a client can really disconnect); yields its base URL."""
    from llm_gateway.cli import HttpServer
    from llm_gateway.settings import GatewaySettings

    settings = GatewaySettings(engine=["127.0.0.1:1"], host="127.0.0.1", port=0)
    server = HttpServer(app, settings)  # type: ignore[arg-type]
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    wait_for(lambda: server.server.started, 10, "the gateway to start")
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.stop()
        thread.join(15)


def shrink(preset: str) -> dict[str, object]:
    """Overrides that keep a preset's features (GQA, MoE, MLA, windows, scaling) at test size."""
    p = PRESETS[preset]
    o: dict[str, object] = dict(vocab_size=VOCAB, dim=48, n_layers=2, n_heads=4, max_seq_len=64)
    o["n_kv_heads"] = 4 if p.get("n_kv_heads", p["n_heads"]) == p["n_heads"] else 2
    if "head_dim" in p:
        o["head_dim"] = 10  # deliberately not dim / n_heads
    if "hidden_dim" in p:
        o["hidden_dim"] = 40
    if p.get("mlp_impl") == "moe":
        o.update(n_experts=4, n_experts_per_tok=2, moe_hidden_dim=24)
        if p.get("shared_expert_hidden_dim"):
            o["shared_expert_hidden_dim"] = 32
    if p.get("attn_impl") == "mla":
        o.update(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    if p.get("sliding_window"):
        o["sliding_window"] = 5
    if p.get("rope_scaling"):
        o["rope_scaling"] = {**p["rope_scaling"], "original_max_seq_len": 16}
    return o


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (f"touch {self.marker}",))


def sharded_checkpoint_that_runs_code(
    run_dir: Path, marker: Path
) -> tuple[Path, torch.nn.Module, torch.optim.Optimizer]:
    """A committed sharded checkpoint of a tiny model whose DCP `.metadata` is a pickle that,
    if unpickled, creates `marker` (what an attacker with write access to a bucket can do).
    The honest checkpoint is checked to load first."""
    import hashlib
    import pickle

    from llm.checkpoint import MANIFEST, load_checkpoint, read_manifest, save_checkpoint
    from llm.checkpoint.commit import commit
    from llm.checkpoint.format import DCP_DIR, METADATA
    from llm.checkpoint.sharded import save_sharded
    from llm.config import ModelConfig
    from llm.data.tokenizers import SimpleCharacterTokenizer
    from llm.models import DecoderModel

    tok = SimpleCharacterTokenizer.train("hello world")
    model = DecoderModel(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size))
    optimizer = torch.optim.AdamW(model.parameters())
    ckpt = run_dir / "checkpoints" / "step-00000001"
    save_sharded(str(ckpt), model, optimizer)
    save_checkpoint(str(ckpt), model, tok, weights=False)
    assert load_checkpoint(str(ckpt)).config == model.config
    payload = pickle.dumps(_RunsCode(marker))
    (ckpt / DCP_DIR / METADATA).write_bytes(payload)
    files = read_manifest(str(ckpt))["files"]
    files[f"{DCP_DIR}/{METADATA}"] = {"size": len(payload),
                                      "sha256": hashlib.sha256(payload).hexdigest()}  # fmt: skip
    (ckpt / MANIFEST).unlink()
    commit(str(ckpt), files)  # a manifest that vouches for the crafted file
    return ckpt, model, optimizer


class S3Proxy(ThreadingHTTPServer):
    """A pass-through proxy to an S3 server on 127.0.0.1; `intercept` may answer a request
    itself (subclasses fail or hold chosen requests)."""

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), _S3ProxyHandler)
        self.upstream = upstream

    def intercept(self, handler: BaseHTTPRequestHandler) -> bool:
        """True when `handler` was dealt with here: not forwarded."""
        return False


class _S3ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: S3Proxy

    def log_message(self, *args: object) -> None:
        pass

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        if self.server.intercept(self):
            return
        host, port = self.server.upstream.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request(self.command, self.path, body or None, dict(self.headers))
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        # A HEAD answer has no body but the object's length.
        self.send_header("Content-Length", resp.getheader("Content-Length") or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


class DenyDeletes(S3Proxy):
    """Answers every delete with AccessDenied."""

    def intercept(self, handler: BaseHTTPRequestHandler) -> bool:
        if not (
            handler.command == "DELETE" or (handler.command == "POST" and "delete" in handler.path)
        ):
            return False
        error = b"<Error><Code>AccessDenied</Code><Message>no</Message></Error>"
        handler.send_response(403)
        handler.send_header("Content-Type", "application/xml")
        handler.send_header("Content-Length", str(len(error)))
        handler.end_headers()
        handler.wfile.write(error)
        return True


def require_binary(name: str, install: str) -> str:
    """The path of an external program a test needs: skipped where it is not installed,
    except in CI (`CI` set), where its absence is a failure (.ci/run installs it)."""
    import os
    import shutil

    import pytest

    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed ({install})"
        if os.environ.get("CI"):
            pytest.fail(f"{message}; CI must run this test")
        pytest.skip(message)
    return path


def chat_tokenizer(chat_template: str, specials: tuple[str, ...] = ()) -> Any:
    """A byte-level BPE (384 tokens, trained on the built-in corpus) with ChatML's special
    tokens, `<|im_end|>` as EOS, and `chat_template`: the tokenizer of the random Hugging
    Face models the end-to-end tests serve. `specials`: more special tokens (ids 384 on),
    as a model's own markers (Mistral's `[TOOL_CALLS]`) are."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from llm.data.corpus import default_corpus

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=384, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    bpe.train_from_iterator(default_corpus()[:60], trainer)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    if specials:
        tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.chat_template = chat_template
    return tok


# Mistral's chat template from tokenizer v11 on, cut to what tools need: the tools before
# the last user turn, each call as [TOOL_CALLS]name[ARGS]{arguments}, tool answers in
# [TOOL_RESULTS]. Its markers are special tokens of the vocabulary (`MISTRAL_SPECIALS`).
MISTRAL_V11_TEMPLATE = """{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- if m['role'] == 'user' %}
{%- if tools and loop.index0 == ns.last_user %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
[INST]{{ m['content'] }}[/INST]
{%- elif m['role'] == 'assistant' %}
{%- if m['tool_calls'] %}
{%- for c in m['tool_calls'] %}[TOOL_CALLS]{{ c['function']['name'] }}[ARGS]{{ c['function']['arguments'] | tojson }}{% endfor %}
{%- else %}{{ m['content'] }}{% endif %}<|im_end|>
{%- elif m['role'] == 'tool' %}[TOOL_RESULTS]{{ m['content'] }}[/TOOL_RESULTS]
{%- else %}{{ m['content'] }}
{%- endif %}
{%- endfor %}"""
MISTRAL_SPECIALS = ("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                    "[TOOL_CALLS]", "[ARGS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")  # fmt: skip


def long_context_loras(root: Path, seeds: dict[str, int]) -> tuple[Any, dict[str, Any], Any]:
    """A random `tiny` base with a 1024-token context, saved as a checkpoint in
    `root/base`, and a trained-looking LoRA adapter (B not zero) per name in `root/NAME`,
    each from its seed. Returns the base, each adapter merged into a copy of it, and the
    tokenizer. The long context lets a generation outlast the calls a test makes while it
    runs."""
    import copy

    from llm.checkpoint import save_checkpoint
    from llm.config import ModelConfig
    from llm.core.lora import apply_lora, unload_lora
    from llm.data.tokenizers import SimpleCharacterTokenizer
    from llm.interop.peft import save_adapter
    from llm.models.decoder import DecoderModel

    tok = SimpleCharacterTokenizer([chr(c) for c in range(32, 127)] + ["\n"])
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=128, max_seq_len=1024, init_std=0.2)
    base = DecoderModel(config).eval()
    save_checkpoint(str(root / "base"), base, tok)
    merged = {}
    for name, seed in seeds.items():
        model = copy.deepcopy(base)
        apply_lora(model, ["all-linear"], r=2, alpha=4)
        torch.manual_seed(seed)
        for pname, p in model.named_parameters():
            if ".lora_B." in pname:
                torch.nn.init.normal_(p, std=0.3)
        save_adapter(model, root / name)
        merged[name] = unload_lora(model).eval()
    return base, merged, tok
