"""Continuous batching over a fixed pool of KV-cache slots (Orca, Yu et al. 2022).

`BatchGenerator` owns the model's cache, set up once as `n_slots` rows of the whole
context (`[layers][slots, kv_heads, max_len, head_dim]`, or MLA's latent), and a `Sampler`
holding every slot's parameters. Each `step()`:

1. prefills waiting prompts into their slots, at most `prefill_chunk` prompt tokens per
   step (a long prompt takes several steps, so running requests keep streaming);
2. runs one decode step over the slots that are generating: tokens (B, 1) at per-slot
   positions, B the smallest power of two covering the highest busy slot, attending over
   the first K cache positions, K the smallest power of two (>= 64) above every busy
   position, so the step has a handful of static shapes (compiled once each with
   `compile=True`) and its attention costs what the longest request needs, not the context;
3. samples every row at once with its own parameters, reads the tokens (and logprobs)
   back in one host transfer, and frees the slots of finished requests.

Slots are taken lowest first. A freed slot is not cleared: a new request's prefill
overwrites positions 0..P-1 and the causal mask hides everything past a row's position.
A decode step also runs the idle or still-prefilling slots below its width; their rows
write one entry at the slot's `pos`, kept at the next position a prefill chunk writes.
Requests are independent of each other: a row's logits do not depend on other rows, and
the sampling noise depends only on the request's seed and step.

On the CPU, decode steps and short prefill chunks compute their linear layers as `W @ x^T`
(`FewRowLinears`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from llm.inference.detokenize import IncrementalDecoder
from llm.inference.sampling import Sampler, SamplingParams
from llm.models.decoder import DecoderModel


@dataclass(eq=False)
class Request:
    """One generation: its inputs, and its progress once admitted."""

    prompt_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int  # prompt + new tokens fit in the context; 0: score the prompt only
    stop_token_ids: Collection[int] = frozenset()
    logprobs: bool = False  # report each token's logprob
    top_logprobs: int = 0  # and this many most likely alternatives
    prompt_logprobs: int | None = None  # score prompt tokens 1..P-1, with N alternatives
    slot: int = -1
    prefilled: int = 0  # prompt tokens already in the cache
    generated: int = 0
    seed: int | None = None  # the seed sampling uses (set at admission)
    prompt_scores: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


@dataclass(frozen=True)
class TokenEvent:
    request: Request
    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (a stop token) | "length"; the slot is freed
    # The request's first event only, when it asked for prompt_logprobs: (token, logprob,
    # alternatives) of prompt tokens 1..P-1. With max_new_tokens=0 that event has
    # token_id -1 (no token) and finish_reason "length".
    prompt_logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


class FewRowLinears(TorchFunctionMode):
    """`F.linear` over 2 to `max_rows` rows as `(W @ x^T)^T`, for float32 on the CPU.

    MKL's sgemm runs `x @ W^T` with few rows far below its peak: measured here (AVX2, 2
    threads) the product of 16 rows with a 2816x1024 weight takes 2.6-3.6 ms as `x @ W^T`
    and 1.1-1.4 ms as `W @ x^T`, 1.3-3.5x faster from 2 to 64 rows and 1.3x at 128, equal
    near 256 (long prefill chunks and training keep `F.linear`). One row stays too: a
    compiled single-stream decode step of a 200M model is ~8% slower as `W @ x^T`. Same
    products, summed in another order. The result is copied back to row-major (small next
    to the product): every op after a linear expects it, and SDPA's CPU flash kernel refused
    the transposed queries and fell back to its math path, 15x slower. Under
    `torch.compile` the mode is traced into the graph."""

    def __init__(self, max_rows: int = 128) -> None:
        super().__init__()
        self.max_rows = max_rows

    def __torch_function__(
        self, func: Callable, types: Collection[type], args: tuple = (), kwargs: dict | None = None
    ) -> object:
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // x.shape[-1]
            if 2 <= rows <= self.max_rows and x.dtype == weight.dtype == torch.float32:
                y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t())  # (out, rows)
                y = y.t().contiguous()  # (rows, out), row-major as F.linear's
                y = y.reshape(*x.shape[:-1], weight.shape[0])
                return y if bias is None else y + bias
        return func(*args, **kwargs)


def _bucket(n: int, limit: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least), capped at limit."""
    return min(limit, 1 << max(0, max(n, least) - 1).bit_length())


class BatchGenerator:
    def __init__(
        self,
        model: DecoderModel,
        n_slots: int,
        *,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        compile: bool = False,
    ) -> None:
        if n_slots < 1 or prefill_chunk < 1:
            raise ValueError(
                f"n_slots ({n_slots}) and prefill_chunk ({prefill_chunk}) must be >= 1"
            )
        self.model, self.n_slots, self.prefill_chunk = model, n_slots, prefill_chunk
        self.max_seq_len = max_seq_len or model.config.max_seq_len
        if model.cache_batch_size != n_slots or model.cache_max_seq_len != self.max_seq_len:
            model.setup_cache(n_slots, self.max_seq_len)
        self.device = model.embed_tokens.weight.device
        self.sampler = Sampler(n_slots, model.config.vocab_size, self.device)
        self.tokens = torch.zeros(n_slots, 1, dtype=torch.long, device=self.device)  # (S, 1)
        self.pos = torch.zeros(n_slots, 1, dtype=torch.long, device=self.device)  # (S, 1)
        self._free = list(range(n_slots))  # a heap would do; n_slots is small
        self._prefilling: collections.deque[Request] = collections.deque()
        self._decoding: dict[int, Request] = {}  # slot -> request
        self._decode: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor] = self._decode_step
        if compile:
            # One graph per (batch width, attended length) bucket: a few dozen at most.
            torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
            self._decode = torch.compile(self._decode_step, dynamic=False)

    # -- slots --------------------------------------------------------------------------

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def active(self) -> int:
        return self.n_slots - len(self._free)

    def add(self, request: Request) -> None:
        """Put a request into the lowest free slot; its prefill starts at the next step."""
        if not self._free:
            raise RuntimeError("no free slot: check free_slots before add()")
        budget = self.max_seq_len - len(request.prompt_ids)
        if not request.prompt_ids or budget < 1 or request.max_new_tokens < 0:
            raise ValueError(
                f"prompt_ids: {len(request.prompt_ids)} tokens with max_new_tokens="
                f"{request.max_new_tokens} do not fit a context of {self.max_seq_len}"
            )
        request.max_new_tokens = min(request.max_new_tokens, budget)
        self._free.sort()
        request.slot = self._free.pop(0)
        request.prefilled = request.generated = 0
        request.prompt_scores = []
        request.seed = self.sampler.assign(request.slot, request.sampling, request.prompt_ids)
        self.pos[request.slot] = 0  # see step(): decode steps write here until prefill is done
        self._prefilling.append(request)

    def cancel(self, request: Request) -> None:
        """Free the request's slot now (a cancelled or abandoned call)."""
        if request.slot < 0:
            return
        if request in self._prefilling:
            self._prefilling.remove(request)
        self._decoding.pop(request.slot, None)
        self._release(request)

    def detokenize(
        self, event: TokenEvent, decoder: IncrementalDecoder
    ) -> tuple[str | None, str | None]:
        """The text delta of `event`'s token and the request's finish reason, if it ends.

        A stop token has no text (None); a stop string, found by `decoder` across tokens,
        ends the request here and frees its slot at once.
        """
        if event.token_id in event.request.stop_token_ids:
            return None, "stop"
        delta = decoder.add([event.token_id])
        if decoder.stopped:
            if event.finish_reason is None:
                self.cancel(event.request)
            return delta, "stop"
        return delta, event.finish_reason

    def _release(self, request: Request) -> None:
        self.sampler.release(request.slot)
        self._free.append(request.slot)
        request.slot = -1

    # -- one iteration ---------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[TokenEvent]:
        """Prefill (a chunk of) waiting prompts, decode one token for every generating
        slot; returns the new tokens in slot order of their sampling."""
        events = []
        budget = self.prefill_chunk
        while budget > 0 and self._prefilling:
            request = self._prefilling[0]
            start = request.prefilled
            n = min(budget, len(request.prompt_ids) - start)
            ids = torch.tensor(request.prompt_ids[start : start + n], device=self.device)
            positions = torch.arange(start, start + n, device=self.device)
            rows = torch.tensor([request.slot], device=self.device)
            scoring = request.prompt_logprobs is not None
            logits = self._forward(
                ids[None],
                positions[None],
                cache_rows=rows,
                logits_to_keep=0 if scoring else 1,
                kv_len=start + n,
            )  # fmt: skip  (1, n or 1, V)
            if scoring:
                self._score_prompt(request, logits[0], start)
            request.prefilled += n
            budget -= n
            # A decode step over a range of slots also writes this slot's row, at `pos`:
            # point it at the next prompt position, which the next chunk overwrites.
            self.pos[request.slot] = request.prefilled
            if request.prefilled == len(request.prompt_ids):
                self._prefilling.popleft()
                if request.max_new_tokens == 0:
                    self._release(request)
                    events.append(TokenEvent(request, -1, None, [], "length", request.prompt_scores))  # fmt: skip
                else:
                    events += self._sample(logits[:, -1], [request], rows, advance=False)
        if self._decoding:
            slots = sorted(self._decoding)
            width = _bucket(slots[-1] + 1, self.n_slots)
            # This step's positions are prompt + generated - 1: attend below the longest.
            longest = max(len(r.prompt_ids) + r.generated for r in self._decoding.values())
            kv_len = _bucket(longest, self.max_seq_len, least=64)
            logits = self._decode(self.tokens[:width], self.pos[:width], kv_len)  # (width, V)
            rows = torch.tensor(slots, device=self.device)
            requests = [self._decoding[s] for s in slots]
            events += self._sample(logits[rows], requests, rows, advance=True)
        return events

    def _score_prompt(self, request: Request, logits: torch.Tensor, start: int) -> None:
        """Logprobs of the prompt tokens that logits (n, V) at positions start.. predict."""
        targets = request.prompt_ids[start + 1 : start + 1 + logits.shape[0]]
        if not targets:
            return  # the last position predicts the first new token, not a prompt token
        logprobs = torch.log_softmax(logits[: len(targets)].float(), dim=-1)  # (m, V)
        target = torch.tensor(targets, device=logprobs.device)
        chosen = logprobs.gather(-1, target[:, None])[:, 0].tolist()
        k = request.prompt_logprobs or 0
        top = logprobs.topk(k, dim=-1) if k else None
        ids = top.indices.tolist() if top is not None else [[]] * len(targets)
        values = top.values.tolist() if top is not None else [[]] * len(targets)
        for t, lp, i, v in zip(targets, chosen, ids, values, strict=True):
            request.prompt_scores.append((t, lp, list(zip(i, v, strict=True))))

    def _forward(self, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        if self.device.type != "cpu":
            return self.model(*args, **kwargs)
        with FewRowLinears():
            return self.model(*args, **kwargs)

    def _decode_step(self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        return self._forward(tokens, pos, kv_len=kv_len)[:, -1]  # (B, V)

    def _sample(
        self, logits: torch.Tensor, requests: list[Request], rows: torch.Tensor, *, advance: bool
    ) -> list[TokenEvent]:
        """Sample rows of `logits` (B, V), one per request (in slots `rows`, (B,)), and emit
        the tokens."""
        slots = [r.slot for r in requests]
        token = self.sampler(logits, rows, slots)  # (B,)
        self.sampler.record(token, rows, slots)
        self.tokens.index_copy_(0, rows, token[:, None])
        if advance:
            self.pos.index_add_(0, rows, torch.ones_like(rows)[:, None])
        n_top = max(r.top_logprobs for r in requests)
        if any(r.logprobs or r.top_logprobs for r in requests):
            logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V), the raw model's
            columns = [token.double(), logprobs.gather(-1, token[:, None])[:, 0].double()]
            if n_top:
                top = logprobs.topk(n_top, dim=-1)
                columns += [top.indices.double().T, top.values.double().T]
            host = torch.cat([c.reshape(-1, len(requests)) for c in columns]).T.tolist()
        else:
            host = [[t] for t in token.tolist()]  # the step's one host sync

        events = []
        for request, values in zip(requests, host, strict=True):
            token_id = int(values[0])
            request.generated += 1
            logprob = values[1] if request.logprobs or request.top_logprobs else None
            k = request.top_logprobs
            top = [
                (int(i), v)
                for i, v in zip(values[2 : 2 + k], values[2 + n_top : 2 + n_top + k], strict=True)
            ]
            reason = None
            if token_id in request.stop_token_ids:
                reason = "stop"
            elif request.generated >= request.max_new_tokens:
                reason = "length"
            if reason is None:
                self._decoding[request.slot] = request
            else:
                self._decoding.pop(request.slot, None)
                self._release(request)
            scores = request.prompt_scores if request.prompt_logprobs is not None else None
            first = scores if request.generated == 1 else None
            events.append(TokenEvent(request, token_id, logprob, top, reason, first))
        return events
