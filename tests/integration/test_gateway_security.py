"""Gateway security and limits: API keys (env, file; constant-time check; never logged),
the loopback default without keys, the body size limit, the per-request timeout, 429 with
Retry-After, and cancellation of the engine call when the HTTP client goes away.

The engine is the engine double (engine_double.py); the gateway runs in-process, on a
real uvicorn server where a test needs real connections, or as the `llm-gateway` process.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from tests.integration.engine_double import MODEL, FakeEngine, FakeServer, PerCallFakeEngine
from tests.support import free_port, serve_gateway, stop_process, wait_for

from llm_common.logs import read_announcement
from llm_gateway.app import create_app
from llm_gateway.settings import GatewaySettings

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "shared"), str(REPO / "services")])}


@pytest.fixture(params=["multiplexed", "per-call engine"])
def either_fake(request: pytest.FixtureRequest) -> Iterator[FakeServer]:
    """An engine with GenerateMany (the gateway multiplexes), or one from before it (the
    gateway falls back to a Generate call per generation)."""
    cls = FakeEngine if request.param == "multiplexed" else PerCallFakeEngine
    server = FakeServer("a", engine_cls=cls)
    yield server
    server.stop()


def settings(fake: FakeServer, **overrides: object) -> GatewaySettings:
    return GatewaySettings(engine=f"127.0.0.1:{fake.port}", **overrides)


def completion(prompt: str = "hi", **overrides: object) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, **overrides}


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_keys_come_from_env_lists_and_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("sk-file-1\n\n  sk-file-2  \nsk-env-1\n")
    monkeypatch.setenv("LLM_GATEWAY_API_KEYS", "sk-env-1, sk-env-2,")
    monkeypatch.setenv("LLM_GATEWAY_API_KEYS_FILE", str(keys_file))
    s = GatewaySettings()
    assert s.load_api_keys() == ["sk-env-1", "sk-env-2", "sk-file-1", "sk-file-2"]
    assert "sk-env" not in repr(s) and "sk-env" not in str(s.model_dump())
    monkeypatch.setenv("LLM_GATEWAY_API_KEYS", '["sk-json-1", "sk-json-2"]')  # the chart's form
    monkeypatch.delenv("LLM_GATEWAY_API_KEYS_FILE")
    assert GatewaySettings().load_api_keys() == ["sk-json-1", "sk-json-2"]
    monkeypatch.setenv("LLM_GATEWAY_ENGINE", "10.0.0.1:1, dns:///engine:50051")
    assert GatewaySettings().engine == ["10.0.0.1:1", "dns:///engine:50051"]
    assert GatewaySettings().bind_host == "127.0.0.1"


def test_bearer_keys_are_checked_before_the_body_is_read(fake: FakeServer) -> None:
    app = create_app(settings(fake, api_keys=["sk-one", "sk-two"], metrics_port=0))
    with TestClient(app) as c:
        for path in ("/healthz", "/readyz", "/metrics"):  # probes and scrapes need no key
            assert c.get(path).status_code == 200, path
        missing = c.post("/v1/completions", json=completion())
        assert missing.status_code == 401
        assert error_of(missing)["code"] == "missing_api_key"
        assert missing.headers["www-authenticate"] == "Bearer"
        for header in ("Bearer sk-three", "Bearer sk-one2", "Basic sk-one", "Bearer ", "sk-one"):
            wrong = c.post("/v1/completions", json=completion(), headers={"Authorization": header})
            assert wrong.status_code == 401, header
            assert error_of(wrong)["code"] in ("invalid_api_key", "missing_api_key")
        # Unauthenticated callers learn nothing about validation, routes or models.
        for method, path, body in [("POST", "/v1/completions", b"{not json"),
                                   ("GET", "/v1/nothing-here", b""),
                                   ("GET", "/v1/models/gpt-nope", b"")]:  # fmt: skip
            assert c.request(method, path, content=body).status_code == 401
        ok = c.post(
            "/v1/completions", json=completion(), headers={"Authorization": "bearer sk-two"}
        )
        assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "ok"


def test_body_size_limit_is_413(fake: FakeServer) -> None:
    with TestClient(create_app(settings(fake, max_body_bytes=4096))) as c:
        big = json.dumps(completion(prompt="x" * 5000)).encode()
        response = c.post("/v1/completions", content=big, headers={"content-type": "application/json"})  # fmt: skip
        assert response.status_code == 413
        assert error_of(response)["code"] == "request_too_large"
        # No Content-Length (chunked): counted while read.
        chunked = c.post(
            "/v1/completions",
            content=iter([big[:3000], big[3000:]]),
            headers={"content-type": "application/json"},
        )
        assert chunked.status_code == 413
        assert error_of(chunked)["code"] == "request_too_large"
        assert c.post("/v1/completions", json=completion(prompt="x" * 3000)).status_code == 200


def test_queue_full_is_429_with_retry_after(fake: FakeServer) -> None:
    with TestClient(create_app(settings(fake, retry_after_s=3))) as c:
        response = c.post("/v1/completions", json=completion("abort:RESOURCE_EXHAUSTED"))
        assert response.status_code == 429
        assert response.headers["retry-after"] == "3"
        assert error_of(response)["type"] == "rate_limit_error"


@pytest.mark.parametrize("stream", [False, True])
def test_timeout_is_504_and_frees_the_engine_call(fake: FakeServer, stream: bool) -> None:
    engine = fake.engine
    cancelled = engine.cancelled
    with TestClient(create_app(settings(fake, request_timeout_s=0.5))) as c:
        response = c.post("/v1/completions", json=completion("hang", stream=stream))
        assert response.status_code == 504
        assert error_of(response)["code"] == "timeout"
    wait_for(lambda: engine.cancelled == cancelled + 1 and engine.active == 0, what="cancel")


@pytest.mark.parametrize("n", [1, 3])  # n > 1: every choice's call is cancelled
@pytest.mark.parametrize(
    ("prompt", "stream", "read_events"),
    [
        ("hang", False, 0),  # waiting for a whole completion
        ("hang", True, 0),  # still queued: no response has started
        ("tokens:500", True, 3),  # mid-stream
    ],
)
def test_client_disconnect_cancels_the_engine_call(
    either_fake: FakeServer, prompt: str, stream: bool, read_events: int, n: int
) -> None:
    fake = either_fake
    engine = fake.engine
    calls, cancelled = engine.calls, engine.cancelled
    request = completion(prompt, stream=stream, n=n)
    with serve_gateway(create_app(settings(fake))) as url:
        if read_events:
            with (
                httpx.Client(base_url=url, timeout=10) as client,
                client.stream("POST", "/v1/completions", json=request) as response,
            ):
                lines = (line for line in response.iter_lines() if line.startswith("data:"))
                for _ in range(read_events):
                    assert json.loads(next(lines).removeprefix("data:"))["choices"]
            # closed unfinished: the connection drops
        else:
            # Nothing is answered yet: drop the connection once the engine has the calls
            # (a client timeout raced the gateway's first calls on a busy machine).
            host, port = url.removeprefix("http://").split(":")
            body = json.dumps(request).encode()
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json"
                    b"\r\nContent-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body)
                )
                wait_for(lambda: engine.calls == calls + n, what="the engine calls")
        wait_for(lambda: engine.calls == calls + n, what="the engine calls")
        wait_for(
            lambda: engine.cancelled == cancelled + n and engine.active == 0,
            what="the engine calls to be cancelled",
        )
        # and the request's handler ended with them (not at the request timeout): the
        # server stops at once instead of waiting out its graceful shutdown
        started = time.monotonic()
    assert time.monotonic() - started < 5


def test_a_client_gone_before_the_first_event_still_frees_the_engine_streams(
    either_fake: FakeServer,
) -> None:
    """The client leaves after every choice has started but before the response does: the
    disconnect cancels the response while it sends its head (Starlette, ASGI 2.3), before
    its body generator has run, and a generator that never ran runs no clean-up."""
    engine = either_fake.engine
    cancelled = engine.cancelled
    body = json.dumps(completion("tokens:500", stream=True, n=2)).encode()
    sent: list[dict] = []

    async def leave_at_once() -> None:
        calls = 0

        async def receive() -> dict:
            # The body; then the handler's watch while choices start, which sees nothing
            # (it is cancelled once they have); then the response's: the client is gone.
            nonlocal calls
            calls += 1
            if calls == 1:
                return {"type": "http.request", "body": body, "more_body": False}
            if calls == 2:
                await asyncio.Event().wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            await asyncio.sleep(0)  # a server may yield in send (uvicorn: flow control)

        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
            "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "root_path": "",
        }  # fmt: skip
        await client.app(scope, receive, send)

    with TestClient(create_app(settings(either_fake))) as client:
        client.portal.call(leave_at_once)
        wait_for(
            lambda: engine.cancelled == cancelled + 2 and engine.active == 0,
            what="the engine calls to be cancelled",
        )
    assert not any(m.get("body") for m in sent)  # no event was sent: the case under test


def gateway_env(**env: str) -> dict[str, str]:
    """This environment without any LLM_GATEWAY_* setting (but a free metrics port), plus
    `env`."""
    clean = {k: v for k, v in ENV.items() if not k.startswith("LLM_GATEWAY_")}
    return clean | {"LLM_GATEWAY_METRICS_PORT": str(free_port())} | env


def start_gateway(args: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, dict]:
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "llm_gateway", *args],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env,
        )  # fmt: skip
    try:
        return proc, read_announcement(proc.stdout, "gateway_listening", timeout=60)
    except TimeoutError:
        proc.kill()
        raise AssertionError(log.read_text()) from None


def test_cli_without_keys_warns_and_binds_loopback(fake: FakeServer, tmp_path: Path) -> None:
    log = tmp_path / "gateway.log"
    proc, announced = start_gateway(
        ["--engine", f"127.0.0.1:{fake.port}", "--port", "0"], gateway_env(), log
    )
    try:
        assert announced["host"] == "127.0.0.1"
        assert httpx.get(f"http://127.0.0.1:{announced['port']}/healthz").status_code == 200
    finally:
        stop_process(proc)
    warnings = [json.loads(line) for line in log.read_text().splitlines() if "NO API KEY" in line]
    assert warnings and warnings[0]["level"] == "WARNING"


def test_cli_keys_from_a_secret_file_are_never_logged(fake: FakeServer, tmp_path: Path) -> None:
    secret_env, secret_file, wrong = "sk-env-0123456789", "sk-file-9876543210", "sk-wrong-55555"
    keys = tmp_path / "api-keys"
    keys.write_text(f"{secret_file}\n")
    log = tmp_path / "gateway.log"
    proc, announced = start_gateway(
        ["--engine", f"127.0.0.1:{fake.port}", "--port", "0", "--log-level", "DEBUG"],
        gateway_env(LLM_GATEWAY_API_KEYS=secret_env, LLM_GATEWAY_API_KEYS_FILE=str(keys)),
        log,
    )
    try:
        base = f"http://127.0.0.1:{announced['port']}/v1"
        for key, status in ((secret_file, 200), (secret_env, 200), (wrong, 401), (None, 401)):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            got = httpx.post(f"{base}/completions", json=completion(), headers=headers)
            assert got.status_code == status, (key, got.text)
    finally:
        stop_process(proc)
    text = log.read_text()
    assert '"api_keys_loaded"' in text and '"count": 2' in text
    assert '"status": 401' in text  # the refused requests are logged...
    for secret in (secret_env, secret_file, wrong):  # ...but no key, right or wrong
        assert secret not in text

    # A broken key setting exits 2 naming the field, without echoing its value.
    bad = subprocess.run(
        [sys.executable, "-m", "llm_gateway", "--port", "0"],
        env=gateway_env(LLM_GATEWAY_API_KEYS='["sk-secret-never-printed"'),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "api_keys" in bad.stderr and "sk-secret-never-printed" not in bad.stderr + bad.stdout


def test_a_public_address_without_keys_is_refused_unless_allowed(
    fake: FakeServer, tmp_path: Path
) -> None:
    """Authentication fails closed: binding a non-loopback address with no key exits 2
    saying how to fix it; --allow-unauthenticated serves it open on purpose."""
    args = [sys.executable, "-m", "llm_gateway", "--engine", f"127.0.0.1:{fake.port}",
            "--host", "0.0.0.0", "--port", "0"]  # fmt: skip
    refused = subprocess.run(args, env=gateway_env(), capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert "refusing to serve 0.0.0.0 without an API key" in refused.stderr
    assert "--allow-unauthenticated" in refused.stderr
    proc, announced = start_gateway(
        [*args[3:], "--allow-unauthenticated"], gateway_env(), tmp_path / "open.log"
    )
    try:
        assert announced["host"] == "0.0.0.0"
        got = httpx.post(f"http://127.0.0.1:{announced['port']}/v1/completions", json=completion())
        assert got.status_code == 200
    finally:
        stop_process(proc)


def test_a_rotated_keys_file_takes_effect_without_a_restart(
    fake: FakeServer, tmp_path: Path
) -> None:
    keys = tmp_path / "api-keys"
    keys.write_text("sk-old-0123456789\n")
    proc, announced = start_gateway(
        ["--engine", f"127.0.0.1:{fake.port}", "--port", "0"],
        gateway_env(LLM_GATEWAY_API_KEYS_FILE=str(keys)), tmp_path / "gateway.log",
    )  # fmt: skip
    url = f"http://127.0.0.1:{announced['port']}/v1/completions"

    def status(key: str) -> int:
        return httpx.post(url, json=completion(), headers={"Authorization": f"Bearer {key}"}).status_code  # fmt: skip

    try:
        assert (status("sk-old-0123456789"), status("sk-new-9876543210")) == (200, 401)
        rotated = tmp_path / "api-keys.new"  # as a Secret volume swaps: a new file moved in
        rotated.write_text('["sk-new-9876543210"]')
        rotated.replace(keys)
        wait_for(lambda: status("sk-new-9876543210") == 200, 10, "the new key to be accepted")
        assert status("sk-old-0123456789") == 401
    finally:
        stop_process(proc)


def test_metrics_are_served_on_their_own_port(fake: FakeServer, tmp_path: Path) -> None:
    """Prometheus /metrics is not on the public API port (where API keys would not guard
    it): on the metrics port it is, with the gateway's series."""
    metrics_port = free_port()
    env = gateway_env(LLM_GATEWAY_METRICS_PORT=str(metrics_port))
    proc, announced = start_gateway(
        ["--engine", f"127.0.0.1:{fake.port}", "--port", "0"], env, tmp_path / "gateway.log"
    )
    try:
        api = f"http://127.0.0.1:{announced['port']}"
        assert httpx.post(f"{api}/v1/completions", json=completion()).status_code == 200
        assert httpx.get(f"{api}/metrics").status_code == 404
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics")
        assert scraped.status_code == 200
        assert 'llm_gateway_requests_total{method="POST",route="/v1/completions"' in scraped.text
    finally:
        stop_process(proc)
