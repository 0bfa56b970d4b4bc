"""The `/metrics` HTTP endpoint of the engine and the gateway (prometheus-client's WSGI app)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app

METRICS_PATH = "/metrics"


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # scrapes are not news
        pass


def _only_metrics_path(app: Callable) -> Callable:
    """prometheus-client answers every path; a scrape config with a wrong path must see a
    404 (and its target down), not the metrics."""

    def wrapped(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != METRICS_PATH:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [f"not found: the metrics are at {METRICS_PATH}\n".encode()]
        return app(environ, start_response)

    return wrapped


def serve_metrics(
    port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
) -> ThreadingWSGIServer:
    """Serve `registry` at `/metrics` (and nothing else) on host:port, from a daemon thread."""

    class Server(ThreadingWSGIServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    server = make_server(
        host, port, _only_metrics_path(make_wsgi_app(registry)), Server,
        handler_class=_QuietHandler,
    )  # fmt: skip
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server
