"""What the OpenAI gateway costs: the same workload through `llm-gateway` (HTTP + SSE) and
directly against `llm-engine` (gRPC), in one run, against the same engine process.

1. Latency: sequential non-streamed completions (`--max-tokens` greedy tokens), the two
   paths interleaved request by request; p50 (and p90) per path, and the gateway's added
   p50. Target: at most 2 ms added.
2. Streaming throughput: `--streams` concurrent streamed completions, rounds alternating
   between the paths; completion tokens/s of the best round per path, and the gateway's CPU
   time per streamed token. Target: the gateway costs at most 5%. Measured twice: every
   process on every CPU (on a 2-core machine the gateway then takes CPU from the engine),
   and with the engine pinned alone to one CPU (as deployed: separate pods).

The gateway multiplexes its generations on one `GenerateMany` stream (`--no-multiplex`: a
`Generate` call each, as the direct path makes). Both paths send the request the gateway
itself builds (`CompletionRequest.engine_calls`), so
the engine does the same work. Clients are lean on both sides so that the difference is the
gateway: grpc.aio for the engine, a raw keep-alive HTTP/1.1 client (TCP_NODELAY) for the
gateway. Everything shares the machine's cores, as a gateway beside its engine would.

The engine serves `--checkpoint`, or a randomly initialised `tiny` model (character
tokenizer) saved to a temporary directory when none is given.

Usage: PYTHONPATH=shared:services .venv/bin/python benchmarks/gateway_overhead.py
       [--checkpoint runs/demo] [--requests 300] [--streams 16] [--stream-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from llm_common.logs import read_announcement
from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.proto.v1 import engine_pb2_grpc as pb_grpc
from llm_gateway.schemas import CompletionRequest

PROMPT = "The quick brown fox jumps over the lazy dog. "


def random_checkpoint(directory: Path) -> str:
    """A randomly initialised `tiny` model with a character tokenizer (no training)."""
    import torch

    from llm.checkpoint import save_checkpoint
    from llm.config import ModelConfig
    from llm.data.tokenizers import SimpleCharacterTokenizer
    from llm.models.decoder import DecoderModel

    torch.manual_seed(0)
    tokenizer = SimpleCharacterTokenizer.train(string.printable)
    model = DecoderModel(ModelConfig.from_preset("tiny", vocab_size=tokenizer.vocab_size))
    run = directory / "bench"
    save_checkpoint(str(run / "checkpoints" / "step-0"), model, tokenizer)
    return str(run)


class Process:
    def __init__(self, module: str, args: list[str], event: str, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(["shared", "services"])}
        with log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                stdout=subprocess.PIPE, stderr=err, text=True, env=env,
            )  # fmt: skip
        try:
            self.port = int(read_announcement(self.proc.stdout, event, timeout=120)["port"])
        except TimeoutError:
            self.proc.kill()
            raise SystemExit(f"{module} did not start:\n{log.read_text()[-3000:]}") from None

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Http:
    """A minimal keep-alive HTTP/1.1 client: one connection, one request at a time."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:  # asyncio sets TCP_NODELAY on TCP connections
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)
        }
        if headers.get(b"transfer-encoding") == b"chunked":
            parts = []
            while size := int((await self.reader.readuntil(b"\r\n"))[:-2], 16):
                parts.append((await self.reader.readexactly(size + 2))[:-2])
            await self.reader.readuntil(b"\r\n")
            return status, b"".join(parts)
        return status, await self.reader.readexactly(int(headers[b"content-length"]))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def sse_usage(body: bytes) -> tuple[str, int]:
    """Text and completion tokens of a streamed completion (with include_usage)."""
    text, tokens = "", 0
    for event in body.decode().split("\n\n"):
        data = event.removeprefix("data: ")
        if not data or data == "[DONE]":
            continue
        chunk = json.loads(data)
        assert "error" not in chunk, chunk
        text += "".join(c["text"] for c in chunk["choices"])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    return text, tokens


async def direct(stub: pb_grpc.EngineStub, request: pb.GenerateRequest) -> tuple[str, int]:
    text, tokens = "", 0
    async for chunk in stub.Generate(request):
        text += chunk.text
        if chunk.finish_reason:
            tokens = chunk.usage.completion_tokens
    return text, tokens


async def run(args: argparse.Namespace, engine: Process, gateway: Process) -> None:
    engine_port, gateway_port = engine.port, gateway.port
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{engine_port}")
    stub = pb_grpc.EngineStub(channel)
    model = (await stub.ModelInfo(pb.ModelInfoRequest())).model_id

    def body(max_tokens: int, stream: bool) -> dict:
        return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
                "stream": stream, "stream_options": {"include_usage": True} if stream else None}  # fmt: skip

    def engine_request(b: dict) -> pb.GenerateRequest:
        return CompletionRequest.model_validate(b).engine_calls("bench")[0].request

    # 1. Latency, sequential, interleaved.
    whole = body(args.max_tokens, stream=False)
    whole_bytes, whole_pb = json.dumps(whole).encode(), engine_request(whole)
    http = Http(gateway_port)
    via_gateway, via_engine = [], []
    for i in range(args.warmup + args.requests):
        t0 = time.perf_counter()
        status, raw = await http.post("/v1/completions", whole_bytes)
        t1 = time.perf_counter()
        text, _ = await direct(stub, whole_pb)
        t2 = time.perf_counter()
        assert status == 200, raw
        assert json.loads(raw)["choices"][0]["text"] == text  # the same work both ways
        if i >= args.warmup:
            via_gateway.append(t1 - t0)
            via_engine.append(t2 - t1)
    await http.close()

    def q(xs: list[float], p: float) -> float:
        return statistics.quantiles(xs, n=100)[p - 1] * 1e3

    print(f"\nlatency, {args.requests} sequential requests of {args.max_tokens} tokens (ms)")
    print(f"  {'':24} {'p50':>8} {'p90':>8}")
    print(f"  {'direct gRPC (engine)':24} {q(via_engine, 50):8.2f} {q(via_engine, 90):8.2f}")
    print(f"  {'through the gateway':24} {q(via_gateway, 50):8.2f} {q(via_gateway, 90):8.2f}")
    added = q(via_gateway, 50) - q(via_engine, 50)
    print(f"  added by the gateway, p50: {added:.2f} ms (target <= 2 ms)")

    # 2. Streaming throughput, rounds alternating between the paths.
    stream = body(args.stream_tokens, stream=True)
    stream_bytes, stream_pb = json.dumps(stream).encode(), engine_request(stream)
    clients = [Http(gateway_port) for _ in range(args.streams)]

    async def gateway_stream(c: Http) -> int:
        status, raw = await c.post("/v1/completions", stream_bytes)
        assert status == 200, raw
        return sse_usage(raw)[1]

    async def round_of(path: str) -> float:
        t0 = time.perf_counter()
        if path == "gateway":
            counts = await asyncio.gather(*(gateway_stream(c) for c in clients))
        else:
            results = await asyncio.gather(*(direct(stub, stream_pb) for _ in clients))
            counts = [n for _, n in results]
        return sum(counts) / (time.perf_counter() - t0)

    async def rounds(label: str) -> None:
        rates: dict[str, list[float]] = {"gateway": [], "direct": []}
        await round_of("gateway")  # warm up both
        await round_of("direct")
        gateway_cpu, tokens = cpu_seconds(gateway.proc.pid), 0.0
        for _ in range(args.rounds):
            for path in ("direct", "gateway"):
                rates[path].append(await round_of(path))
        gateway_cpu = cpu_seconds(gateway.proc.pid) - gateway_cpu
        tokens = args.rounds * args.streams * args.stream_tokens  # upper bound (EOS may end early)
        best = {path: max(r) for path, r in rates.items()}
        cost = 100 * (1 - best["gateway"] / best["direct"])
        print(f"\nstreaming, {label}: {args.streams} concurrent streams x {args.stream_tokens} tokens, best of {args.rounds} rounds (completion tokens/s)")  # fmt: skip
        print(f"  direct gRPC (engine)   {best['direct']:9.1f}   rounds: {', '.join(f'{r:.0f}' for r in rates['direct'])}")  # fmt: skip
        print(f"  through the gateway    {best['gateway']:9.1f}   rounds: {', '.join(f'{r:.0f}' for r in rates['gateway'])}")  # fmt: skip
        print(f"  gateway cost: {cost:.1f}% of throughput (target <= 5%); gateway CPU per streamed token: >= {1e6 * gateway_cpu / tokens:.0f} us")  # fmt: skip

    await rounds("all processes on all CPUs")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        # As deployed, the gateway does not share the engine's cores: the engine alone on
        # one CPU, the gateway (and this client) on the others.
        os.sched_setaffinity(engine.proc.pid, cpus[:1])
        os.sched_setaffinity(gateway.proc.pid, cpus[1:])
        os.sched_setaffinity(0, cpus[1:])
        await rounds(f"engine alone on CPU {cpus[0]}, gateway and client on the rest")
        os.sched_setaffinity(0, cpus)
    for c in clients:
        await c.close()
    await channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="run or checkpoint dir; default: random tiny")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--stream-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="engine torch threads")
    parser.add_argument(
        "--multiplex", action=argparse.BooleanOptionalAction, default=True,
        help="the gateway's generations share one GenerateMany stream (llm-gateway's default)",
    )  # fmt: skip
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or random_checkpoint(Path(tmp))
        engine = Process(
            "llm_engine",
            ["--checkpoint", checkpoint, "--port", "0", "--threads", str(args.threads),
             "--slots", str(args.streams), "--max-queue", str(4 * args.streams),
             "--log-level", "WARNING"],
            "engine_listening", Path(tmp) / "engine.log",
        )  # fmt: skip
        gateway = None
        try:
            gateway = Process(
                "llm_gateway",
                ["--engine", f"127.0.0.1:{engine.port}", "--port", "0", "--log-level", "WARNING",
                 "--multiplex" if args.multiplex else "--no-multiplex"],
                "gateway_listening", Path(tmp) / "gateway.log",
            )  # fmt: skip
            wait_serving(engine.port)
            mode = "one GenerateMany stream" if args.multiplex else "a Generate call per request"
            print(f"engine: {checkpoint} ({args.threads} torch thread(s), {args.streams} slots); "
                  f"gateway: llm-gateway in front of it ({mode}); {os.cpu_count()} CPUs shared")  # fmt: skip
            asyncio.run(run(args, engine, gateway))
        finally:
            if gateway is not None:
                gateway.stop()
            engine.stop()


def wait_serving(port: int, timeout: float = 120) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.1)
    raise SystemExit("the engine did not become SERVING")


if __name__ == "__main__":
    main()
