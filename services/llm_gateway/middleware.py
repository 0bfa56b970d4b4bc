"""The one ASGI layer in front of the routes: trace span, metrics, access log, API keys,
per-key rate limits and the body size limit.

Pure ASGI (not `BaseHTTPMiddleware`): one function call per request, the span stays current
while the route and its streamed response run, and a stream is measured to its last byte.
API keys are checked here, before a body is read or parsed, so an unauthenticated caller
learns nothing from validation errors. Keys are compared as SHA-256 digests with
`hmac.compare_digest`: constant time, and the same length whatever the caller sends. The
key's requests per minute are counted here too (`llm_gateway.ratelimit`), its `Budget` is
left in the request's state for the route to hold tokens in, its `x-ratelimit-*` headers
go on the answer, and the tokens are settled once the answer has been sent.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Callable
from pathlib import Path

from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llm_gateway.errors import OpenAIError
from llm_gateway.lora import ADMIN_PATHS
from llm_gateway.ratelimit import Budget, RateLimiter
from llm_gateway.settings import KeyLimits
from llm_gateway.telemetry import REQUEST_SPAN, Metrics

log = logging.getLogger("llm_gateway.access")

# Probes and scrapes: no key, and access logs only at DEBUG.
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class BodyTooLarge(HTTPException):
    """Raised from `receive`; FastAPI re-raises HTTPExceptions from body reading, and the
    app's handler turns it into the OpenAI-shaped 413."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class _AsgiHeaders(Getter[list[tuple[bytes, bytes]]]):
    def get(self, carrier: list[tuple[bytes, bytes]], key: str) -> list[str] | None:
        name = key.encode()
        values = [v.decode("latin-1") for k, v in carrier if k.lower() == name]
        return values or None

    def keys(self, carrier: list[tuple[bytes, bytes]]) -> list[str]:
        return [k.decode("latin-1") for k, _ in carrier]


_GETTER = _AsgiHeaders()


def _header(scope: Scope, name: bytes) -> bytes | None:
    for k, v in scope["headers"]:
        if k == name:  # ASGI servers lower-case header names
            return v
    return None


class ApiKeys:
    """The accepted keys (as SHA-256 digests) and their own limits, from `load` (the
    settings' keys plus those of `file`), loaded again when the file changes, so a rotated
    Secret (or a key's new limits) takes effect within `check_s` without a restart. A file
    that cannot be read or parsed meanwhile (a Secret volume mid-swap) keeps the keys
    already loaded, with a warning."""

    def __init__(
        self, load: Callable[[], dict[str, KeyLimits]], file: Path | None = None,
        check_s: float = 2.0,
    ) -> None:  # fmt: skip
        self.load, self.file, self.check_s = load, file, check_s
        self._checked = 0.0
        self._digests = self._hashed()
        self._stamp = self._file_stamp()

    def _hashed(self) -> dict[bytes, KeyLimits]:
        return {hashlib.sha256(k.encode()).digest(): limits for k, limits in self.load().items()}

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.file.stat() if self.file else None
        except OSError:
            return None
        return None if st is None else (st.st_mtime_ns, st.st_size, st.st_ino)

    def digests(self) -> dict[bytes, KeyLimits]:
        now = time.monotonic()
        if self.file is not None and now - self._checked >= self.check_s:
            self._checked = now
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                try:
                    self._digests = self._hashed()
                except (OSError, ValueError) as e:
                    log.warning("api_keys_reload_failed", extra={"error": str(e)})
                else:
                    self._stamp = stamp
                    log.info("api_keys_reloaded", extra={"count": len(self._digests)})
        return self._digests


class GatewayMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: Metrics,
        tracer: trace.Tracer,
        api_keys: ApiKeys,
        max_body_bytes: int,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.app, self.metrics, self.tracer = app, metrics, tracer
        self.max_body_bytes = max_body_bytes
        self.api_keys = api_keys
        self.limiter = limiter

    def _authenticate(self, scope: Scope) -> tuple[OpenAIError | None, Budget | None]:
        """The 401 to answer, or the caller's rate-limit budget (None: not limited)."""
        digests = self.api_keys.digests()
        if scope["path"] in PUBLIC_PATHS or scope["path"] in ADMIN_PATHS:
            return None, None  # the admin routes check admin keys themselves
        if not digests:  # no keys: every caller shares the default limits
            return None, self.limiter.budget(None, None) if self.limiter else None
        header = _header(scope, b"authorization") or b""
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return OpenAIError(
                401, "missing API key: send it as 'Authorization: Bearer KEY'",
                code="missing_api_key", headers={"WWW-Authenticate": "Bearer"},
            ), None  # fmt: skip
        digest = hashlib.sha256(token.strip()).digest()
        # Every key is compared (no early exit), each in constant time.
        if not any([hmac.compare_digest(digest, k) for k in digests]):
            return OpenAIError(
                401, "invalid API key", code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            ), None  # fmt: skip
        return None, self.limiter.budget(digest, digests[digest]) if self.limiter else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        parent = propagate.extract(scope["headers"], getter=_GETTER)
        status = 500  # unless a response starts

        budget: Budget | None = None

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if budget is not None:
                    message["headers"] = [*message.get("headers", ()), *budget.headers()]
            await send(message)

        received = 0

        async def receive_limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(self.max_body_bytes)
            return message

        self.metrics.in_flight.inc()
        with self.tracer.start_as_current_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        ) as span:
            token = REQUEST_SPAN.set(span)
            early, budget = self._authenticate(scope)
            early = early or self._length_error(scope)
            try:
                if early is None and budget is not None:
                    early = await budget.take_request()
                scope.setdefault("state", {})["rate_limit"] = budget
                if early is not None:
                    await early.response()(scope, receive, send_status)
                else:
                    await self.app(scope, receive_limited, send_status)
            finally:
                if received > self.max_body_bytes or early is not None:
                    await _drain(receive)
                if budget is not None:
                    await budget.settle(status)
                self.metrics.in_flight.dec()
                REQUEST_SPAN.reset(token)
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                elapsed = time.perf_counter() - started
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                self.metrics.requests.labels(route, method, str(status)).inc()
                self.metrics.latency.labels(route).observe(elapsed)
                level = logging.DEBUG if path in PUBLIC_PATHS else logging.INFO
                if log.isEnabledFor(level):
                    extra = {"method": method, "route": route, "status": status,
                             "duration_ms": round(elapsed * 1000, 2)}  # fmt: skip
                    if "request_id" in scope.get("state", {}):
                        extra["request_id"] = scope["state"]["request_id"]
                    log.log(level, "http_request", extra=extra)

    def _length_error(self, scope: Scope) -> OpenAIError | None:
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return OpenAIError(
                413, f"the request body is larger than {self.max_body_bytes} bytes",
                code="request_too_large",
            )  # fmt: skip
        return None


async def _drain(receive: Receive, cap: int = 64 << 20) -> None:
    """Read what is left of a refused body (up to `cap` bytes): a server that closes a
    connection with unread input makes the kernel reset it, and the client then sees a
    broken connection instead of our 4xx."""
    drained = 0
    while drained <= cap:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
