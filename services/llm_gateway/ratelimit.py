"""Per-key limits: requests and tokens per minute, as OpenAI's API answers them.

Each limit is a GCRA (the generic cell rate algorithm, a token bucket kept as one number):
a key's bucket holds a minute's allowance, refills continuously at `limit` per minute, and
a request that does not fit is refused with 429, `Retry-After` (when it will fit) and the
limit's name. Every answer to a limited key carries OpenAI's headers,
`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` (reset: until the bucket is full
again, e.g. `1.5s`, `6m0s`).

- Requests: every API call but the probes and /metrics counts one, before its body is read.
- Tokens: a generation holds its prompt's tokens plus `max_tokens` for each choice (no
  `max_tokens`: the rest of the context) when it starts; a text prompt's tokens are
  estimated as its UTF-8 bytes / 4, token ids count exactly. When it ends the key is
  charged its real usage instead: the difference is returned (or taken). A request that
  fails before its answer starts gives everything back; a stream cut short keeps what it
  held (its usage is not known).

The counts live in a `Backend`: `MemoryBackend` in this process (each gateway replica then
counts alone, so N replicas admit up to N times a limit), or `RedisBackend`, where every
replica sharing one Redis counts together (an atomic Lua script, Redis's clock). When Redis
cannot be reached the replica counts in memory until it can (logged), rather than failing
requests. Keys are named in the backend by a hash, never in the clear.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request

from llm_common.proto.v1 import engine_pb2 as pb
from llm_gateway.errors import OpenAIError
from llm_gateway.responses import Generation
from llm_gateway.schemas import EngineCall
from llm_gateway.settings import GatewaySettings, KeyLimits

log = logging.getLogger(__name__)

PERIOD_S = 60.0  # limits are per minute
BYTES_PER_TOKEN = 4  # a text prompt's estimated tokens: its UTF-8 bytes / 4
_EPSILON = 1e-6


@dataclass(frozen=True)
class Verdict:
    """One take from one limit."""

    limit: int
    remaining: int  # what the bucket still holds afterwards
    reset_s: float  # until it is full again
    retry_after_s: float | None = None  # refused: when the cost fits (inf: never)

    @property
    def allowed(self) -> bool:
        return self.retry_after_s is None


class Backend(Protocol):
    async def take(self, name: str, interval_s: float, cost: float, force: bool) -> tuple[bool, float, float]:  # fmt: skip
        """GCRA on bucket `name`: `cost` units at one unit per `interval_s`, the bucket
        holding `PERIOD_S` of them. Returns (taken, level_s, retry_s): level_s is how far
        the bucket is from full afterwards (in seconds of refill); retry_s, when refused,
        is when the cost would fit. `force` takes it anyway (a settlement; negative cost
        gives back, never below full)."""
        ...

    async def close(self) -> None: ...


class MemoryBackend:
    """The counts in this process: each gateway replica limits alone."""

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}  # when each bucket is full again (monotonic clock)

    async def take(self, name: str, interval_s: float, cost: float, force: bool) -> tuple[bool, float, float]:  # fmt: skip
        now = time.monotonic()
        tat = max(self._tat.get(name, now), now)
        new = tat + cost * interval_s
        if not force and new - now > PERIOD_S + _EPSILON:
            return False, tat - now, new - PERIOD_S - now
        self._tat[name] = max(new, now)
        return True, max(new, now) - now, 0.0

    async def close(self) -> None:
        pass


# KEYS[1]: the bucket; ARGV: interval_s, cost, period_s, force (1/0). Redis's own clock, so
# replicas with skewed clocks agree. Numbers go back as strings (Lua numbers would be cut
# to integers). The key expires once the bucket is full again.
_GCRA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval, cost, period = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new = tat + cost * interval
if ARGV[4] ~= '1' and new - now > period + 0.000001 then
  return {0, tostring(tat - now), tostring(new - period - now)}
end
if new < now then new = now end
redis.call('SET', KEYS[1], string.format('%.6f', new), 'PX', math.ceil((new - now) * 1000) + 1000)
return {1, tostring(new - now), '0'}
"""


class RedisBackend:
    """The counts in Redis, shared by every gateway replica that uses it. If Redis fails,
    this replica counts in memory for `fallback_s` before trying Redis again."""

    def __init__(self, url: str, prefix: str = "llm-gateway:ratelimit:", timeout_s: float = 1.0,
                 fallback_s: float = 5.0) -> None:  # fmt: skip
        import redis.asyncio

        self.client = redis.asyncio.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        self.script = self.client.register_script(_GCRA)
        self.prefix, self.fallback_s = prefix, fallback_s
        self.memory = MemoryBackend()
        self._down_until = 0.0

    async def take(self, name: str, interval_s: float, cost: float, force: bool) -> tuple[bool, float, float]:  # fmt: skip
        from redis.exceptions import RedisError

        if time.monotonic() >= self._down_until:
            try:
                args = [repr(interval_s), repr(cost), repr(PERIOD_S), "1" if force else "0"]
                taken, level, retry = await self.script(keys=[self.prefix + name], args=args)
                return bool(int(taken)), float(level), float(retry)
            except (TimeoutError, RedisError, OSError) as e:
                self._down_until = time.monotonic() + self.fallback_s
                log.warning("rate_limit_redis_unavailable", extra={"error": str(e),
                            "fallback_s": self.fallback_s})  # fmt: skip
        return await self.memory.take(name, interval_s, cost, force)

    async def close(self) -> None:
        await self.client.aclose()


class RateLimiter:
    """The gateway's limits: the defaults, each key's own, and where they are counted."""

    def __init__(self, backend: Backend, defaults: KeyLimits | None = None) -> None:
        self.backend, self.defaults = backend, defaults or KeyLimits()

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> RateLimiter:
        url = settings.rate_limit_redis_url
        backend = RedisBackend(url.get_secret_value()) if url else MemoryBackend()
        return cls(backend, KeyLimits(settings.rate_limit_rpm, settings.rate_limit_tpm))

    def budget(self, key_digest: bytes | None, own: KeyLimits | None) -> Budget | None:
        """A request's budget under the key's limits (its own, else the defaults), or None
        when neither limit applies. `key_digest` None: no keys are configured, and every
        caller shares one budget."""
        own = own or KeyLimits()
        rpm = own.rpm if own.rpm is not None else self.defaults.rpm
        tpm = own.tpm if own.tpm is not None else self.defaults.tpm
        if not rpm and not tpm:
            return None
        name = key_digest.hex()[:32] if key_digest is not None else "anonymous"
        return Budget(self, name, rpm or None, tpm or None)

    async def take(self, bucket: str, limit: int, cost: float, force: bool = False) -> Verdict:
        interval = PERIOD_S / limit
        taken, level, retry = await self.backend.take(bucket, interval, cost, force)
        remaining = max(int((PERIOD_S - level) / interval + _EPSILON), 0)
        if taken:
            return Verdict(limit, remaining, level)
        return Verdict(limit, remaining, level, retry if cost <= limit else math.inf)

    async def close(self) -> None:
        await self.backend.close()


@dataclass(eq=False)
class Budget:
    """One request's standing with its key's limits, and the tokens it holds."""

    limiter: RateLimiter
    name: str  # the key's bucket name (a hash)
    rpm: int | None
    tpm: int | None
    requests: Verdict | None = None
    tokens: Verdict | None = None
    held: int = 0  # tokens taken when the generation started, until settled
    generation: Generation | None = field(default=None, repr=False)

    async def take_request(self) -> OpenAIError | None:
        """Count this request; the 429 to answer when the key is over its limit."""
        if self.rpm is None:
            return None
        self.requests = await self.limiter.take(self._bucket("requests", self.rpm), self.rpm, 1)
        return None if self.requests.allowed else _refusal("requests", self.requests, 1)

    async def hold_tokens(self, tokens: int, generation: Generation) -> None:
        """Hold `tokens` for a generation about to start; raises the 429 when they do not
        fit in the key's tokens per minute."""
        if self.tpm is None:
            return
        self.tokens = await self.limiter.take(self._bucket("tokens", self.tpm), self.tpm, tokens)
        if not self.tokens.allowed:
            raise _refusal("tokens", self.tokens, tokens)
        self.held, self.generation = tokens, generation

    async def settle(self, status: int) -> None:
        """Once the answer is sent: charge the generation's real usage in place of what it
        held, give everything back if it failed before its answer started, keep what it
        held if it was cut short."""
        if not self.held:
            return
        g = self.generation
        if g is not None and g.choices and all(c.finish_reason for c in g.choices):
            used = g.prompt_tokens + g.completion_tokens
        elif status >= 400:
            used = 0
        else:
            return
        if used != self.held and self.tpm is not None:
            await self.limiter.take(
                self._bucket("tokens", self.tpm), self.tpm, used - self.held, True
            )
        self.held = 0

    def _bucket(self, kind: str, limit: int) -> str:
        # Per limit: a key whose limit changes starts with a full bucket.
        return f"{kind}:{limit}:{self.name}"

    def headers(self) -> list[tuple[bytes, bytes]]:
        """OpenAI's x-ratelimit-* headers of the limits this request was counted against."""
        out = []
        for kind, verdict in (("requests", self.requests), ("tokens", self.tokens)):
            if verdict is not None:
                out += [
                    (f"x-ratelimit-limit-{kind}".encode(), str(verdict.limit).encode()),
                    (f"x-ratelimit-remaining-{kind}".encode(), str(verdict.remaining).encode()),
                    (f"x-ratelimit-reset-{kind}".encode(), duration(verdict.reset_s).encode()),
                ]
        return out


def _refusal(kind: str, verdict: Verdict, cost: int) -> OpenAIError:
    per_minute = f"{kind} per minute ({'RPM' if kind == 'requests' else 'TPM'})"
    if math.isinf(verdict.retry_after_s or 0):  # more than the bucket ever holds
        return OpenAIError(
            429, f"Request too large for {per_minute}: limit {verdict.limit}, requested {cost}"
            + ("; lower max_tokens or the prompt" if kind == "tokens" else ""),
            type=kind, code="rate_limit_exceeded",
        )  # fmt: skip
    wait = verdict.retry_after_s or 0.0
    return OpenAIError(
        429, f"Rate limit reached for {per_minute}: limit {verdict.limit}, requested {cost}, "
        f"remaining {verdict.remaining}. Please try again in {duration(wait)}.",
        type=kind, code="rate_limit_exceeded",
        headers={"Retry-After": str(max(math.ceil(wait), 1)),
                 "retry-after-ms": str(max(math.ceil(wait * 1000), 1))},
    )  # fmt: skip


def duration(seconds: float) -> str:
    """Go's time.Duration format, as OpenAI's reset headers: 20ms, 1.5s, 6m0s."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    secs = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{secs}s" if minutes else f"{secs}s"


def prompt_tokens(request: pb.GenerateRequest) -> int:
    """A generation's prompt tokens: exact for token ids, else estimated from UTF-8 bytes."""
    kind = request.WhichOneof("input")
    if kind == "token_ids":
        return len(request.token_ids.ids)
    texts = [request.text] if kind == "text" else [m.content for m in request.chat.messages]
    return math.ceil(sum(len(t.encode()) for t in texts) / BYTES_PER_TOKEN)


def tokens_to_hold(calls: list[EngineCall], info: pb.ModelInfoResponse) -> int:
    """Prompt tokens once per prompt (as usage counts them) plus each choice's max_tokens
    (unset: what the context leaves)."""
    prompts: dict[int, int] = {}
    total = 0
    for call in calls:
        prompt = prompts.setdefault(call.prompt_index, prompt_tokens(call.request))
        stopping = call.request.stopping
        total += (
            stopping.max_tokens
            if stopping.HasField("max_tokens")
            else max(info.context_length - prompt, 1)
        )
    return total + sum(prompts.values())


async def hold_tokens(
    request: Request, g: Generation, calls: list[EngineCall], info: pb.ModelInfoResponse
) -> None:
    """Hold the request's tokens under its key's tokens per minute (the 429 when they do
    not fit); the middleware settles them when the answer has been sent."""
    budget: Any = getattr(request.state, "rate_limit", None)
    if budget is not None:
        await budget.hold_tokens(tokens_to_hold(calls, info), g)
