"""`llm-gateway`: the OpenAI-compatible HTTP front of a running engine.

    llm-gateway --engine 127.0.0.1:50051 --host 127.0.0.1 --port 8000 [--api-key KEY ...]

Prints one JSON line on stdout once it accepts connections,
`{"event": "gateway_listening", "host": ..., "port": N}` (with `--port 0` the port the OS
picked); logs are JSON on stderr. SIGTERM/SIGINT stop gracefully.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from typing import Annotated

import typer
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from llm_engine.jsonlog import announce, setup_logging
from llm_gateway.app import create_app
from llm_gateway.settings import GatewaySettings

log = logging.getLogger("llm_gateway")
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def bind(host: str, port: int) -> socket.socket:
    """Bind before serving so `--port 0` has a known port and no other process can take it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


class HttpServer:
    """uvicorn on a socket we bound ourselves, so `--port 0` has a known port at once."""

    def __init__(self, http_app: FastAPI, host: str, port: int) -> None:
        self.host, self.sock = host, bind(host, port)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            http_app, log_config=None, lifespan="on", timeout_graceful_shutdown=10
        )
        self.server = uvicorn.Server(config)

    async def serve(self, **announce_fields: object) -> None:
        """Serve until SIGTERM/SIGINT or `stop()`; announce once connections are accepted."""
        if threading.current_thread() is threading.main_thread():
            # uvicorn re-raises a caught SIGTERM to the handler that was installed before it
            # (the default one kills the process): ours lets the caller clean up and exit 0.
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: self.stop())
        task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started and not task.done():
            await asyncio.sleep(0.02)
        if self.server.started:
            announce("gateway_listening", host=self.host, port=self.port, **announce_fields)
        await task

    def stop(self) -> None:
        self.server.should_exit = True


def settings_from_flags(cls: type, flags: dict[str, object]) -> object:
    """CLI flags override env and defaults; only flags actually given are passed."""
    try:
        return cls(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        typer.echo(f"invalid settings:\n{e}", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(
    engine: Annotated[str | None, typer.Option(help="engine gRPC target host:port")] = None,
    host: Annotated[str | None, typer.Option(help="address to bind")] = None,
    port: Annotated[int | None, typer.Option(help="port to bind; 0 picks a free one")] = None,
    api_key: Annotated[
        list[str] | None, typer.Option(help="accepted Bearer key (repeatable)")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ...")] = None,
) -> None:
    """Serve the OpenAI API in front of an llm-engine."""
    flags = dict(engine=engine, host=host, port=port, api_keys=api_key or None, log_level=log_level)
    settings = settings_from_flags(GatewaySettings, flags)
    assert isinstance(settings, GatewaySettings)
    setup_logging(settings.log_level)
    try:
        server = HttpServer(create_app(settings), settings.host, settings.port)
    except OSError as e:
        log.error(
            "bind_failed", extra={"host": settings.host, "port": settings.port, "error": str(e)}
        )
        raise typer.Exit(1) from None
    asyncio.run(server.serve(engine=settings.engine))


def main() -> None:
    app()
