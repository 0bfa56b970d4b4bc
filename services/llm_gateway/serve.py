"""`llm-serve`: engine and gateway in one process, for one machine or a demo.

    llm-serve --checkpoint runs/demo --host 127.0.0.1 --port 8000

The engine's grpc.aio server listens on an ephemeral 127.0.0.1 port and shares the event
loop with the gateway (the model itself runs on the scheduler thread, so HTTP stays
responsive). HTTP is up at once: /healthz answers while the model loads, /readyz once it
is SERVING. Prints `{"event": "gateway_listening", "host", "port": N, "engine_port": M}`.
Exit code 1 when the checkpoint cannot be loaded.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sys
from typing import Annotated

import torch
import typer
from pydantic import SecretStr

from llm_common.logs import setup_logging
from llm_common.tracing import add_trace_ids_to_logs, setup_tracing
from llm_engine.server import start_engine
from llm_engine.settings import EngineSettings
from llm_gateway.app import create_app
from llm_gateway.cli import HttpServer, load_keys, run_loop, serve_metrics, settings_from_flags
from llm_gateway.settings import GatewaySettings

log = logging.getLogger("llm_gateway.serve")
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


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


@app.command()
def run(
    checkpoint: Annotated[
        str | None, typer.Option(help="run dir or checkpoint dir (or s3:// URI)")
    ] = None,
    host: Annotated[str | None, typer.Option(help="HTTP address to bind")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port; 0 picks a free one")] = None,
    model_name: Annotated[
        str | None, typer.Option(help="served model id (default: run name)")
    ] = None,
    max_queue: Annotated[int | None, typer.Option(help="waiting requests before 429")] = None,
    device: Annotated[str | None, typer.Option(help="torch device, e.g. cpu or cuda")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | float32 | bfloat16 | float16")] = None,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads (0: default)")] = None,
    slots: Annotated[int | None, typer.Option(help="KV-cache slots (concurrent requests)")] = None,
    max_model_len: Annotated[
        int | None, typer.Option(help="context served (default: the model's, capped to memory)")
    ] = None,
    kv_cache_gib: Annotated[
        float | None, typer.Option(help="KV-cache memory, GiB (default: 90% of free memory)")
    ] = None,
    compile: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile at start")
    ] = None,
    api_key: Annotated[
        list[str] | None, typer.Option(help="accepted Bearer key (repeatable)")
    ] = None,
    allow_unauthenticated: Annotated[
        bool | None,
        typer.Option("--allow-unauthenticated", help="serve a non-loopback address keyless"),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ...")] = None,
) -> None:
    """Serve a checkpoint with the OpenAI API, engine and gateway in one process."""
    engine_flags = dict(
        checkpoint=checkpoint, model_name=model_name, max_queue=max_queue, device=device,
        dtype=dtype, threads=threads, slots=slots, max_model_len=max_model_len,
        kv_cache_gib=kv_cache_gib, compile=compile, log_level=log_level,
    )  # fmt: skip
    gateway_flags = dict(host=host, port=port, api_keys=api_key or None, log_level=log_level,
                         allow_unauthenticated=allow_unauthenticated)  # fmt: skip
    engine_settings = settings_from_flags(EngineSettings, engine_flags)
    gateway_settings = settings_from_flags(GatewaySettings, gateway_flags)
    assert isinstance(engine_settings, EngineSettings)
    assert isinstance(gateway_settings, GatewaySettings)
    setup_logging(gateway_settings.log_level)
    add_trace_ids_to_logs()
    setup_tracing("llm-serve")
    load_keys(gateway_settings)
    if engine_settings.threads:
        torch.set_num_threads(engine_settings.threads)
    sys.exit(run_loop(serve(engine_settings, gateway_settings)))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
