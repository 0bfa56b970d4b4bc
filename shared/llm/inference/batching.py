"""Continuous batching over a fixed pool of KV-cache slots (Orca, Yu et al. 2022), with
chunked prefill of several requests per step and automatic prefix caching.

`BatchGenerator` is what callers use: `add` requests while `free_slots` allow, `step()`
until `active` is 0, `cancel` at any time. Each step is planned by the `StepScheduler`
(policy only: which prompt chunks, which decodes, which cached prefixes to copy) and run
by the `ModelRunner` (the model calls and sampling); this class moves the results
between the two and turns them into `TokenEvent`s.

Requests are independent of each other: a row's logits do not depend on other rows, and
the sampling noise depends only on the request's seed and step, so a request's tokens are
those it gets alone (up to float rounding of differently shaped matmuls).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llm.inference.adapters import AdapterSet
from llm.inference.detokenize import IncrementalDecoder
from llm.inference.runner import FewRowLinears, ModelRunner
from llm.inference.scheduler import Request, StepScheduler
from llm.models.decoder import DecoderModel

__all__ = ["BatchGenerator", "FewRowLinears", "Request", "TokenEvent"]


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


class BatchGenerator:
    def __init__(
        self,
        model: DecoderModel,
        n_slots: int,
        *,
        max_seq_len: int | None = None,
        prefill_chunk: int = 512,
        compile: bool = False,
        prefix_caching: bool = True,
        block_size: int = 16,
        adapters: AdapterSet | None = None,
    ) -> None:
        """`adapters`: LoRA adapters on the model (`AdapterSet`); a request picks one with
        `Request.adapter`, and requests of different adapters share every step."""
        self.model, self.n_slots, self.prefill_chunk = model, n_slots, prefill_chunk
        self.max_seq_len = max_seq_len or model.config.max_seq_len
        self.scheduler = StepScheduler(
            n_slots, self.max_seq_len, prefill_chunk, block_size=block_size,
            prefix_caching=prefix_caching,
        )  # fmt: skip
        self.adapters = adapters
        self.runner = ModelRunner(
            model, n_slots, self.max_seq_len, compile=compile,
            adapter_rows=adapters.rows if adapters is not None else None,
        )  # fmt: skip

    @property
    def free_slots(self) -> int:
        return self.scheduler.free_slots

    @property
    def active(self) -> int:
        return self.scheduler.active

    def add(self, request: Request) -> None:
        """Give a request a slot; its prefill starts at the next step."""
        self.scheduler.add(request)
        self.runner.assign(request)

    def cancel(self, request: Request) -> None:
        """Free the request's slot now (a cancelled or abandoned call)."""
        slot = request.slot
        self.scheduler.cancel(request)
        if slot >= 0:
            self.runner.release(slot)
        self._release_retired()

    def unload_adapter(self, name: str) -> int:
        """Stop serving a LoRA adapter (KeyError if none of that name is loaded): its name
        goes now, so no request added later can pick it, while the requests already running
        with it finish with it; its index, weights and cached prefixes are freed when the
        last of them ends. Returns how many still run with it (0: freed already)."""
        if self.adapters is None:
            raise KeyError(name)
        index = self.adapters.retire(name)
        running = sum(r.adapter == index for r in self.scheduler.running)
        self._release_retired()
        return running

    def _release_retired(self) -> None:
        """Free the unloaded adapters' indices that no running request uses any more."""
        if self.adapters is None or not self.adapters.retired:
            return
        for index in self.adapters.retired - {r.adapter for r in self.scheduler.running}:
            self.adapters.release(index)
            self.scheduler.drop_adapter(index)

    def warmup(self) -> None:
        """Compile what `compile=True` compiles before the first request."""
        self.runner.warmup()

    def detokenize(
        self, event: TokenEvent, decoder: IncrementalDecoder
    ) -> tuple[str | None, str | None]:
        """The text delta of `event`'s token and the request's finish reason, if it ends.

        A stop token that ends the request has no text (None; once past `min_tokens`); a
        stop string, found by `decoder` across tokens, ends the request here and frees its
        slot at once.
        """
        if event.finish_reason == "stop":  # the scheduler ends requests only at stop tokens
            return None, "stop"
        delta = decoder.add([event.token_id])
        if decoder.stopped:
            if event.finish_reason is None:
                self.cancel(event.request)
            return delta, "stop"
        return delta, event.finish_reason

    def step(self) -> list[TokenEvent]:
        """Run one planned step: prompt chunks of waiting requests and one decode token for
        every generating one; returns the new tokens."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        sampled = self.runner.execute(plan)
        for chunk in plan.prefills:
            slot = chunk.request.slot
            self.scheduler.prefilled(chunk)
            if chunk.request.slot < 0:  # a prompt that was only scored
                self.runner.release(slot)
        events = []
        for s in sampled:
            request = s.request
            if s.token_id < 0:
                events.append(TokenEvent(request, -1, None, [], "length", request.prompt_scores))
                continue
            slot = request.slot
            reason = self.scheduler.sampled(request, s.token_id)
            if reason is not None:
                self.runner.release(slot)
            scores = request.prompt_scores if request.prompt_logprobs is not None else None
            first = scores if request.generated == 1 else None
            events.append(TokenEvent(request, s.token_id, s.logprob, s.top, reason, first))
        self._release_retired()
        return events
