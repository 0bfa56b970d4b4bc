"""Several engines behind one gateway: least in flight first (ties take turns), engines
that fail health are skipped, a full queue is retried on another engine, `dns:///` names
expand to every address, and no healthy engine is a 503."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
from fastapi.testclient import TestClient
from tests.integration.engine_double import MODEL, NOT_SERVING, SERVING, FakeServer, fake_engines
from tests.support import wait_for

from llm_gateway.app import create_app
from llm_gateway.settings import GatewaySettings


def completion(prompt: str = "hi", **overrides: object) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 4, **overrides}


@pytest.fixture
def two() -> Iterator[tuple[FakeServer, FakeServer, TestClient]]:
    with fake_engines("a", "b") as (a, b):
        targets = f"127.0.0.1:{a.port},127.0.0.1:{b.port}"
        with TestClient(create_app(GatewaySettings(engine=targets, metrics_port=0))) as client:
            yield a, b, client


def test_requests_spread_and_skip_unhealthy_engines(
    two: tuple[FakeServer, FakeServer, TestClient],
) -> None:
    a, b, client = two
    for _ in range(6):
        assert client.post("/v1/completions", json=completion()).status_code == 200
    assert (a.engine.calls, b.engine.calls) == (3, 3)

    a.set_health(NOT_SERVING)
    wait_for(
        lambda: f'engine_healthy{{engine="127.0.0.1:{a.port}"}} 0.0' in client.get("/metrics").text
    )
    for _ in range(4):
        assert client.post("/v1/completions", json=completion()).status_code == 200
    assert (a.engine.calls, b.engine.calls) == (3, 7)
    assert client.get("/readyz").status_code == 200

    b.set_health(NOT_SERVING)
    wait_for(lambda: client.get("/readyz").status_code == 503, what="no engine ready")
    none = client.post("/v1/completions", json=completion())
    assert none.status_code == 503
    assert none.json()["error"]["code"] == "engine_unavailable"

    a.set_health(SERVING)
    wait_for(lambda: client.get("/readyz").status_code == 200, what="a back")
    assert client.post("/v1/completions", json=completion()).status_code == 200
    assert a.engine.calls == 4


def test_least_in_flight_first(two: tuple[FakeServer, FakeServer, TestClient]) -> None:
    a, b, client = two
    # While a long stream runs on one engine, every short request lands on the other.
    done = threading.Event()

    def long_stream() -> None:
        with client.stream("POST", "/v1/completions", json=completion("tokens:60", stream=True)) as r:  # fmt: skip
            for _ in r.iter_lines():
                pass
        done.set()

    thread = threading.Thread(target=long_stream)
    thread.start()
    wait_for(lambda: a.engine.active + b.engine.active == 1, what="the long stream")
    busy, idle = (a, b) if a.engine.active else (b, a)
    for _ in range(4):
        assert client.post("/v1/completions", json=completion()).status_code == 200
    thread.join(10)
    assert done.is_set()
    assert (busy.engine.calls, idle.engine.calls) == (1, 4)


def test_a_full_queue_is_retried_on_another_engine(
    two: tuple[FakeServer, FakeServer, TestClient],
) -> None:
    a, b, client = two
    a.engine.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
    for _ in range(4):
        response = client.post("/v1/completions", json=completion())
        assert response.status_code == 200
    assert b.engine.calls == 4  # a refused the ones it was offered: b served them all
    b.engine.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
    full = client.post("/v1/completions", json=completion())
    assert full.status_code == 429 and full.headers["retry-after"] == "1"


def test_only_refusals_go_to_another_engine_and_only_once() -> None:
    """A refusal (queue full, shutting down) moves the request to one other engine; any
    other failure (a connection broken mid-generation) is final: it may have run."""
    with fake_engines("a", "b", "c") as engines:
        targets = ",".join(f"127.0.0.1:{e.port}" for e in engines)
        with TestClient(create_app(GatewaySettings(engine=targets, metrics_port=0))) as client:
            for e in engines:
                e.engine.refuse = grpc.StatusCode.RESOURCE_EXHAUSTED
            assert client.post("/v1/completions", json=completion()).status_code == 429
            assert sum(e.engine.calls for e in engines) == 2  # once elsewhere, not thrice

            for e in engines:
                e.engine.refuse, e.engine.calls = grpc.StatusCode.UNAVAILABLE, 0
            assert client.post("/v1/completions", json=completion()).status_code == 503
            assert sum(e.engine.calls for e in engines) == 1  # not re-run

            for e in engines:
                e.engine.refuse_message, e.engine.calls = "the engine is shutting down", 0
            engines[2].engine.refuse = None  # the least busy order rotates: any may be last
            statuses = [client.post("/v1/completions", json=completion()).status_code
                        for _ in range(6)]  # fmt: skip
            assert 200 in statuses and sum(e.engine.calls for e in engines) <= 12


def test_a_stopped_engine_is_skipped() -> None:
    with fake_engines("a") as (a,):
        b = FakeServer("b")
        targets = f"127.0.0.1:{a.port},127.0.0.1:{b.port}"
        with TestClient(create_app(GatewaySettings(engine=targets, metrics_port=0))) as client:
            assert client.post("/v1/completions", json=completion()).status_code == 200
            b.stop()
            wait_for(
                lambda: (
                    f'engine_healthy{{engine="127.0.0.1:{b.port}"}} 0.0'
                    in client.get("/metrics").text
                ),
                what="b unhealthy",
            )
            for _ in range(3):
                assert client.post("/v1/completions", json=completion()).status_code == 200
            assert client.get("/readyz").status_code == 200


def test_a_dns_name_expands_to_its_addresses() -> None:
    with fake_engines("a") as (a,):
        # localhost may resolve to 127.0.0.1 and ::1: the engine listens on the first only,
        # so ::1 fails health and is skipped.
        settings = GatewaySettings(
            engine=f"dns:///localhost:{a.port}", resolve_interval_s=0.2, metrics_port=0
        )
        with TestClient(create_app(settings)) as client:
            for _ in range(3):
                assert client.post("/v1/completions", json=completion()).status_code == 200
            assert a.engine.calls == 3
            assert f'engine="127.0.0.1:{a.port}"' in client.get("/metrics").text
