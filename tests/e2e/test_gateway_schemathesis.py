"""schemathesis (its CLI, every phase) against the gateway's own OpenAPI schema, real
gateway + engine processes: generated requests, valid and not, never get a 5xx, and every
4xx is OpenAI-shaped. Half of the generated bodies name the served model
(schemathesis_hooks.py), so generated parameters reach the engine too. Bounded by
`--max-examples` and a fixed seed: a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from tests.e2e.e2e_services import ENV, Service, running_stack

HERE = Path(__file__).resolve().parent
MAX_EXAMPLES = 30


@pytest.fixture(scope="module")
def gateway(tiny_checkpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    logs = tmp_path_factory.mktemp("schemathesis")
    with running_stack(tiny_checkpoint, logs, ["--max-queue", "8"]) as (_, gateway):
        yield gateway
        errors = [r for r in gateway.logs() if r.get("level") in ("ERROR", "CRITICAL")]
        assert not errors, errors[:3]


def test_schemathesis_finds_no_server_errors(gateway: Service, tmp_path: Path) -> None:
    gateway_url = f"http://127.0.0.1:{gateway.port}"
    model = httpx.get(f"{gateway_url}/v1/models").json()["data"][0]["id"]
    env = {
        **ENV,
        "PYTHONPATH": os.pathsep.join([str(HERE), ENV["PYTHONPATH"]]),
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "LLM_TEST_SERVED_MODEL": model,
        "NO_COLOR": "1",
    }
    cli = Path(sys.executable).parent / "schemathesis"
    run = subprocess.run(
        [str(cli), "run", f"{gateway_url}/openapi.json", "--max-examples", str(MAX_EXAMPLES),
         "--seed", "1", "--checks", "not_a_server_error,openai_error_shape",
         "--generation-database", "none", "--request-timeout", "30", "--workers", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert "generated" in run.stdout  # it really ran test cases
    served = [r for r in gateway.logs() if r.get("event") == "http_request"
              and r["route"].endswith("completions") and r["status"] == 200]  # fmt: skip
    assert len(served) >= 10, "generated requests should reach the engine"
