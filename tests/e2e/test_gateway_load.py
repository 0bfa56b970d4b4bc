"""Load and faults through real engine + gateway processes: 64 concurrent streaming clients,
a quarter of them hanging up mid-stream. The others get complete, correct streams, every
request ends in the engine (finished, or cancelled for the ones that left), and afterwards
nothing is left running or queued."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.e2e.e2e_services import Service, running_stack
from tests.support import free_port

CLIENTS, LEAVERS_EVERY = 64, 4  # every 4th client disconnects: 16 of 64
MAX_TOKENS, LEAVER_MAX_TOKENS = 8, 200
PROMPT = "The "


@pytest.fixture(scope="module", params=["per-call", "multiplexed"])
def roomy_stack(
    request: pytest.FixtureRequest, tiny_checkpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Service, str]]:
    """An engine whose queue holds every client at once, with its Prometheus metrics on
    (the URL is the third item); the gateway makes a Generate call per generation, or
    multiplexes them all on one GenerateMany stream."""
    metrics_port = free_port()
    engine_args = ["--max-queue", "128", "--metrics-port", str(metrics_port)]
    gateway_args = [] if request.param == "multiplexed" else ["--no-multiplex"]
    logs = tmp_path_factory.mktemp("load")
    with running_stack(tiny_checkpoint, logs, engine_args, gateway_args) as (engine, gateway):
        yield engine, gateway, f"http://127.0.0.1:{metrics_port}/metrics"


async def stream_once(client: httpx.AsyncClient, model: str, leave: bool) -> dict:
    body = {
        "model": model, "prompt": PROMPT, "temperature": 0, "stream": True,
        "max_tokens": LEAVER_MAX_TOKENS if leave else MAX_TOKENS,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    out: dict = {"text": "", "finish": None, "usage": None, "done": False, "id": None}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                out["done"] = True
                continue
            chunk = json.loads(data)
            assert "error" not in chunk, chunk
            out["id"] = chunk["id"]
            out["usage"] = chunk["usage"] or out["usage"]
            for choice in chunk["choices"]:
                out["text"] += choice["text"]
                out["finish"] = choice["finish_reason"] or out["finish"]
            if leave and out["text"]:
                break  # leaving the block closes the connection mid-stream
    return out


def engine_gauges(metrics_url: str) -> tuple[float, float]:
    """(active slots, queue depth) as the engine's /metrics reports them."""
    text = httpx.get(metrics_url).text
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] not in ("#", ""))
    return float(values["llm_engine_active_slots"]), float(values["llm_engine_queue_depth"])


def ends(engine: Service) -> dict[str, dict]:
    """request id -> the engine's log record of how it ended."""
    return {
        r["request_id"]: r
        for r in engine.logs()
        if r.get("event") in ("request_finished", "request_cancelled", "request_error")
    }


def test_concurrent_streams_with_disconnects(roomy_stack: tuple[Service, Service, str]) -> None:
    engine, gateway, engine_metrics = roomy_stack
    base_url = f"http://127.0.0.1:{gateway.port}"
    model = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
    whole = httpx.post(
        f"{base_url}/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0},
    ).json()
    expected, usage = whole["choices"][0]["text"], whole["usage"]
    assert usage["completion_tokens"] == MAX_TOKENS and whole["choices"][0]["finish_reason"] == "length"  # fmt: skip

    async def run_all() -> list[dict]:
        transport = httpx.AsyncHTTPTransport(
            socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            limits=httpx.Limits(max_connections=CLIENTS),
        )
        async with httpx.AsyncClient(base_url=base_url, timeout=120, transport=transport) as c:
            return await asyncio.gather(
                *(stream_once(c, model, i % LEAVERS_EVERY == 0) for i in range(CLIENTS))
            )

    started = time.monotonic()
    results = asyncio.run(run_all())
    elapsed = time.monotonic() - started
    leavers = results[::LEAVERS_EVERY]
    stayers = [r for i, r in enumerate(results) if i % LEAVERS_EVERY]
    assert len(leavers) == CLIENTS // LEAVERS_EVERY and len(stayers) == CLIENTS - len(leavers)
    for r in stayers:
        assert (r["text"], r["finish"], r["done"]) == (expected, "length", True)
        assert r["usage"] == usage
    assert all(r["text"] and not r["done"] for r in leavers)

    # Every request ended in the engine: the stayers finished, the leavers were cancelled
    # long before their 200 tokens.
    ids = {r["id"] for r in results}
    assert len(ids) == CLIENTS
    deadline = time.monotonic() + 20
    while not ids <= (ended := ends(engine)).keys():
        assert time.monotonic() < deadline, f"{len(ids - ended.keys())} requests never ended"
        time.sleep(0.1)
    for r in stayers:
        assert ended[r["id"]]["event"] == "request_finished"
    for r in leavers:
        assert ended[r["id"]]["event"] == "request_cancelled"
        assert ended[r["id"]]["completion_tokens"] < LEAVER_MAX_TOKENS

    # Nothing is left: the engine reports no busy slot and no queue...
    deadline = time.monotonic() + 10
    while engine_gauges(engine_metrics) != (0.0, 0.0):
        assert time.monotonic() < deadline, engine_gauges(engine_metrics)
        time.sleep(0.05)
    # ...a new request starts at once...
    after = httpx.post(
        f"{base_url}/v1/completions",
        json={"model": model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0},
    ).json()
    deadline = time.monotonic() + 10
    while after["id"] not in (ended := ends(engine)):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert ended[after["id"]]["queue_s"] < 0.1
    # ...and the gateway holds no engine call.
    metrics = httpx.get(f"{base_url}/metrics").text
    assert f'llm_gateway_engine_calls_in_flight{{engine="127.0.0.1:{engine.port}"}} 0.0' in metrics
    assert "llm_gateway_requests_in_flight 1.0" in metrics  # this scrape
    assert elapsed < 60, elapsed


def test_a_frozen_engine_is_routed_around_within_seconds(
    tiny_checkpoint: str, tmp_path: Path
) -> None:
    """SIGSTOP one engine of two (a node that vanished without closing its connections):
    keepalive pings mark it down, and new requests go to the other within 10 s."""
    import os
    import signal

    from tests.e2e.e2e_services import start, stop, wait_ready

    args = ["--checkpoint", tiny_checkpoint, "--port", "0", "--threads", "1"]
    engines = [
        start("llm_engine", args, tmp_path / f"engine{i}.log", "engine_listening") for i in range(2)
    ]
    targets = ",".join(f"127.0.0.1:{e.port}" for e in engines)
    gateway = start("llm_gateway", ["--engine", targets, "--port", "0", "--engine-keepalive-s",
                                    "2"], tmp_path / "gateway.log", "gateway_listening")  # fmt: skip
    base = f"http://127.0.0.1:{gateway.port}"
    try:
        wait_ready(base)
        with httpx.Client(base_url=base, timeout=5) as client:
            model = client.get("/v1/models").json()["data"][0]["id"]
            body = {"model": model, "prompt": "The ", "max_tokens": 2}

            def ok() -> bool:
                try:
                    return client.post("/v1/completions", json=body).status_code == 200
                except httpx.TimeoutException:
                    return False

            assert ok()
            os.kill(engines[0].proc.pid, signal.SIGSTOP)
            frozen = time.monotonic()
            streak = 0
            while streak < 5:
                assert time.monotonic() - frozen < 10, "requests still reach the frozen engine"
                streak = streak + 1 if ok() else 0
    finally:
        os.kill(engines[0].proc.pid, signal.SIGCONT)
        stop(gateway)
        for e in engines:
            stop(e)
