"""The model runner: executes one `SchedulerOutput` on the model and samples (vLLM v1's
`GPUModelRunner`, for any torch device).

The model's cache is set up once as `n_slots` rows of the whole context
(`[layers][slots, kv_heads, max_len, head_dim]`, or MLA's latent). A step runs, in order:

1. the prefix-cache copies (positions [0, n) of one slot into another);
2. the prompt chunks of every prefilling request in **one** model call: each chunk cut
   into rows of one length (`piece_length`: little padding whatever the mix of lengths),
   each row reading and writing its chunk's slot (`cache_rows`; a later row of a chunk
   attends to the earlier rows' keys, written in the same call, by position), the logits
   of one token per row. Only a chunk's last row is padded, past the chunk, where nothing
   is read before the request's own later tokens overwrite it. A request that scores its
   prompt runs alone, with the logits of every position;
3. one decode step over the slots [0, width) up to the highest generating one (or
   further, where warmup timed a wider step as faster: `tune_decode_widths`): tokens
   (width, 1) at per-slot positions, attending over the first `kv_len` cache positions,
   `kv_len` just above every generating position, so its attention costs what the longest
   request needs, not the context. Rows of slots that are not generating write one entry
   at their `pos`, the next position their prefill writes, or past everything a finished
   request left for the prefix cache;
4. sampling of every row that produced a token, with its own parameters, and one host
   transfer of the tokens (and logprobs).

`compile=True` compiles the decode and prefill calls with dynamic shapes (batch width,
chunk length, cache length), on the CPU with inductor's freezing, which packs the weights
for its GEMM kernels (the weights are then held twice). Calls have at least two rows (a
lone prompt chunk is cut in two; a decode step or a one-token chunk gets an extra row
that writes into a scratch cache row past the slots), so a single stream never needs graphs of its own; `warmup` compiles the rest (the
whole cache attended) before the first request, so none compiles mid-traffic. On the
CPU in float32, decode steps run the engine's own kernels (`llm.core.cpu_kernels`):
attention, and linear layers on weights packed when the runner is made (so the weights
must not change while it serves them); eager, short prefill chunks compute their
linear layers as `W @ x^T` (`FewRowLinears`).

With several LoRA adapters on the model (`llm.core.multi_lora`, `adapter_rows`), every
call also takes the adapter index of each of its rows, gathered from the index of each
slot's request: requests of different adapters and of the base share every call, and the
index tensor is one more input of the same compiled graphs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from llm.core import cpu_kernels
from llm.core.multi_lora import AdapterRows
from llm.inference.sampling import Sampler
from llm.inference.scheduler import PrefillChunk, Request, SchedulerOutput
from llm.models.decoder import DecoderModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampled:
    """A request's new token, or (token_id -1) the end of a prompt that was only scored."""

    request: Request
    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


class FewRowLinears(TorchFunctionMode):
    """`F.linear` over 2 to `max_rows` rows as `(W @ x^T)^T`, for float32 on the CPU.

    MKL's sgemm runs `x @ W^T` with few rows below its peak; `W @ x^T` is faster from 2 to
    about 128 rows (`docs/architecture.md` has the measurements); long prefill chunks and
    training keep `F.linear`, and so does one row (a compiled single-stream decode step is
    slower as `W @ x^T`). Same products, summed in another order. The result is copied
    back to row-major (small next to the product): every op after a linear expects it, and
    SDPA's CPU flash kernel refuses transposed queries and falls back to its math path.
    Under `torch.compile` the mode is traced into the graph."""

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


def _with_decode_linears(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn` run with the packed linear layers on `cpu_kernels.small_linear`."""

    def call(*args: object) -> torch.Tensor:
        with cpu_kernels.decode_linears():
            return fn(*args)

    return call


def _compiled(fn: Callable[..., torch.Tensor], cpu: bool) -> Callable[..., torch.Tensor]:
    """`fn` compiled with dynamic shapes. On the CPU with inductor's freezing, which treats
    the weights as constants and packs them for its GEMMs, and its C++ wrapper, which runs
    the whole graph without the GIL (the Python wrapper calls each kernel holding it, so
    the engine's gRPC thread and the model stalled each other; docs/benchmarks.md has the
    measurement). The flags
    must be set while each call runs (`torch.compile(options=...)` leaves the
    weight-packing passes off)."""
    compiled = torch.compile(fn, dynamic=True)

    def call(*args: object) -> torch.Tensor:
        with torch._inductor.config.patch(freezing=cpu, cpp_wrapper=cpu):
            return compiled(*args)

    return call


class ModelRunner:
    def __init__(
        self, model: DecoderModel, n_slots: int, max_seq_len: int, *, compile: bool = False,
        adapter_rows: AdapterRows | None = None,
    ) -> None:  # fmt: skip
        self.model, self.n_slots, self.max_seq_len = model, n_slots, max_seq_len
        self.scratch = n_slots  # the cache row that padding rows write to
        if model.cache_batch_size != n_slots + 1 or model.cache_max_seq_len != max_seq_len:
            model.setup_cache(n_slots + 1, max_seq_len)
        self.device = model.embed_tokens.weight.device
        self.sampler = Sampler(n_slots, model.config.vocab_size, self.device)
        self.tokens = torch.zeros(n_slots + 1, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(n_slots + 1, 1, dtype=torch.long, device=self.device)
        self.adapter_rows = adapter_rows
        self.adapter_of = torch.zeros(n_slots + 1, dtype=torch.long, device=self.device)  # slot's
        # On the CPU in float32, the decode step's own kernels (attention, and linears on
        # weights packed here: `llm.core.cpu_kernels`); torch's where they cannot build.
        self.packed = 0
        if self.device.type == "cpu" and model.embed_tokens.weight.dtype == torch.float32:
            self.packed = cpu_kernels.pack_linears(model)
        self.compiled = compile
        self.decode_width: dict[int, int] = {}  # a step's width -> the width run (tuned)
        self._set_calls(compile)

    def _set_calls(self, compile: bool) -> None:
        cpu = self.device.type == "cpu"
        decode = _compiled(self._decode_graph, cpu) if compile else self._decode_eager
        # Every decode call with the packed linears, warmup's too: compiled with the flag
        # it runs with.
        self._decode = _with_decode_linears(decode) if self.packed else decode
        self._prefill_call = _compiled(self._prefill_graph, cpu) if compile else self._prefill_eager

    def assign(self, request: Request) -> None:
        """Load an admitted request's sampling parameters into its slot."""
        request.seed = self.sampler.assign(request.slot, request.sampling, request.prompt_ids)
        self.sampler.constrain(request.slot, request.grammar)
        self.pos[request.slot] = request.prefilled  # idle decode rows write here (module doc)
        self.adapter_of[request.slot] = request.adapter

    def release(self, slot: int) -> None:
        self.sampler.release(slot)

    def warmup(self) -> None:
        """Compile every graph the calls need now, then (on the CPU) time the narrow decode
        widths (`tune_decode_widths`). A model or machine that cannot compile (no C++
        compiler for inductor's CPU kernels, say) runs eager, with a warning naming the
        error."""
        if self.compiled:
            try:
                self._compile_all()
            except Exception as e:  # inductor/dynamo raise many kinds: all mean "cannot compile"
                log.warning("compile failed, running eager: %s: %s", type(e).__name__, e)
                self.compiled = False
                self._set_calls(compile=False)
                self.pos.zero_()
        if self.device.type == "cpu":
            self.tune_decode_widths()

    @torch.inference_mode()
    def tune_decode_widths(self, widest: int = 6, repeats: int = 3) -> dict[int, float]:
        """Time a decode step at each width up to `widest` and run each narrower step at
        the fastest width at least as wide (`decode_width`); return the seconds per width.

        On the CPU a wider step can be the faster one: BLAS and oneDNN pick their kernel
        and how to split it over threads by the row count, and one row (eager, a
        single-threaded GEMV) or two (compiled, each thread reading every weight) can
        cost more than three (docs/benchmarks.md). The extra rows are slots that are not
        generating, which a step may already hold (module doc). Skipped for a model whose
        step takes over a second: its start would take longer than the tuning saves."""
        least = 2 if self.compiled else 1
        widest = min(widest, self.n_slots + 1)
        kv_len = min(64, self.max_seq_len)  # a length `_compile_all` compiled for
        saved = self.pos[:widest].clone()
        self.pos[:widest] = 0  # each row writes position 0, as an idle slot's row may
        seconds: dict[int, float] = {}
        try:
            for width in range(least, widest + 1):
                step = (self.tokens[:width], self.pos[:width], kv_len, self.adapter_of[:width])
                start = time.perf_counter()
                self._decode(*step)  # warm
                if time.perf_counter() - start > 1.0:
                    return seconds
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    self._decode(*step)
                    times.append(time.perf_counter() - start)
                seconds[width] = sorted(times)[len(times) // 2]
        finally:
            self.pos[:widest] = saved
        for width in range(1, widest + 1):
            wider = [w for w in seconds if w >= width]
            fastest = min(seconds[w] for w in wider)
            # The narrowest within 5% of the fastest: timing noise picks no wider step.
            self.decode_width[width] = min(w for w in wider if seconds[w] <= 1.05 * fastest)
        log.info(
            "decode_widths",
            extra={"ms": {w: round(1000 * t, 2) for w, t in seconds.items()},
                   "width": self.decode_width},
        )  # fmt: skip
        return seconds

    @torch.inference_mode()
    def _compile_all(self) -> None:
        # Sizes told apart (2 rows, 3 tokens): dynamo assumes sizes that are equal when it
        # traces always are, and would compile again for the first call where they differ.
        rows = torch.full((2,), self.scratch, device=self.device)
        ids = torch.zeros(2, 3, dtype=torch.long, device=self.device)
        for kv_len in dict.fromkeys((min(64, self.max_seq_len), self.max_seq_len)):
            self._decode(self.tokens[:2], self.pos[:2], kv_len, self.adapter_of[:2])
            positions = torch.arange(kv_len - 3, kv_len, device=self.device).repeat(2, 1)
            at = torch.full_like(rows, 2)
            self._prefill_call(ids, positions, rows, at, kv_len, self.adapter_of[rows])
        self.pos.zero_()

    @torch.inference_mode()
    def execute(self, plan: SchedulerOutput) -> list[Sampled]:
        for copy in plan.copies:
            self.model.copy_cache(copy.src, copy.dst, copy.length)
            self.pos[copy.dst] = copy.length  # an idle row of the slot writes past the copy
        sampled = []
        batched = [c for c in plan.prefills if c.request.prompt_logprobs is None]
        if batched:
            sampled += self._prefill(batched)
        for chunk in plan.prefills:
            if chunk.request.prompt_logprobs is not None:
                sampled += self._score(chunk)
        if plan.decodes:
            sampled += self._decode_all(plan.decodes)
        return sampled

    # -- the three kinds of model call ---------------------------------------------------

    def _prefill(self, chunks: list[PrefillChunk]) -> list[Sampled]:
        least = 2 if self.compiled else 1  # rows and tokens: see the module doc
        P = piece_length([c.length for c in chunks], least)
        last_pos = self.max_seq_len - 1  # padding past the context writes the last position
        ids, positions, slots, last, ends = [], [], [], [], []
        for c in chunks:
            tokens = c.request.prompt_ids[c.start : c.start + c.length]
            for off in range(0, c.length, P):  # only the chunk's last piece is padded
                piece = tokens[off : off + P]
                ids.append(piece + [0] * (P - len(piece)))
                positions.append([min(c.start + off + j, last_pos) for j in range(P)])
                slots.append(c.request.slot)
                last.append(len(piece) - 1)
            ends.append(len(ids) - 1)  # the row holding the chunk's last token
        if len(ids) < least:
            ids, positions = [*ids, [0] * P], [*positions, list(range(P))]
            slots, last = [*slots, self.scratch], [*last, 0]
        slot_rows = torch.tensor(slots, device=self.device)
        logits = self._prefill_call(
            torch.tensor(ids, device=self.device),
            torch.tensor(positions, device=self.device),
            slot_rows,
            torch.tensor(last, device=self.device),
            max(p[-1] for p in positions) + 1,
            self.adapter_of[slot_rows],
        )  # (R, V)
        rows = torch.tensor([c.request.slot for c in chunks], device=self.device)
        self.pos.index_copy_(
            0, rows, torch.tensor([[c.start + c.length] for c in chunks], device=self.device)
        )
        done = [i for i, c in enumerate(chunks) if c.last]
        if not done:
            return []
        index = torch.tensor(done, device=self.device)
        at = torch.tensor([ends[i] for i in done], device=self.device)
        return self._sample(logits[at], [chunks[i].request for i in done], rows[index], False)

    def _score(self, chunk: PrefillChunk) -> list[Sampled]:
        """A chunk of a prompt whose tokens are scored: all its positions' logits."""
        request, start, n = chunk.request, chunk.start, chunk.length
        ids = torch.tensor([request.prompt_ids[start : start + n]], device=self.device)
        positions = torch.arange(start, start + n, device=self.device)[None]
        rows = torch.tensor([request.slot], device=self.device)
        self._use_adapters(self.adapter_of[rows])
        logits = self._forward(ids, positions, cache_rows=rows, kv_len=start + n)  # (1, n, V)
        self._score_prompt(request, logits[0], start)
        self.pos[request.slot] = start + n
        if not chunk.last:
            return []
        if request.max_new_tokens == 0:
            return [Sampled(request, -1)]
        return self._sample(logits[:, -1], [request], rows, advance=False)

    def _decode_all(self, requests: list[Request]) -> list[Sampled]:
        width = requests[-1].slot + 1  # requests come in slot order
        if self.compiled:
            width = max(width, 2)  # the scratch row at worst: see the module doc
        width = self.decode_width.get(width, width)
        # This step's positions are prompt + generated - 1: attend below the longest.
        kv_len = max(len(r.prompt_ids) + r.generated for r in requests)
        logits = self._decode(
            self.tokens[:width], self.pos[:width], kv_len, self.adapter_of[:width]
        )  # (width, V)
        rows = torch.tensor([r.slot for r in requests], device=self.device)
        return self._sample(logits[rows], requests, rows, advance=True)

    def _forward(self, *args: torch.Tensor, **kwargs: object) -> torch.Tensor:
        if self.device.type != "cpu":
            return self.model(*args, **kwargs)
        with FewRowLinears():
            return self.model(*args, **kwargs)

    def _use_adapters(self, adapters: torch.Tensor) -> None:
        """The adapter index (B,) of each row of the next model call (module doc)."""
        if self.adapter_rows is not None:
            self.adapter_rows.ids = adapters

    def _decode_eager(
        self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int, adapters: torch.Tensor
    ) -> torch.Tensor:
        self._use_adapters(adapters)
        return self._forward(tokens, pos, kv_len=kv_len)[:, -1]  # (B, V)

    def _decode_graph(
        self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int, adapters: torch.Tensor
    ) -> torch.Tensor:
        # Compiled: inductor's packed GEMMs beat `FewRowLinears` at every width.
        self._use_adapters(adapters)
        return self.model(tokens, pos, kv_len=kv_len)[:, -1]  # (B, V)

    def _prefill_eager(
        self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, at: torch.Tensor,
        kv_len: int, adapters: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        self._use_adapters(adapters)
        return self._forward(ids, pos, cache_rows=rows, logits_at=at, kv_len=kv_len)[:, 0]

    def _prefill_graph(
        self, ids: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, at: torch.Tensor,
        kv_len: int, adapters: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        self._use_adapters(adapters)
        return self.model(ids, pos, cache_rows=rows, logits_at=at, kv_len=kv_len)[:, 0]

    # -- sampling --------------------------------------------------------------------------

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

    def _sample(
        self, logits: torch.Tensor, requests: list[Request], rows: torch.Tensor, advance: bool
    ) -> list[Sampled]:
        """Sample rows of `logits` (B, V), one per request (in slots `rows`, (B,)); the
        tokens become the slots' next decode inputs (`advance`: after a decode step)."""
        slots = [r.slot for r in requests]
        token = self.sampler(_without_early_stops(logits, requests), rows, slots)  # (B,)
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
        self.sampler.accept([int(values[0]) for values in host], slots)

        out = []
        for request, values in zip(requests, host, strict=True):
            k = request.top_logprobs
            top = [
                (int(i), v)
                for i, v in zip(values[2 : 2 + k], values[2 + n_top : 2 + n_top + k], strict=True)
            ]
            logprob = values[1] if request.logprobs or request.top_logprobs else None
            out.append(Sampled(request, int(values[0]), logprob, top))
        return out


def piece_length(lengths: list[int], least_rows: int = 1, waste: float = 0.125) -> int:
    """The row length of a prefill call over chunks of `lengths`: each chunk is cut into
    rows of this many tokens (its last row padded), the largest length whose padding
    costs at most `waste` of the tokens (a 32-token suffix after a cached prefix is not
    padded to the 512 tokens of a cold prompt in the same step), and short enough to
    make `least_rows` rows (a compiled call needs 2: two halves of one chunk cost nothing
    more, where a padding row would double the call), and at least `least_rows` tokens."""
    total, longest = sum(lengths), max(lengths)
    if len(lengths) < least_rows:
        return max(least_rows, -(-longest // least_rows))
    candidates, n = {max(length, least_rows) for length in lengths}, longest  # rows >= 2
    while n >= 16:
        candidates.add(n)
        n //= 2
    for n in sorted(candidates, reverse=True):
        if sum(-(-length // n) * n for length in lengths) <= (1 + waste) * total:
            return n
    return min(candidates)


def _without_early_stops(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """`logits` (B, V) with the stop tokens of requests still short of their `min_tokens`
    masked out (a copy; the logprobs reported stay the model's)."""
    early = [(b, r) for b, r in enumerate(requests) if r.generated < r.min_tokens]
    early = [(b, r) for b, r in early if r.stop_token_ids]
    if not early:
        return logits
    logits = logits.clone()
    for b, r in early:
        ids = torch.tensor(sorted(r.stop_token_ids), device=logits.device)
        logits[b, ids] = float("-inf")
    return logits
