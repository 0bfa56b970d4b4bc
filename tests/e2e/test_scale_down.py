"""What an autoscaler's scale-down does to an engine, end to end: two engine processes behind
one gateway, streams running on both, then SIGTERM to one (what the kubelet sends a pod the
HPA removes). The stopping engine finishes its running streams, the gateway sends new work
to the other (or retries the refusal there), no client sees an error, and the engine exits
0 within its grace period."""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.request

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.e2e.e2e_services import start, stop, wait_ready
from tests.support import free_port

pytestmark = pytest.mark.slow

# Four streams per engine of two slots: two generate, two wait, so a drain has work left
# however late the SIGTERM lands.
STREAMS, MAX_TOKENS = 8, 240


def active_slots(metrics_port: int) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read()
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == "llm_engine_active_slots":
                return sample.value
    raise AssertionError("no llm_engine_active_slots")


def healthy_engines(base: str) -> int:
    """Engines the gateway sees SERVING (its llm_gateway_engine_healthy gauges)."""
    text = httpx.get(f"{base}/metrics", timeout=5).text
    return sum(
        sample.value == 1
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "llm_gateway_engine_healthy"
    )


def test_a_removed_engine_drains_and_clients_see_no_error(tiny_checkpoint: str, tmp_path) -> None:
    metrics = [free_port(), free_port()]
    engines = [
        start("llm_engine", ["--checkpoint", tiny_checkpoint, "--port", "0", "--threads", "1",
                             "--slots", "2", "--metrics-port", str(metrics[i])],
              tmp_path / f"engine{i}.log", "engine_listening",
              env={"LLM_ENGINE_SHUTDOWN_GRACE_S": "60"})
        for i in range(2)
    ]  # fmt: skip
    gateway = None
    try:
        targets = ",".join(f"127.0.0.1:{e.port}" for e in engines)
        gateway = start("llm_gateway", ["--engine", targets, "--port", "0"],
                        tmp_path / "gateway.log", "gateway_listening")  # fmt: skip
        base = f"http://127.0.0.1:{gateway.port}"
        wait_ready(base)
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        deadline = time.monotonic() + 60
        while healthy_engines(base) != 2:  # both serving, so the streams spread over both
            assert time.monotonic() < deadline, httpx.get(f"{base}/metrics").text
            time.sleep(0.2)

        results: list[dict] = [{} for _ in range(STREAMS)]

        def stream(i: int) -> None:
            body = {"model": model, "prompt": "The ", "max_tokens": MAX_TOKENS, "stream": True,
                    "ignore_eos": True, "temperature": 0}  # fmt: skip
            chunks = []
            with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
                results[i]["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        chunks.append(json.loads(line.removeprefix("data: "))["choices"][0])
            results[i]["finish"] = chunks[-1]["finish_reason"] if chunks else None
            results[i]["text"] = "".join(c["text"] for c in chunks)

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while active_slots(metrics[0]) == 0:  # generating on the engine about to go
            assert time.monotonic() < deadline
            time.sleep(0.01)
        engines[0].proc.send_signal(signal.SIGTERM)  # the pod the autoscaler removes
        # New work during the drain goes to the remaining engine.
        for _ in range(3):
            r = httpx.post(f"{base}/v1/completions", json={"model": model, "prompt": "Hi",
                                                            "max_tokens": 4}, timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
        for t in threads:
            t.join(120)
        assert [r["status"] for r in results] == [200] * STREAMS
        assert [r["finish"] for r in results] == ["length"] * STREAMS, results
        # It stopped as soon as its generations were done, not after all of its 60 s grace
        # (the gateway's idle streams to it would hold a plain gRPC stop that long).
        assert engines[0].proc.wait(timeout=30) == 0
        logs = engines[0].logs()
        events = [r["event"] for r in logs]
        (draining,) = [r for r in logs if r["event"] == "engine_draining"]
        assert draining["in_flight"] > 0  # streams were running when SIGTERM came ...
        after = events[events.index("engine_draining") :]
        assert "request_finished" in after  # ... and finished during the drain
        assert after[-1] == "engine_stopped"
    finally:
        if gateway is not None:
            stop(gateway)
        for engine in engines:
            if engine.proc.poll() is None:
                stop(engine)
