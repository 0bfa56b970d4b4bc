"""The engine core in its own process (`llm_engine.core`): the same answers as in-process,
cancels reach it, and its death fails every request as UNAVAILABLE and ends the engine."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from tests.integration.test_engine import GREEDY, ids_of, start_engine

from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.proto.v1 import engine_pb2_grpc as pb_grpc
from llm_engine.server import start_engine as start_server

LONG = pb.StoppingCriteria(ignore_eos=True)  # the whole context: runs until cancelled


def _requests() -> list[pb.GenerateRequest]:
    texts = ["The ", "def f(x):", "class A:", "# ", "Hello world", "To be or"]
    return [
        pb.GenerateRequest(text=t, sampling=GREEDY, top_logprobs=2, prompt_logprobs=1,
                           stopping=pb.StoppingCriteria(max_tokens=12 + 3 * i, ignore_eos=True))
        for i, t in enumerate(texts)
    ]  # fmt: skip


async def _served(checkpoint: str, engine_process: bool) -> tuple[list[list], dict]:
    """Every request at once (more than the slots) through a fresh engine in one mode."""
    engine = await start_server("127.0.0.1", 0)
    state = await engine.load(checkpoint, n_slots=2, max_queue=8, engine_process=engine_process)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
            stub = pb_grpc.EngineStub(channel)
            info = await stub.ModelInfo(pb.ModelInfoRequest())

            async def one(r: pb.GenerateRequest) -> list[pb.GenerateChunk]:
                return [c async for c in stub.Generate(r, timeout=120)]

            results = await asyncio.gather(*(one(r) for r in _requests()))
        assert (state.scheduler.active_slots, state.scheduler.queue_depth) == (0, 0)
        facts = {"info": info, "core": type(state.scheduler).__name__}
        return [list(chunks) for chunks in results], facts
    finally:
        await engine.stop(0)


def test_process_and_in_process_modes_answer_the_same(tiny_checkpoint: str) -> None:
    inproc, a = asyncio.run(_served(tiny_checkpoint, engine_process=False))
    process, b = asyncio.run(_served(tiny_checkpoint, engine_process=True))
    assert (a["core"], b["core"]) == ("Scheduler", "EngineCore")
    info = [{k: v for k, v in _fields(f["info"]).items() if k != "created"} for f in (a, b)]
    assert info[0] == info[1] and info[0]["n_params"] > 0
    assert [ids_of(c) for c in process] == [ids_of(c) for c in inproc]
    assert all(len(ids_of(c)) == 12 + 3 * i for i, c in enumerate(process))
    for got, want in zip(process, inproc, strict=True):
        assert "".join(c.text for c in got) == "".join(c.text for c in want)
        lps = [[(lp.token, round(lp.logprob, 4), [t.token_id for t in lp.top])
                for c in chunks for lp in c.logprobs] for chunks in (got, want)]  # fmt: skip
        assert lps[0] == lps[1]
        assert [p.token_id for p in got[0].prompt_logprobs] == [
            p.token_id for p in want[0].prompt_logprobs
        ]
        assert got[-1].usage == want[-1].usage


def _fields(message: pb.ModelInfoResponse) -> dict:
    return {f.name: v for f, v in message.ListFields()}


def _cancelled() -> float:
    return REGISTRY.get_sample_value("llm_engine_requests_total", {"outcome": "cancelled"}) or 0


def test_cancel_reaches_the_core_and_frees_its_slot(tiny_checkpoint: str) -> None:
    async def main() -> None:
        engine = await start_server("127.0.0.1", 0)
        state = await engine.load(tiny_checkpoint, n_slots=1, max_queue=2, engine_process=True)
        core = state.scheduler
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{engine.port}") as channel:
                stub = pb_grpc.EngineStub(channel)
                before = _cancelled()
                call = stub.Generate(
                    pb.GenerateRequest(text="The ", sampling=GREEDY, stopping=LONG)
                )
                await call.read()
                assert core.active_slots == 1
                call.cancel()
                deadline = time.monotonic() + 20
                while core.active_slots or _cancelled() == before:
                    assert time.monotonic() < deadline, "the core did not free the slot"
                    await asyncio.sleep(0.02)
                # The child counted it cancelled (its metrics reach this process) ...
                assert _cancelled() == before + 1
                # ... and the one slot serves the next request.
                short = pb.StoppingCriteria(max_tokens=3, ignore_eos=True)
                r = pb.GenerateRequest(text="The ", sampling=GREEDY, stopping=short)
                chunks = [c async for c in stub.Generate(r, timeout=30)]
                assert chunks[-1].usage.completion_tokens == 3
        finally:
            await engine.stop(0)

    asyncio.run(main())


def _core_pid(engine, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for r in engine.logs():
            if r.get("event") == "engine_core_started":
                return r["pid"]
        time.sleep(0.05)
    raise TimeoutError("no engine_core_started line")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def test_a_dead_core_fails_every_request_unavailable_and_ends_the_engine(
    tiny_checkpoint: str, tmp_path: Path
) -> None:
    with start_engine(tiny_checkpoint, tmp_path / "engine.log") as engine:  # 2 slots, queue 2
        pid = _core_pid(engine)
        assert pid != engine.proc.pid and _alive(pid)
        request = pb.GenerateRequest(text="The ", sampling=GREEDY, stopping=LONG)
        streams = []
        for _ in range(2):  # both slots generating
            streams.append(engine.stub.Generate(request, timeout=60))
            next(streams[-1])
        streams.append(engine.stub.Generate(request, timeout=60))  # waiting for a slot
        deadline = time.monotonic() + 10
        while engine.metrics()["llm_engine_queue_depth"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
        for stream in streams:
            with pytest.raises(grpc.RpcError) as e:
                list(stream)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert engine.proc.wait(timeout=30) == 1  # a supervisor restarts it
    died = [r for r in engine.logs() if r.get("event") == "engine_core_died"]
    assert died and died[0]["exit_code"] == -signal.SIGKILL


def test_the_core_exits_when_the_engine_process_dies(tiny_checkpoint: str, tmp_path: Path) -> None:
    with start_engine(tiny_checkpoint, tmp_path / "engine.log") as engine:
        pid = _core_pid(engine)
        health = health_pb2_grpc.HealthStub(engine.channel)
        status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING and _alive(pid)
        engine.proc.kill()
        engine.proc.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _alive(pid):
            assert time.monotonic() < deadline, "the engine core outlived the engine"
            time.sleep(0.05)


# The prelude of the OpenMP scripts below, each run in a process of its own.
_THREADS = r"""
import json, os, sys, time
import torch
from llm_engine.core import CoreOptions, build

def tasks():  # the threads, once a worker given back has exited (the count holds 50 ms)
    count = len(os.listdir("/proc/self/task"))
    for _ in range(100):
        time.sleep(0.05)
        now = len(os.listdir("/proc/self/task"))
        if now == count:
            break
        count = now
    return count
"""

_BUILD = (
    _THREADS
    + r"""

torch.set_num_threads(2)
torch.ones(1 << 22).mul_(2)  # this thread's OpenMP workers, as a large model's load starts them
build(CoreOptions(sys.argv[1], n_slots=2, max_queue=2))
held = tasks()
torch.ones(1 << 22).mul_(2)
print(json.dumps([held, tasks()]))
"""
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp is torch's Linux runtime")
def test_build_leaves_the_loading_thread_without_openmp_workers(tiny_checkpoint: str) -> None:
    """The scheduler thread's OpenMP workers spin between parallel regions only while the
    process holds no more OpenMP threads than CPUs (`llm.core.openmp`): `build` gives the
    loading thread's workers back."""
    out = subprocess.run([sys.executable, "-c", _BUILD, tiny_checkpoint], capture_output=True,
                         text=True, check=True)  # fmt: skip
    held, after_work = json.loads(out.stdout.splitlines()[-1])
    assert after_work == held + 1  # a parallel region here had to start a worker again


_LOAD_LORA = (
    _THREADS
    + r"""
from llm.checkpoint import load_checkpoint
from llm.core.lora import apply_lora
from llm.interop.peft import save_adapter

checkpoint, adapter = sys.argv[1], sys.argv[2]
model = load_checkpoint(checkpoint).model
apply_lora(model, ["all-linear"], r=2, alpha=4)
save_adapter(model, adapter)
torch.set_num_threads(2)
scheduler, _ = build(CoreOptions(checkpoint, n_slots=2, max_queue=2, enable_lora=True))
scheduler.start()
torch.ones(1 << 22).mul_(2)  # this thread's OpenMP workers, as reading a large adapter starts them
held = tasks()
scheduler.load_lora("a", adapter)  # a server calls it on a worker thread it keeps
after = tasks()
scheduler.stop()
print(json.dumps([held, after]))
"""
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="libgomp is torch's Linux runtime")
def test_loading_a_lora_adapter_leaves_the_calling_thread_without_openmp_workers(
    tiny_checkpoint: str, tmp_path: Path
) -> None:
    """Adapters are read on the caller's thread, not the scheduler's; a server's worker
    thread lives on, so its OpenMP workers would stay (`llm.core.openmp`)."""
    out = subprocess.run([sys.executable, "-c", _LOAD_LORA, tiny_checkpoint,
                          str(tmp_path / "adapter")], capture_output=True, text=True,
                         check=True)  # fmt: skip
    held, after = json.loads(out.stdout.splitlines()[-1])
    assert after == held - 1  # the one worker of this thread's two exited
