"""The step scheduler: decides what one engine step computes; runs nothing (vLLM v1's
`Scheduler` and its `SchedulerOutput`).

Requests hold a KV-cache slot from admission to their end. Each `schedule()` plans:

1. the prefix-cache copies of requests just admitted (`PrefixCache`);
2. one decode token for every request whose prompt is in the cache, in slot order;
3. prompt chunks of the requests still prefilling, oldest first, several requests per step,
   at most `prefill_chunk` prompt tokens in all, so a burst of prompts is prefilled in one
   model call while running streams keep flowing;
4. except for a request that shares a prefix with an older one still computing it: it
   waits (a step at most, since the older one's chunks come first anyway) and then gets
   the prefix as a copy, instead of computing the same tokens beside it (a burst of
   prompts with one long system prompt or document computes it once). It waits only when
   that saves at least half of what it has left to compute.

The runner executes the plan; `prefilled` and `sampled` then move each request on, free
the slots of finished ones and index the blocks their caches now hold. Nothing here
touches a tensor, so the policy is tested without a model.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Collection
from dataclasses import dataclass, field

from llm.inference.grammar import Matcher
from llm.inference.prefix_cache import Placement, PrefixCache
from llm.inference.sampling import SamplingParams


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
    min_tokens: int = 0  # stop tokens are not sampled, nor stop, before this many new tokens
    grammar: Matcher | None = None  # constrains every new token (structured outputs)
    adapter: int = 0  # the LoRA adapter index its rows use (`llm.core.multi_lora`); 0: the base
    slot: int = -1
    prefilled: int = 0  # prompt tokens in the cache (computed, or reused from the prefix cache)
    cached: int = 0  # of those, reused from the prefix cache
    generated: int = 0
    output_ids: list[int] = field(default_factory=list)  # the tokens generated so far
    seed: int | None = None  # the seed sampling uses (set at admission)
    prompt_scores: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)


@dataclass(frozen=True)
class CacheCopy:
    src: int  # slot holding the prefix
    dst: int  # slot of the request reusing it
    length: int  # positions [0, length) are copied


@dataclass(frozen=True)
class PrefillChunk:
    request: Request
    start: int  # first prompt position of the chunk
    length: int  # prompt tokens in the chunk

    @property
    def last(self) -> bool:
        """The chunk ends the prompt: its last logits give the first new token."""
        return self.start + self.length == len(self.request.prompt_ids)


@dataclass
class SchedulerOutput:
    """One step, decided; the runner executes it in field order."""

    copies: list[CacheCopy] = field(default_factory=list)  # reused prefixes, copied first
    prefills: list[PrefillChunk] = field(default_factory=list)  # several requests' chunks
    decodes: list[Request] = field(default_factory=list)  # one token each, by slot

    def __bool__(self) -> bool:
        return bool(self.copies or self.prefills or self.decodes)


class StepScheduler:
    def __init__(
        self,
        n_slots: int,
        max_seq_len: int,
        prefill_chunk: int = 512,
        *,
        block_size: int = 16,
        prefix_caching: bool = True,
    ) -> None:
        if n_slots < 1 or prefill_chunk < 1:
            raise ValueError(
                f"n_slots ({n_slots}) and prefill_chunk ({prefill_chunk}) must be >= 1"
            )
        self.n_slots, self.max_seq_len, self.prefill_chunk = n_slots, max_seq_len, prefill_chunk
        self.prefix_cache = PrefixCache(n_slots, block_size, enabled=prefix_caching)
        self._free = set(range(n_slots))
        self._prefilling: collections.deque[Request] = collections.deque()  # oldest first
        self._decoding: dict[int, Request] = {}  # slot -> request
        self._copies: list[CacheCopy] = []  # of requests admitted since the last step

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def active(self) -> int:
        return self.n_slots - len(self._free)

    def add(self, request: Request) -> None:
        """Give a request a slot (and whatever prefix of its prompt the cache holds); its
        prefill starts at the next step."""
        if not self._free:
            raise RuntimeError("no free slot: check free_slots before add()")
        budget = self.max_seq_len - len(request.prompt_ids)
        if not request.prompt_ids or budget < 1 or request.max_new_tokens < 0:
            raise ValueError(
                f"prompt_ids: {len(request.prompt_ids)} tokens with max_new_tokens="
                f"{request.max_new_tokens} do not fit a context of {self.max_seq_len}"
            )
        request.max_new_tokens = min(request.max_new_tokens, budget)
        width = 1 + max(set(range(self.n_slots)) - self._free, default=-1)  # of decode steps
        placement = self.prefix_cache.admit(
            request.prompt_ids, sorted(self._free), width,
            reuse=request.prompt_logprobs is None, adapter=request.adapter,
        )  # fmt: skip
        self.prefix_cache.assign(placement, request.prompt_ids, request.adapter)
        self._free.remove(placement.slot)
        request.slot, request.prefilled = placement.slot, placement.cached
        request.cached, request.generated = placement.cached, 0
        request.output_ids, request.prompt_scores = [], []
        if placement.copy_from is not None:
            self._copies.append(CacheCopy(placement.copy_from, placement.slot, placement.cached))
        self._prefilling.append(request)

    def cancel(self, request: Request) -> None:
        """Free the request's slot now (a cancelled or abandoned call)."""
        if request.slot < 0:
            return
        if request in self._prefilling:
            self._prefilling.remove(request)
        self._decoding.pop(request.slot, None)
        self.release(request)

    @property
    def running(self) -> list[Request]:
        """The requests holding slots."""
        return [*self._prefilling, *self._decoding.values()]

    def drop_adapter(self, adapter: int) -> None:
        """Forget the cached prefixes computed with an adapter index no request uses any
        more (it is unloaded; another adapter may take the index)."""
        self.prefix_cache.drop_adapter(adapter)

    def release(self, request: Request) -> None:
        self.prefix_cache.touch(request.slot)
        self._free.add(request.slot)
        request.slot = -1

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(copies=self._copies)
        self._copies = []
        out.decodes = [self._decoding[s] for s in sorted(self._decoding)]
        budget = self.prefill_chunk
        for i, request in enumerate(self._prefilling):
            if budget == 0:
                break
            if request.prefilled == request.cached and self._waits_for_prefix(request, i, out):
                continue
            n = min(budget, len(request.prompt_ids) - request.prefilled)
            out.prefills.append(PrefillChunk(request, request.prefilled, n))
            budget -= n
        return out

    def _waits_for_prefix(self, request: Request, position: int, out: SchedulerOutput) -> bool:
        """Whether a request that has computed nothing of its prompt yet waits this step
        for a prefix an older prefilling request is computing (module doc, item 4). When
        the cache holds a longer prefix than it was admitted with (computed since), the
        request gets a copy of it in `out` and does not wait."""
        if request.prompt_logprobs is not None or not self.prefix_cache.enabled:
            return False
        tokens, bs = request.prompt_ids, self.prefix_cache.block_size
        todo = len(tokens) - request.prefilled
        usable = (len(tokens) - 1) // bs * bs  # its last token is always computed
        for older in itertools.islice(self._prefilling, position):
            if older.adapter != request.adapter:
                continue
            shared = min(_common_blocks(tokens, older.prompt_ids, bs), usable)
            # Worth a step's wait when it saves at least half of what is left to compute.
            if shared - request.prefilled >= todo / 2 and older.prefilled < shared:
                return True
        found = self.prefix_cache.holder(tokens, request.adapter, exclude=request.slot)
        if found is not None and found[1] > request.prefilled:
            src, length = found
            placement = Placement(request.slot, length, src)
            self.prefix_cache.assign(placement, tokens, request.adapter)
            out.copies.append(CacheCopy(src, request.slot, length))
            request.prefilled = request.cached = length
        return False

    # -- after the runner ----------------------------------------------------------------

    def prefilled(self, chunk: PrefillChunk) -> None:
        """The chunk's KV is in the cache. A prompt that was only to be scored ends here."""
        request = chunk.request
        request.prefilled = chunk.start + chunk.length
        self.prefix_cache.extend(request.slot, request.prompt_ids, request.prefilled)
        if chunk.last:
            self._prefilling.remove(request)
            if request.max_new_tokens == 0:
                self.release(request)

    def sampled(self, request: Request, token_id: int) -> str | None:
        """Record a request's new token; returns its finish reason ("stop": a stop token,
        "length": max_new_tokens reached) after freeing its slot, or None."""
        request.generated += 1
        request.output_ids.append(token_id)
        reason = None
        if token_id in request.stop_token_ids and request.generated > request.min_tokens:
            reason = "stop"
        elif request.generated >= request.max_new_tokens:
            reason = "length"
        if reason is not None:
            self._decoding.pop(request.slot, None)
            self.release(request)
            return reason
        self._decoding[request.slot] = request
        # The cache holds the prompt and every generated token but this newest one.
        computed = len(request.prompt_ids) + request.generated - 1
        cache = self.prefix_cache
        if computed // cache.block_size > cache.cached_blocks(request.slot):
            cache.extend(request.slot, request.prompt_ids + request.output_ids, computed)
        return None


def _common_blocks(a: list[int], b: list[int], block_size: int) -> int:
    """Tokens in the full blocks two prompts share from their start."""
    n = 0
    while n + block_size <= min(len(a), len(b)) and a[n : n + block_size] == b[n : n + block_size]:
        n += block_size
    return n
