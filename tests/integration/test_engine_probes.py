"""The engine's probes as the chart renders them: the startupProbe gives the model load
`engine.startupSeconds`, and asked of a real engine as the kubelet asks them, only liveness
passes while the model loads, all three once it is served."""

from __future__ import annotations

import asyncio

import grpc
import helm_python as helm
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests.integration.test_helm_chart import CHART, container, objects, render

from llm_engine.server import start_engine as start_server


@pytest.fixture(scope="module")
def chart():
    return helm.Chart.load(CHART)


def test_the_startup_probe_covers_the_model_load(chart):
    for seconds, threshold in ((900, 90), (125, 13), (3600, 360)):
        docs = objects(render(chart, {"engine": {"startupSeconds": seconds}}))
        engine = container(docs, "engine")
        startup, ready = engine["startupProbe"], engine["readinessProbe"]
        # The service that turns SERVING once the model is served, as readiness asks.
        assert startup["grpc"] == ready["grpc"] and "service" not in startup["grpc"]
        assert startup["failureThreshold"] == threshold
        assert seconds <= startup["periodSeconds"] * startup["failureThreshold"] < seconds + 10
        assert engine["livenessProbe"]["grpc"]["service"] == "liveness"


def test_the_probes_follow_a_real_engines_model_load(chart, tiny_checkpoint: str):
    """The rendered probes, asked of a real engine as the kubelet asks them: while the model
    loads only liveness passes (the startup probe holds the others off, and nothing kills
    or routes to the engine); once the model is served, all three pass."""
    engine = container(objects(render(chart, {})), "engine")
    env = {e["name"]: e.get("value") for e in engine["env"]}
    probes = {k: engine[k]["grpc"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {p["port"] for p in probes.values()} == {int(env["LLM_ENGINE_PORT"])}

    async def main() -> tuple[dict, dict]:
        server = await start_server("127.0.0.1", 0)  # the test's port stands in for 50051
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)

                async def passing() -> dict[str, bool]:
                    out = {}
                    for name, probe in probes.items():
                        request = health_pb2.HealthCheckRequest(service=probe.get("service", ""))
                        reply = await health.Check(request, timeout=5)
                        out[name] = reply.status == health_pb2.HealthCheckResponse.SERVING
                    return out

                loading = await passing()
                await server.load(tiny_checkpoint, n_slots=1, engine_process=False)
                return loading, await passing()
        finally:
            await server.stop(0)

    loading, loaded = asyncio.run(main())
    assert loading == {"startupProbe": False, "readinessProbe": False, "livenessProbe": True}
    assert loaded == {"startupProbe": True, "readinessProbe": True, "livenessProbe": True}
