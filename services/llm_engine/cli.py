"""`llm-engine`: serve one checkpoint over gRPC.

    llm-engine --checkpoint runs/demo --host 127.0.0.1 --port 50051 [--slots 8] [--compile] ...

Every field of `EngineSettings` is a flag (`llm-engine --help` lists them with their
descriptions) and an `LLM_ENGINE_<NAME>` variable; flag > variable > default
(`llm_common.cli`). Prints one JSON line on stdout once the port is bound,
`{"event": "engine_listening", "host": ..., "port": N}` (with `--port 0` the port the OS
picked); everything else is JSON logs on stderr. Health turns SERVING once the model is
loaded. SIGTERM/SIGINT drain: health turns NOT_SERVING, new calls are refused, running
ones get `shutdown_grace_s` to finish. Exit code 1 when the checkpoint cannot be loaded, 2
on a bad setting. The model and the scheduler run in a child process (`llm_engine.core`;
the engine exits with code 1 if it dies), or in this one with `--no-engine-process`.
OpenTelemetry reads the standard `OTEL_*`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import Any

import torch

from llm_common.cli import parse_flags, resolve
from llm_common.exposition import serve_metrics
from llm_common.logs import announce, setup_logging
from llm_common.tracing import add_trace_ids_to_logs, setup_tracing
from llm_engine.server import start_engine
from llm_engine.settings import EngineSettings

log = logging.getLogger("llm_engine")


async def serve(settings: EngineSettings) -> int:
    """Run the engine until SIGTERM/SIGINT; return the process exit code."""
    try:
        security = settings.server_options()
    except OSError as e:  # a TLS file that cannot be read
        log.error("tls_files_unreadable", extra={"error": str(e)})
        return 2
    try:
        engine = await start_engine(settings.host, settings.port, **security)
    except RuntimeError as e:  # grpc raises RuntimeError when the port cannot be bound
        log.error(
            "bind_failed", extra={"host": settings.host, "port": settings.port, "error": str(e)}
        )
        return 1
    announce("engine_listening", host=settings.host, port=engine.port)
    if settings.metrics_port:
        serve_metrics(settings.metrics_port, settings.host)
        log.info("metrics_listening", extra={"port": settings.metrics_port})

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    load = asyncio.create_task(engine.load(settings.checkpoint, **settings.load_options()))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if load.done() and load.exception() is not None:
        e = load.exception()
        log.error("model_load_failed", extra={"checkpoint": settings.checkpoint, "error": str(e)})
        code = 1
    elif not stop.is_set():
        died = asyncio.create_task(engine.died.wait())
        await asyncio.wait({stopped, died}, return_when=asyncio.FIRST_COMPLETED)
        died.cancel()
        if engine.died.is_set():  # the engine-core process is gone: a supervisor restarts us
            code = 1
    stopped.cancel()
    await engine.stop(settings.shutdown_grace_s)
    return code


DESCRIPTION = """Serve a checkpoint over the llm.engine.v1 gRPC API.

Every flag is also an environment variable, LLM_ENGINE_<FLAG> (--max-queue:
LLM_ENGINE_MAX_QUEUE); a flag beats its variable."""


def parse(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The flags given (exits 2 on an unknown one, 0 after --help)."""
    return parse_flags(EngineSettings, argv, "llm-engine", DESCRIPTION)


def main(argv: Sequence[str] | None = None) -> int:
    settings = resolve(EngineSettings, parse(argv), "llm-engine")
    setup_logging(settings.log_level)
    add_trace_ids_to_logs()
    setup_tracing("llm-engine")
    if settings.threads and not settings.engine_process:  # else the engine core's
        torch.set_num_threads(settings.threads)
    return asyncio.run(serve(settings))
