"""Start the real services as processes (`python -m ...`) on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
from tests.support import stop_process

from llm_common.logs import read_announcement

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "shared"), str(REPO / "services")])}
# Gateways here serve /metrics on the API port: several run at once, and a fixed metrics
# port would collide (test_gateway_security covers the separate port).
ENV["LLM_GATEWAY_METRICS_PORT"] = "0"


@dataclass
class Service:
    proc: subprocess.Popen
    port: int
    log: Path
    announcement: dict

    def logs(self) -> list[dict]:
        return [
            json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")
        ]


def start(
    module: str, args: list[str], log: Path, event: str, env: dict[str, str] | None = None
) -> Service:
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env={**ENV, **(env or {})},
        )
    try:
        announcement = read_announcement(proc.stdout, event, timeout=60)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"{module} did not start:\n{log.read_text()[-3000:]}") from None
    return Service(proc, announcement["port"], log, announcement)


def stop(service: Service) -> int:
    return stop_process(service.proc)


def wait_ready(base_url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{base_url} did not become ready")


@contextlib.contextmanager
def running_stack(
    checkpoint: str, logs: Path, engine_args: Sequence[str] = (), gateway_args: Sequence[str] = ()
) -> Iterator[tuple[Service, Service]]:
    """An engine process (one torch thread) and a gateway process in front of it, ready."""
    engine = start(
        "llm_engine",
        ["--checkpoint", checkpoint, "--port", "0", "--threads", "1", *engine_args],
        logs / "engine.log",
        "engine_listening",
    )
    gateway = None
    try:
        gateway = start(
            "llm_gateway",
            ["--engine", f"127.0.0.1:{engine.port}", "--port", "0", *gateway_args],
            logs / "gateway.log",
            "gateway_listening",
        )
        wait_ready(f"http://127.0.0.1:{gateway.port}")
        yield engine, gateway
    finally:
        if gateway is not None:
            stop(gateway)
        stop(engine)
