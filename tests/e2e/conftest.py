"""Fixtures for the end-to-end tests: an engine process and a gateway process."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_services import Service, start, stop, wait_ready


@pytest.fixture(scope="module")
def stack(
    tiny_checkpoint: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Service, Service]]:
    """An engine process and a gateway process in front of it."""
    logs = tmp_path_factory.mktemp("stack")
    engine = start(
        "llm_engine",
        ["--checkpoint", tiny_checkpoint, "--port", "0", "--threads", "1"],
        logs / "engine.log",
        "engine_listening",
    )
    gateway = None
    try:
        gateway = start(
            "llm_gateway",
            ["--engine", f"127.0.0.1:{engine.port}", "--port", "0"],
            logs / "gateway.log",
            "gateway_listening",
        )
        wait_ready(f"http://127.0.0.1:{gateway.port}")
        yield engine, gateway
    finally:
        if gateway is not None:
            stop(gateway)
        stop(engine)
