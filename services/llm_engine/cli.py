"""`llm-engine`: serve one checkpoint over gRPC.

    llm-engine --checkpoint runs/demo --host 127.0.0.1 --port 50051 [--model-name NAME]
               [--adapter runs/sft/adapter [--no-merge-adapter]]
               [--lora NAME=PATH ...] [--enable-lora] [--max-loras 4] [--max-lora-rank 16]
               [--slots 8] [--max-model-len N] [--kv-cache-gib G] [--prefill-chunk 512] [--compile] [--max-queue 64]
               [--metrics-port 0] [--device cpu] [--dtype auto] [--threads 0] [--no-engine-process]

Prints one JSON line on stdout once the port is bound,
`{"event": "engine_listening", "host": ..., "port": N}` (with `--port 0` the port the OS
picked); everything else is JSON logs on stderr. Health turns SERVING once the model is
loaded. SIGTERM/SIGINT drain: health turns NOT_SERVING, new calls are refused, running
ones get `shutdown_grace_s` to finish. Exit code 1 when the checkpoint cannot be loaded.
The model and the scheduler run in a child process (`llm_engine.core`; the engine exits
with code 1 if it dies), or in this one with `--no-engine-process`. Every setting is also `LLM_ENGINE_<NAME>`; OpenTelemetry reads the standard `OTEL_*`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import Annotated

import torch
import typer
from pydantic import ValidationError

from llm_common.logs import announce, setup_logging
from llm_common.tracing import add_trace_ids_to_logs, setup_tracing
from llm_engine.exposition import serve_metrics
from llm_engine.server import start_engine
from llm_engine.settings import EngineSettings

log = logging.getLogger("llm_engine")
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


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


@app.command()
def run(
    checkpoint: Annotated[
        str | None, typer.Option(help="run dir or checkpoint dir (or s3:// URI)")
    ] = None,
    adapter: Annotated[
        str | None, typer.Option(help="LoRA adapter dir (PEFT layout) served on the base")
    ] = None,
    merge_adapter: Annotated[
        bool | None,
        typer.Option("--merge-adapter/--no-merge-adapter", help="fold the adapter in"),
    ] = None,
    lora: Annotated[
        list[str] | None,
        typer.Option(
            help="NAME=PATH: a LoRA adapter (PEFT dir) served beside the base; repeatable"
        ),
    ] = None,
    enable_lora: Annotated[
        bool | None,
        typer.Option(
            "--enable-lora/--no-enable-lora", help="serve LoRA adapters loaded at run time"
        ),
    ] = None,
    max_loras: Annotated[int | None, typer.Option(help="LoRA adapters served at once")] = None,
    max_lora_rank: Annotated[int | None, typer.Option(help="the highest LoRA rank served")] = None,
    host: Annotated[str | None, typer.Option(help="address to bind")] = None,
    port: Annotated[int | None, typer.Option(help="port to bind; 0 picks a free one")] = None,
    model_name: Annotated[
        str | None, typer.Option(help="served model id (default: run name)")
    ] = None,
    max_queue: Annotated[
        int | None, typer.Option(help="waiting requests before RESOURCE_EXHAUSTED")
    ] = None,
    slots: Annotated[int | None, typer.Option(help="KV-cache slots (concurrent requests)")] = None,
    max_model_len: Annotated[
        int | None, typer.Option(help="context served, KV cache per slot (default: the model's)")
    ] = None,
    kv_cache_gib: Annotated[
        float | None,
        typer.Option(help="KV-cache memory, GiB (default: 90% of what is free after loading)"),
    ] = None,
    prefill_chunk: Annotated[
        int | None, typer.Option(help="prompt tokens prefilled per scheduler step")
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the model calls at start (CPU: needs a C++ compiler, else eager)",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port (0: off)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="torch device, e.g. cpu or cuda")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | float32 | bfloat16 | float16")] = None,
    threads: Annotated[int | None, typer.Option(help="torch intra-op threads (0: default)")] = None,
    engine_process: Annotated[
        bool | None,
        typer.Option(
            "--engine-process/--no-engine-process",
            help="run the model and scheduler in their own process (default) or in this one",
        ),
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ...")] = None,
) -> None:
    """Serve a checkpoint over the llm.engine.v1 gRPC API."""
    flags = dict(
        checkpoint=checkpoint, adapter=adapter, merge_adapter=merge_adapter, host=host, port=port, model_name=model_name, max_queue=max_queue,
        slots=slots, prefill_chunk=prefill_chunk, compile=compile, metrics_port=metrics_port,
        max_model_len=max_model_len, kv_cache_gib=kv_cache_gib, device=device, dtype=dtype, threads=threads, log_level=log_level,
        engine_process=engine_process, lora=lora or None, enable_lora=enable_lora,
        max_loras=max_loras, max_lora_rank=max_lora_rank,
    )  # fmt: skip
    try:
        settings = EngineSettings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        typer.echo(f"llm-engine: invalid settings:\n{e}", err=True)
        raise typer.Exit(2) from None
    setup_logging(settings.log_level)
    add_trace_ids_to_logs()
    setup_tracing("llm-engine")
    if settings.threads and not settings.engine_process:  # else the engine core's
        torch.set_num_threads(settings.threads)
    sys.exit(asyncio.run(serve(settings)))


def main() -> None:
    app()
