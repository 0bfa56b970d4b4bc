"""`make demo`: train a small model, serve it, ask it one question through the OpenAI client.

The same commands the images run (`llm-train`, `llm-engine`, `llm-gateway`), as local
processes on 127.0.0.1. The trained checkpoint stays under runs/demo/; running the demo
again resumes from it, so a second run skips straight to serving.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
QUESTION = "What does the assert statement do?"


def tool(name: str) -> str:
    """The console script from this venv, wherever the demo is started from."""
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name) or name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_engine_port(proc: subprocess.Popen, timeout: float = 120.0) -> int:
    """Read the engine's stdout until it announces the port it bound."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"llm-engine exited with code {proc.returncode}")
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "engine_listening":
            return int(event["port"])
    raise TimeoutError("llm-engine did not start listening in time")


def drain(stream) -> None:
    for _ in stream:
        pass


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer in time")


def stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--run-dir", default=str(ROOT / "runs" / "demo"))
    parser.add_argument("--data", default="default", help="text file or directory to train on")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--question", default=QUESTION)
    args = parser.parse_args()

    t0 = time.monotonic()
    print(f"==> training the 'small' preset on {args.data!r} for {args.steps} steps", flush=True)
    subprocess.run(
        [tool("llm-train"), "--checkpoint.run-dir", args.run_dir, "--data.source", args.data,
         "--model.preset", "small", "--training.max-steps", str(args.steps),
         "--training.batch-size", "16", "--training.block-size", "128",
         "--optimization.lr", "2e-3", "--optimization.warmup-steps", "50",
         "--training.eval-interval", "100", "--checkpoint.interval", "200",
         "--training.log-interval", "50"],
        check=True,
    )  # fmt: skip
    print(f"==> trained in {time.monotonic() - t0:.0f} s; serving {args.run_dir}", flush=True)

    engine = gateway = None
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        engine = subprocess.Popen(
            [tool("llm-engine"), "--checkpoint", args.run_dir, "--host", "127.0.0.1", "--port", "0"],
            stdout=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        engine_port = wait_engine_port(engine)
        # Keep draining its stdout so a chatty engine never blocks on a full pipe.
        threading.Thread(target=drain, args=(engine.stdout,), daemon=True).start()
        port = free_port()
        gateway = subprocess.Popen(
            [tool("llm-gateway"), "--engine", f"127.0.0.1:{engine_port}",
             "--host", "127.0.0.1", "--port", str(port)],
            env=env,
        )  # fmt: skip
        # /readyz: an engine behind the gateway serves (its model loaded), not only /healthz.
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=300)

        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo")
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": args.question}],
            max_tokens=200,
            # Sampled, not greedy (a small character model loops when greedy), and seeded
            # so the same checkpoint gives the same answer every run.
            temperature=0.8,
            top_p=0.95,
            seed=1234,
        )
        print("\n==> question:", args.question)
        print("==> answer  :", reply.choices[0].message.content.strip())
        print(f"==> model {model}, {reply.usage.completion_tokens} tokens, "
              f"finish_reason={reply.choices[0].finish_reason}")  # fmt: skip
        print(f"==> checkpoint left under {args.run_dir}; total {time.monotonic() - t0:.0f} s")
        return 0
    finally:
        stop(gateway)
        stop(engine)


if __name__ == "__main__":
    sys.exit(main())
