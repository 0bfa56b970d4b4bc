"""`llm-gateway`: the OpenAI-compatible HTTP front of a running engine.

    llm-gateway --engine 127.0.0.1:50051[,HOST:PORT...|dns:///NAME:PORT] --port 8000
                [--host 0.0.0.0] [--api-keys-file /run/secrets/keys] ...

Every field of `GatewaySettings` is a flag (`llm-gateway --help` lists them with their
descriptions) and an `LLM_GATEWAY_<NAME>` variable; flag > variable > default
(`llm_common.cli`). Prints one JSON line on stdout once it accepts connections,
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
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llm_common.cli import fail, parse_flags, resolve
from llm_common.exposition import serve_metrics as serve_prometheus
from llm_common.logs import announce, setup_logging
from llm_common.tracing import add_trace_ids_to_logs, setup_tracing
from llm_gateway.app import create_app
from llm_gateway.settings import GatewaySettings

log = logging.getLogger("llm_gateway")
T = TypeVar("T")


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


def load_keys(settings: GatewaySettings, prog: str = "llm-gateway") -> list[str]:
    """The accepted keys, checked at start-up (exit 2 if unusable); the count is logged,
    never a key."""
    try:
        keys = settings.load_api_keys()
    except (OSError, ValueError) as e:
        fail(prog, f"invalid settings:\n  api_keys_file: {e}")
    if keys:
        log.info("api_keys_loaded", extra={"count": len(keys)})
    elif not _is_loopback(settings.bind_host) and not settings.allow_unauthenticated:
        fail(
            prog,
            f"refusing to serve {settings.bind_host} without an API key: set "
            "LLM_GATEWAY_API_KEYS or LLM_GATEWAY_API_KEYS_FILE (--api-key, --api-keys-file), "
            "or pass --allow-unauthenticated (LLM_GATEWAY_ALLOW_UNAUTHENTICATED=true) to serve "
            "it open on purpose",
        )
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


DESCRIPTION = """Serve the OpenAI API in front of one or more llm-engines.

Every flag is also an environment variable, LLM_GATEWAY_<FLAG> (--api-keys-file:
LLM_GATEWAY_API_KEYS_FILE); a flag beats its variable."""


def parse(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The flags given (exits 2 on an unknown one, 0 after --help)."""
    return parse_flags(GatewaySettings, argv, "llm-gateway", DESCRIPTION)


def main(argv: Sequence[str] | None = None) -> int:
    settings = resolve(GatewaySettings, parse(argv), "llm-gateway")
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
        return 1
    run_loop(server.serve(engine=settings.engine))
    return 0
