"""The gateway's side of the engine's gRPC API: a pool of engines, least in flight first.

Each engine address has its own grpc.aio channel and a task that follows its standard
health service (`grpc.health.v1.Health/Watch` of `llm.engine.v1.Engine`): only SERVING
engines are picked, the one with the fewest of this gateway's calls in flight first
(generations are long and uneven, so round robin would queue behind a busy engine while
another idles). An engine without a health service counts as healthy while it answers.
`dns:///name:port` targets are resolved again every `resolve_interval_s`, so the pods
behind a headless Service come and go. No healthy engine: `NoEngine` (HTTP 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llm_common.proto import ENGINE_SERVICE, MAX_MESSAGE_BYTES
from llm_common.proto.v1 import engine_pb2 as pb
from llm_common.proto.v1 import engine_pb2_grpc as pb_grpc
from llm_common.security import bearer

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
# Reconnect soon after an engine restarts (gRPC's default backoff grows to 120 s).
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    # A long prompt's logprobs can exceed gRPC's default 4 MiB; the engine sends at most this.
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # HTTP/2 pings on idle and busy connections alike: an engine whose node vanished (or
    # that stopped answering) fails its health watch in keepalive + timeout seconds, not
    # at the next request's deadline (the engine server permits pings this often).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
KEEPALIVE_TIMEOUT_MS = 3000
# How long a request waits for the first health answers of a just-started gateway.
_FIRST_HEALTH_WAIT_S = 3.0
Metadata = Sequence[tuple[str, str]]


class NoEngine(Exception):
    """No engine is healthy (or none is configured)."""


class _TokenStub:
    """An EngineStub whose every call carries the engine token in its metadata."""

    def __init__(self, stub: pb_grpc.EngineStub, auth: Metadata) -> None:
        self._stub, self._auth = stub, tuple(auth)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        def call(*args: Any, metadata: Metadata | None = None, **kwargs: Any) -> Any:
            return method(*args, metadata=(*(metadata or ()), *self._auth), **kwargs)

        return call


@dataclass(eq=False)
class Endpoint:
    """One engine address: its channel, stub, health and this gateway's calls in flight."""

    address: str
    channel: grpc.aio.Channel
    stub: pb_grpc.EngineStub
    healthy: bool = False
    in_flight: int = 0
    reported: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task[None] | None = None
    mux: Multiplexer | None = None  # None: one Generate call per generation

    def set_healthy(self, healthy: bool) -> None:
        if healthy != self.healthy:
            log.info("engine_health", extra={"engine": self.address, "healthy": healthy})
        self.healthy = healthy
        self.reported.set()


def _dns_name(target: str) -> tuple[str, int] | None:
    """`dns:///name:port` (or `dns://authority/name:port`) -> (name, port); else None."""
    if not target.startswith("dns:"):
        return None
    rest = target.removeprefix("dns:").lstrip("/")
    if target.startswith("dns://") and not target.startswith("dns:///"):
        rest = rest.split("/", 1)[-1]  # an explicit DNS authority: we use the system resolver
    name, _, port = rest.rpartition(":")
    if not name or not port.isdigit():
        raise ValueError(f"engine target {target!r}: expected dns:///name:port")
    return name.strip("[]"), int(port)


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class EnginePool:
    def __init__(
        self,
        targets: Sequence[str],
        *,
        timeout_s: float = 600.0,
        model_info_ttl_s: float = 10.0,
        health_retry_s: float = 1.0,
        resolve_interval_s: float = 10.0,
        multiplex: bool = True,
        keepalive_s: float = 10.0,
        token: str | None = None,
        tls: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.targets = list(targets)
        self.multiplex, self.keepalive_s = multiplex, keepalive_s
        self.auth, self.tls = (bearer(token) if token else ()), tls
        for t in self.targets:
            _dns_name(t)  # raises on a malformed dns: target now, not at the first request
        self.timeout_s, self.model_info_ttl_s = timeout_s, model_info_ttl_s
        self.health_retry_s, self.resolve_interval_s = health_retry_s, resolve_interval_s
        self.endpoints: dict[str, Endpoint] = {}
        self._resolved: dict[str, set[str]] = {}  # dns: target -> its last addresses
        self._info: tuple[float, pb.ModelInfoResponse] | None = None
        self._info_lock: asyncio.Lock | None = None
        self._started: asyncio.Task[None] | None = None
        self._turn = 0  # rotates the order among equally busy engines
        self._resolver: asyncio.Task[None] | None = None

    # -- membership -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the channels and health watches (idempotent; grpc.aio objects belong to
        the event loop that creates them, so this runs inside the serving loop)."""
        if self._started is None:
            self._started = asyncio.ensure_future(self._start())
        await asyncio.shield(self._started)

    async def _start(self) -> None:
        await self._resolve()
        if any(_dns_name(t) for t in self.targets):
            self._resolver = asyncio.create_task(self._resolve_forever())

    async def _resolve(self) -> None:
        wanted: set[str] = set()
        loop = asyncio.get_running_loop()
        for target in self.targets:
            dns = _dns_name(target)
            if dns is None:
                wanted.add(target)
                continue
            try:
                infos = await loop.getaddrinfo(dns[0], dns[1], type=socket.SOCK_STREAM)
                self._resolved[target] = {_address(str(i[4][0]), dns[1]) for i in infos}
            except OSError as e:
                # Keep what the name resolved to before rather than dropping its engines.
                log.warning("engine_resolve_failed", extra={"target": target, "error": str(e)})
            wanted.update(self._resolved.get(target, ()))
        for address in sorted(wanted - self.endpoints.keys()):
            self._add(address)
        for address in sorted(self.endpoints.keys() - wanted):
            self._remove(address)

    async def _resolve_forever(self) -> None:
        while True:
            await asyncio.sleep(self.resolve_interval_s)
            await self._resolve()

    def _add(self, address: str) -> None:
        # grpc 1.85 times a keepalive ping out by ping_timeout_ms (60 s by default), not
        # keepalive_timeout_ms alone: both are set (measured: a frozen engine fails in 4 s).
        keepalive = [("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
                     ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
                     ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS)]  # fmt: skip
        options = [*_CHANNEL_OPTIONS, *keepalive]
        channel = (
            grpc.aio.secure_channel(address, self.tls, options=options)
            if self.tls
            else grpc.aio.insecure_channel(address, options=options)
        )
        stub = pb_grpc.EngineStub(channel)
        ep = Endpoint(address, channel, _TokenStub(stub, self.auth) if self.auth else stub)
        if self.multiplex:
            ep.mux = Multiplexer(ep.stub, address)
        ep.watcher = asyncio.create_task(self._watch(ep))
        self.endpoints[address] = ep
        log.info("engine_added", extra={"engine": address})

    def _remove(self, address: str) -> None:
        ep = self.endpoints.pop(address)
        if ep.watcher is not None:
            ep.watcher.cancel()
        if ep.mux is not None:
            ep.mux.closing = True  # its stream ends with its last generation
        # Calls in flight may finish within the request timeout, then the channel closes.
        close = asyncio.create_task(ep.channel.close(grace=self.timeout_s))
        close.add_done_callback(lambda _: None)
        log.info("engine_removed", extra={"engine": address})

    async def _watch(self, ep: Endpoint) -> None:
        """Follow the engine's health; any failure marks it unhealthy, then watch again."""
        health = health_pb2_grpc.HealthStub(ep.channel)
        request = health_pb2.HealthCheckRequest(service=ENGINE_SERVICE)
        while True:
            try:
                async for reply in health.Watch(request):
                    ep.set_healthy(reply.status == SERVING)
                ep.set_healthy(False)  # the stream ended: the engine is going away
            except grpc.aio.AioRpcError as e:
                # UNIMPLEMENTED: the server answers but has no health service.
                ep.set_healthy(e.code() == grpc.StatusCode.UNIMPLEMENTED)
            await asyncio.sleep(self.health_retry_s)

    async def close(self) -> None:
        if self._resolver is not None:
            self._resolver.cancel()
        for ep in self.endpoints.values():
            if ep.watcher is not None:
                ep.watcher.cancel()
            await ep.channel.close()
        self.endpoints.clear()
        self._started = None

    # -- picking ------------------------------------------------------------------------

    async def _healthy(self) -> list[Endpoint]:
        """The healthy engines; right after start-up, waits briefly for the first answers."""
        await self.start()
        healthy = [ep for ep in self.endpoints.values() if ep.healthy]
        if not healthy:
            pending = [ep.reported.wait() for ep in self.endpoints.values() if not ep.reported.is_set()]  # fmt: skip
            if pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.gather(*pending), _FIRST_HEALTH_WAIT_S)
                healthy = [ep for ep in self.endpoints.values() if ep.healthy]
        return healthy

    async def ready(self) -> bool:
        """True when at least one engine is SERVING."""
        return bool(await self._healthy())

    async def candidates(self) -> list[Endpoint]:
        """Healthy engines, fewest calls in flight first (ties take turns)."""
        healthy = await self._healthy()
        if not healthy:
            raise NoEngine("no engine is ready")
        self._turn += 1
        k = self._turn % len(healthy)
        return sorted(healthy[k:] + healthy[:k], key=lambda ep: ep.in_flight)  # stable

    # -- calls --------------------------------------------------------------------------

    async def model_info(self, metadata: Metadata = ()) -> pb.ModelInfoResponse:
        """ModelInfo of a healthy engine, cached for `model_info_ttl_s` (one call per TTL
        under concurrency; every engine behind one gateway serves the same model)."""
        if self._info_lock is None:
            self._info_lock = asyncio.Lock()
        async with self._info_lock:
            if self._info is not None and time.monotonic() - self._info[0] < self.model_info_ttl_s:
                return self._info[1]
            ep = (await self.candidates())[0]
            info = await ep.stub.ModelInfo(pb.ModelInfoRequest(), timeout=10.0, metadata=metadata)
            self._info = (time.monotonic(), info)
            return info

    async def on_every_engine(
        self, method: str, request: Any, timeout_s: float = 120.0
    ) -> list[Any]:
        """Run a unary Engine RPC (a LoRA load or unload) on every healthy engine, then
        forget the cached ModelInfo; the engines' answers. Raises the first engine's error."""
        healthy = await self._healthy()
        if not healthy:
            raise NoEngine("no engine is ready")
        try:
            return await asyncio.gather(
                *(getattr(ep.stub, method)(request, timeout=timeout_s) for ep in healthy)
            )
        finally:
            self._info = None

    async def unary(self, method: str, request: Any, metadata: Metadata, timeout_s: float) -> Any:
        """A unary Engine RPC (Tokenize, Detokenize) on the least busy healthy engine (every
        engine behind one gateway has the same tokenizer)."""
        ep = (await self.candidates())[0]
        return await getattr(ep.stub, method)(request, timeout=timeout_s, metadata=metadata)

    def lease(
        self, ep: Endpoint, request: pb.GenerateRequest, metadata: Metadata, timeout_s: float
    ) -> Lease:
        """Start a generation on `ep` (on its shared GenerateMany stream, or as a Generate
        call of its own), counted in flight until the lease is released."""
        call: Call
        if ep.mux is not None and not ep.mux.closing:
            call = ep.mux.generate(request, metadata, timeout_s)
        else:
            call = ep.stub.Generate(request, timeout=timeout_s, metadata=metadata)
        ep.in_flight += 1
        return Lease(ep, call)


class Call(Protocol):
    """What a lease reads: a Generate call, or one generation on a GenerateMany stream."""

    async def read(self) -> Any: ...  # a GenerateChunk, or grpc.aio.EOF at the end
    def cancel(self) -> bool: ...


@dataclass(eq=False)
class Lease:
    """One generation on one engine."""

    endpoint: Endpoint
    call: Call
    released: bool = False

    def release(self) -> None:
        """Idempotent. Cancelling is a no-op once the call finished; otherwise the engine
        frees the request's slot at its next token."""
        if not self.released:
            self.released = True
            self.endpoint.in_flight -= 1
            self.call.cancel()


_STATUS = {code.value[0]: code for code in grpc.StatusCode}


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


def _unsupported(e: grpc.aio.AioRpcError) -> bool:
    """The engine has no GenerateMany: an engine built before it (UNIMPLEMENTED), or a
    servicer that inherits the generated stub's "Method not implemented!" (UNKNOWN)."""
    code, details = e.code(), e.details() or ""
    return code == grpc.StatusCode.UNIMPLEMENTED or (
        code == grpc.StatusCode.UNKNOWN and "Method not implemented" in details
    )


class Multiplexer:
    """One `GenerateMany` stream to one engine, shared by every generation this gateway
    runs there: one gRPC message per engine step instead of one per token per request
    (each Python gRPC message costs CPU on both sides; see docs/benchmarks.md). Opened on first use and
    again after it breaks; a break fails the generations on it with UNAVAILABLE. An
    engine without GenerateMany (UNIMPLEMENTED) gets a Generate call per generation."""

    def __init__(self, stub: pb_grpc.EngineStub, address: str) -> None:
        self.stub, self.address = stub, address
        self.calls: dict[int, MuxCall] = {}
        self.closing = False
        self.supported = True
        self.probed = False
        self._ids = itertools.count(1)
        self._outbox: asyncio.Queue[pb.GenerateManyRequest] | None = None
        self._reader: asyncio.Task[None] | None = None

    def generate(self, request: pb.GenerateRequest, metadata: Metadata, timeout_s: float) -> Call:
        if not self.supported:
            return self.stub.Generate(request, timeout=timeout_s, metadata=metadata)
        if self._reader is None or self._reader.done():
            self._outbox = asyncio.Queue()
            self._reader = asyncio.create_task(self._read(self._outbox))
        assert self._outbox is not None
        call = MuxCall(self, next(self._ids), request, metadata, timeout_s)
        self.calls[call.id] = call
        self._outbox.put_nowait(
            pb.GenerateManyRequest(id=call.id, generate=request, metadata=dict(metadata))
        )
        return call

    def cancel(self, call: MuxCall) -> None:
        if self.calls.pop(call.id, None) is not None and self._outbox is not None:
            self._outbox.put_nowait(pb.GenerateManyRequest(id=call.id, cancel=True))

    async def _probe(self) -> grpc.aio.AioRpcError | None:
        """Whether the engine has GenerateMany: an empty stream, half-closed at once, ends
        OK there and UNIMPLEMENTED on an engine from before it (asked before any
        generation is written, so none is sent where it cannot run)."""
        probe = self.stub.GenerateMany()
        try:
            await probe.done_writing()
            async for _ in probe:
                pass
        except grpc.aio.AioRpcError as e:
            self._note_unsupported(e)
            return e
        self.probed = True
        return None

    def _note_unsupported(self, e: grpc.aio.AioRpcError) -> None:
        if _unsupported(e):  # an engine from before GenerateMany
            self.supported = False
            log.info("engine_without_generate_many", extra={"engine": self.address})

    def _fail_all(self, error: grpc.aio.AioRpcError) -> None:
        """The generations waiting here end with `error` (the next one opens a new stream)."""
        calls, self.calls = list(self.calls.values()), {}
        for call in calls:
            call.fail(error)

    async def _read(self, outbox: asyncio.Queue[pb.GenerateManyRequest]) -> None:
        if not self.probed and (error := await self._probe()) is not None:
            self._fail_all(error)
            return
        stream = self.stub.GenerateMany()

        async def write() -> None:  # grpc.aio takes one write at a time
            while True:
                await stream.write(await outbox.get())

        writer = asyncio.create_task(write())
        failure = _rpc_error(grpc.StatusCode.UNAVAILABLE, "the engine closed the stream")
        try:
            async for response in stream:
                for item in response.chunks:
                    if (call := self.calls.get(item.id)) is not None:
                        call.deliver(item)
                if self.closing and not self.calls:
                    break
        except grpc.aio.AioRpcError as e:
            self._note_unsupported(e)
            failure = e
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                # The transport's, not an engine's full queue (that refuses one generation,
                # on its own chunk): not a reason to try the same message on another engine.
                failure = _rpc_error(grpc.StatusCode.INTERNAL, f"engine stream: {e.details()}")
        finally:
            writer.cancel()
            stream.cancel()
            # Whatever ended the stream (the engine, the network, this task's cancel): the
            # generations on it end now.
            self._fail_all(failure)


class MuxCall:
    """One generation on a `Multiplexer`: reads like a Generate call (chunks, then EOF,
    or an `AioRpcError` with Generate's status), deadline included."""

    def __init__(
        self, mux: Multiplexer, id_: int, request: pb.GenerateRequest, metadata: Metadata,
        timeout_s: float,
    ) -> None:  # fmt: skip
        self.mux, self.id = mux, id_
        self._request, self._metadata = request, metadata
        self._deadline = time.monotonic() + timeout_s
        self._items: asyncio.Queue[pb.GenerateManyChunk | grpc.aio.AioRpcError | None] = (
            asyncio.Queue()
        )
        self._error: grpc.aio.AioRpcError | None = None
        self._ended = self._cancelled = False
        self._fallback: grpc.aio.UnaryStreamCall | None = None
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self._expire)

    def deliver(self, item: pb.GenerateManyChunk) -> None:
        self._items.put_nowait(item)

    def fail(self, error: grpc.aio.AioRpcError) -> None:
        self._items.put_nowait(error)

    def _expire(self) -> None:
        self.mux.cancel(self)
        self.fail(_rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))

    async def read(self) -> Any:
        if self._fallback is not None:
            return await self._fallback.read()
        if self._cancelled:  # as a cancelled grpc.aio call reads
            raise asyncio.CancelledError()
        if self._error is not None:
            raise self._error
        if self._ended:
            return grpc.aio.EOF
        item = await self._items.get()
        if item is None:  # cancelled while this read waited
            raise asyncio.CancelledError()
        if isinstance(item, grpc.aio.AioRpcError):
            if _unsupported(item):  # nothing ran: ask plainly
                self._timer.cancel()  # the Generate call has the deadline now
                remaining = max(self._deadline - time.monotonic(), 0.001)
                self._fallback = self.mux.stub.Generate(
                    self._request, timeout=remaining, metadata=self._metadata
                )
                return await self._fallback.read()
            self._finish(error=item)
            raise item
        if item.code:
            error = _rpc_error(_STATUS.get(item.code, grpc.StatusCode.UNKNOWN), item.message)
            self._finish(error=error)
            if not item.chunk.token_ids:
                raise error
        elif item.chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            self._finish()
        return item.chunk

    def _finish(self, error: grpc.aio.AioRpcError | None = None) -> None:
        self._error, self._ended = error, True
        self._timer.cancel()
        self.mux.calls.pop(self.id, None)

    def cancel(self) -> bool:
        self._timer.cancel()
        if self._fallback is not None:
            return self._fallback.cancel()
        if self._ended:
            return False
        self._ended = self._cancelled = True
        self.mux.cancel(self)
        self._items.put_nowait(None)  # wakes a read waiting for the next chunk
        return True
