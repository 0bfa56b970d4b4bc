"""`llm-gateway`: the OpenAI-compatible HTTP front of a running engine.

    llm-gateway --engine 127.0.0.1:50051[,HOST:PORT...|dns:///NAME:PORT] --port 8000
                [--host 0.0.0.0] [--api-keys-file /run/secrets/keys]

Prints one JSON line on stdout once it accepts connections,
`{"event": "gateway_listening", "host": ..., "port": N}` (with `--port 0` the port the OS
picked); logs are JSON on stderr, each line of a request with its trace id. SIGTERM/SIGINT
stop gracefully. Keys come from `LLM_GATEWAY_API_KEYS` or `LLM_GATEWAY_API_KEYS_FILE`
(preferred to `--api-key`, which other users can read in the process list). Without any
key the gateway warns loudly and binds 127.0.0.1 unless a host is given.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import threading
from collections.abc import Coroutine
from typing import Annotated, Any, TypeVar

import typer
import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llm_common.logs import announce, setup_logging
from llm_common.tracing import add_trace_ids_to_logs, setup_tracing
from llm_engine.exposition import serve_metrics as serve_prometheus
from llm_gateway.app import create_app
from llm_gateway.settings import GatewaySettings

log = logging.getLogger("llm_gateway")
T = TypeVar("T")
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def bind(host: str, port: int) -> socket.socket:
    """Bind before serving so `--port 0` has a known port and no other process can take it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets whose proto says
    # TCP, and without it Nagle holds a response's body behind its headers until the
    # client's delayed ACK (+40 ms on every request).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def serve_metrics(http_app: FastAPI, settings: GatewaySettings) -> None:
    """Prometheus /metrics on `settings.metrics_port`, apart from the public API port."""
    if settings.metrics_port:
        registry = http_app.state.metrics.registry
        serve_prometheus(settings.metrics_port, settings.bind_host, registry)
        log.info("metrics_listening", extra={"port": settings.metrics_port})


def timed_protocol(header_timeout_s: float, body_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's HTTP protocol with deadlines on reading a request: its headers within
    `header_timeout_s` of the connection opening (or of its previous response ending), its
    body within `body_timeout_s` after. uvicorn has neither, so an idle or half-sent
    connection (slowloris) stayed open for good; past a deadline the connection is closed
    (the app, if it was reading the body, sees a disconnect)."""

    class TimedProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None

        def _arm(self, seconds: float) -> None:
            self._disarm()
            self._timer = self.loop.call_later(seconds, self._expire)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self) -> None:
            if not self.transport.is_closing():
                log.info("connection_timed_out", extra={"client": self.client})
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm(header_timeout_s)

        def on_headers_complete(self) -> None:
            self._arm(body_timeout_s)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            self._disarm()
            super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm(header_timeout_s)  # the next request's headers

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedProtocol


class HttpServer:
    """uvicorn on a socket we bound ourselves, so `--port 0` has a known port at once."""

    def __init__(self, http_app: FastAPI, settings: GatewaySettings) -> None:
        host, port = settings.bind_host, settings.port
        self.host, self.sock = host, bind(host, port)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(
            http_app,
            log_config=None,
            lifespan="on",
            timeout_graceful_shutdown=settings.shutdown_grace_s,
            access_log=False,  # GatewayMiddleware logs each request, with its trace id
            http=timed_protocol(settings.header_timeout_s, settings.body_timeout_s),
            limit_concurrency=settings.max_connections,
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


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` on uvloop when it is installed: its C loop and transports cut the
    gateway's CPU time per streamed token by about a fifth (grpc.aio runs on it as is)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def settings_from_flags(cls: type, flags: dict[str, object]) -> object:
    """CLI flags override env and defaults; only flags actually given are passed."""
    try:
        return cls(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as e:
        # Field names and messages only: input values could be secrets (API keys).
        lines = "\n".join(
            f"  {'.'.join(map(str, err['loc'])) or '(settings)'}: {err['msg']}"
            for err in e.errors()
        )
        typer.echo(f"invalid settings:\n{lines}", err=True)
        raise typer.Exit(2) from None


def load_keys(settings: GatewaySettings) -> list[str]:
    """The accepted keys, checked at start-up; the count is logged, never a key."""
    try:
        keys = settings.load_api_keys()
    except (OSError, ValueError) as e:
        typer.echo(f"invalid settings:\n  api_keys_file: {e}", err=True)
        raise typer.Exit(2) from None
    if keys:
        log.info("api_keys_loaded", extra={"count": len(keys)})
    elif not _is_loopback(settings.bind_host) and not settings.allow_unauthenticated:
        typer.echo(
            f"refusing to serve {settings.bind_host} without an API key: set "
            "LLM_GATEWAY_API_KEYS or LLM_GATEWAY_API_KEYS_FILE (--api-key, --api-keys-file), "
            "or pass --allow-unauthenticated (LLM_GATEWAY_ALLOW_UNAUTHENTICATED=true) to serve "
            "it open on purpose",
            err=True,
        )
        raise typer.Exit(2)
    else:
        log.warning(
            "NO API KEY CONFIGURED: every client is accepted without authentication. Set "
            "LLM_GATEWAY_API_KEYS or LLM_GATEWAY_API_KEYS_FILE before exposing this gateway.",
            extra={"host": settings.bind_host, "host_set": settings.host is not None},
        )
    return keys


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@app.command()
def run(
    engine: Annotated[str | None, typer.Option(help="engine gRPC target host:port")] = None,
    host: Annotated[str | None, typer.Option(help="address to bind")] = None,
    port: Annotated[int | None, typer.Option(help="port to bind; 0 picks a free one")] = None,
    api_key: Annotated[
        list[str] | None, typer.Option(help="accepted Bearer key (repeatable)")
    ] = None,
    api_keys_file: Annotated[
        str | None, typer.Option(help="file of accepted keys, one per line")
    ] = None,
    admin_key: Annotated[
        list[str] | None,
        typer.Option(help="Bearer key of the admin routes (LoRA loads; repeatable)"),
    ] = None,
    allow_unauthenticated: Annotated[
        bool | None,
        typer.Option("--allow-unauthenticated", help="serve a non-loopback address keyless"),
    ] = None,
    max_body_bytes: Annotated[
        int | None, typer.Option(help="larger request bodies get 413")
    ] = None,
    request_timeout_s: Annotated[
        float | None, typer.Option(help="deadline of one request, seconds (504)")
    ] = None,
    multiplex: Annotated[
        bool | None,
        typer.Option(help="one GenerateMany stream per engine (off: a call per generation)"),
    ] = None,
    header_timeout_s: Annotated[
        float | None, typer.Option(help="close a connection whose request headers lag this long")
    ] = None,
    body_timeout_s: Annotated[
        float | None, typer.Option(help="close a connection whose request body lags this long")
    ] = None,
    max_connections: Annotated[
        int | None, typer.Option(help="connections and requests at once (beyond: 503)")
    ] = None,
    engine_keepalive_s: Annotated[
        float | None, typer.Option(help="ping engines this often; 3 s without answer: down")
    ] = None,
    shutdown_grace_s: Annotated[
        float | None, typer.Option(help="after SIGTERM, time for requests in flight")
    ] = None,
    metrics_port: Annotated[
        int | None, typer.Option(help="Prometheus /metrics port (0: on the API port)")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="DEBUG, INFO, WARNING, ...")] = None,
) -> None:
    """Serve the OpenAI API in front of one or more llm-engines."""
    flags = dict(
        engine=engine, host=host, port=port, api_keys=api_key or None, api_keys_file=api_keys_file,
        admin_keys=admin_key or None, allow_unauthenticated=allow_unauthenticated,
        max_body_bytes=max_body_bytes, request_timeout_s=request_timeout_s, multiplex=multiplex,
        header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s,
        max_connections=max_connections, engine_keepalive_s=engine_keepalive_s,
        shutdown_grace_s=shutdown_grace_s, metrics_port=metrics_port, log_level=log_level,
    )  # fmt: skip
    settings = settings_from_flags(GatewaySettings, flags)
    assert isinstance(settings, GatewaySettings)
    setup_logging(settings.log_level)
    add_trace_ids_to_logs()
    setup_tracing("llm-gateway")
    load_keys(settings)
    try:
        http_app = create_app(settings)
        server = HttpServer(http_app, settings)
        serve_metrics(http_app, settings)
    except OSError as e:
        log.error(
            "bind_failed",
            extra={"host": settings.bind_host, "port": settings.port, "error": str(e)},
        )
        raise typer.Exit(1) from None
    run_loop(server.serve(engine=settings.engine))


def main() -> None:
    app()
