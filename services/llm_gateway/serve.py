"""`llm-serve`: engine and gateway in one process, for one machine or a demo.

    llm-serve --checkpoint runs/demo --host 127.0.0.1 --port 8000 [--slots 8] [--compile] ...

Its settings are the engine's plus the gateway's (`SERVE_FLAGS`): every `EngineSettings`
and `GatewaySettings` field is a flag, but for the few llm-serve sets itself
(`DESCRIPTION`), and each keeps its variable (`LLM_ENGINE_*`, `LLM_GATEWAY_*`). The
engine's grpc.aio server listens on an ephemeral 127.0.0.1 port and shares the event loop
with the gateway (the model runs in the engine-core process, or on the scheduler thread
with `--no-engine-process`, so HTTP stays responsive). HTTP is up at once: /healthz
answers while the model loads, /readyz once it is SERVING. Prints
`{"event": "gateway_listening", "host", "port": N, "engine_port": M}`. Exit code 1 when
the checkpoint cannot be loaded, 2 on a bad setting.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
from collections.abc import Sequence
from typing import Any

import torch
from pydantic import SecretStr

from llm_common.cli import flags_of, parse_flags, resolve
from llm_common.logs import setup_logging
from llm_common.tracing import add_trace_ids_to_logs, setup_tracing
from llm_engine.server import start_engine
from llm_engine.settings import EngineSettings
from llm_gateway.app import create_app
from llm_gateway.cli import HttpServer, load_keys, run_loop, serve_metrics
from llm_gateway.settings import GatewaySettings

log = logging.getLogger("llm_gateway.serve")

# What llm-serve sets itself rather than take as settings: the engine listens on an
# ephemeral 127.0.0.1 port with a token only this process knows, and the gateway is wired
# to it; the bound address and /metrics port are the HTTP server's.
NOT_ENGINE_FLAGS = {"host", "port", "metrics_port", "auth_token", "tls_cert", "tls_key",
                    "tls_client_ca"}  # fmt: skip
NOT_GATEWAY_FLAGS = {"engine", "engine_token", "engine_tls_ca", "engine_tls_cert",
                     "engine_tls_key"}  # fmt: skip
DESCRIPTION = """Serve a checkpoint with the OpenAI API, engine and gateway in one process.

The flags are llm-engine's and llm-gateway's, but for those llm-serve sets itself: its
engine listens on an ephemeral 127.0.0.1 port with a token only this process knows (no
engine --host, --port, --metrics-port, --auth-token, --tls-*; no gateway --engine,
--engine-token, --engine-tls-*). --host, --port and --metrics-port are the HTTP
server's; --log-level and --shutdown-grace-s set both (the HTTP drain, then the
engine's). An engine flag is also LLM_ENGINE_<FLAG>, a gateway flag LLM_GATEWAY_<FLAG>
(a shared one: each service reads its own); a flag beats its variable."""
# The gateway's first: it declares the shared ones (its --shutdown-grace-s is the HTTP
# drain, which is what requests in flight get).
SERVE_FLAGS = flags_of(
    "ServeFlags", DESCRIPTION, (GatewaySettings, NOT_GATEWAY_FLAGS),
    (EngineSettings, NOT_ENGINE_FLAGS),
)  # fmt: skip


async def serve(engine_settings: EngineSettings, gateway_settings: GatewaySettings) -> int:
    # The engine listens on loopback only, and only this process knows its token.
    token = secrets.token_urlsafe(32)
    engine = await start_engine("127.0.0.1", 0, token=token)
    gateway_settings = gateway_settings.model_copy(
        update={"engine": [f"127.0.0.1:{engine.port}"], "engine_token": SecretStr(token)}
    )
    try:
        http_app = create_app(gateway_settings)
        http = HttpServer(http_app, gateway_settings)
        serve_metrics(http_app, gateway_settings)
    except OSError as e:
        log.error("bind_failed", extra={"port": gateway_settings.port, "error": str(e)})
        await engine.stop(0)
        return 1
    failed = False

    async def load() -> None:
        nonlocal failed
        try:
            await engine.load(engine_settings.checkpoint, **engine_settings.load_options())
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # torch's CheckpointException is a BaseException
            log.error(
                "model_load_failed",
                extra={"checkpoint": engine_settings.checkpoint, "error": str(e)},
            )
            failed = True
            http.stop()
            return
        await engine.died.wait()  # the engine-core process died: exit 1 (to be restarted)
        failed = True
        http.stop()

    loading = asyncio.create_task(load())
    try:
        await http.serve(engine_port=engine.port)
    finally:
        loading.cancel()
        await engine.stop(engine_settings.shutdown_grace_s)
    return 1 if failed else 0


def parse(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The flags given (exits 2 on an unknown one, 0 after --help)."""
    return parse_flags(SERVE_FLAGS, argv, "llm-serve", DESCRIPTION)


def settings(argv: Sequence[str] | None = None) -> tuple[EngineSettings, GatewaySettings]:
    """The engine's and the gateway's settings: the flags each takes, then its variables."""
    flags = parse(argv)
    return (
        resolve(EngineSettings, flags, "llm-serve", exclude=NOT_ENGINE_FLAGS),
        resolve(GatewaySettings, flags, "llm-serve", exclude=NOT_GATEWAY_FLAGS),
    )


def main(argv: Sequence[str] | None = None) -> int:
    engine_settings, gateway_settings = settings(argv)
    setup_logging(gateway_settings.log_level)
    add_trace_ids_to_logs()
    setup_tracing("llm-serve")
    load_keys(gateway_settings, "llm-serve")
    if engine_settings.threads:
        torch.set_num_threads(engine_settings.threads)
    return run_loop(serve(engine_settings, gateway_settings))


if __name__ == "__main__":
    sys.exit(main())
