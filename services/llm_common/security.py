"""Who may call the engine: a shared token on every Engine RPC (constant-time check; the
standard health service stays open for probes), and optional TLS, with client certificates
checked against a CA for mutual TLS."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
TOKEN_METADATA = "authorization"  # "Bearer TOKEN", as HTTP APIs send it


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token`."""
    return ((TOKEN_METADATA, f"Bearer {token}"),)


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Every RPC but health must carry the token, else UNAUTHENTICATED before any handler
    runs (so no request is read or queued)."""

    def __init__(self, token: str) -> None:
        self._digest = hashlib.sha256(token.encode()).digest()

    def _allowed(self, details: grpc.HandlerCallDetails) -> bool:
        if details.method.startswith(HEALTH_PREFIX):
            return True
        sent = dict(details.invocation_metadata or ()).get(TOKEN_METADATA, "")
        scheme, _, token = str(sent).partition(" ")
        digest = hashlib.sha256(token.strip().encode()).digest()
        return scheme.lower() == "bearer" and hmac.compare_digest(digest, self._digest)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or self._allowed(details):
            return handler

        async def deny(_: Any, context: grpc.aio.ServicerContext) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong engine token")

        kind = (
            ("stream" if handler.request_streaming else "unary")
            + "_"
            + ("stream" if handler.response_streaming else "unary")
        )
        factory = getattr(grpc, f"{kind}_rpc_method_handler")
        return factory(
            deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """TLS with the server's certificate; with `client_ca`, clients must present a
    certificate that CA signed (mutual TLS)."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca: Path, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS to an engine whose certificate `ca` signed; `cert`/`key`: this client's own."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
