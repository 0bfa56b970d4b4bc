"""The scheduler thread: the only code that touches the model.

Requests wait in a bounded FIFO (full: `QueueFull`, which the servicer answers with
RESOURCE_EXHAUSTED) and are never dropped: each one ends with exactly one `Finished` or
`Failed` event, or is dropped silently only after its caller cancelled it. Each loop
iteration admits waiting requests into free slots, advances every active slot by one
token, and frees slots that finished or whose caller cancelled.

There is one slot today (the model's cache has batch 1, so requests run one after the
other); continuous batching grows `n_slots` and replaces the per-slot `stream_generate`
with one batched decode step over all active slots, without changing this interface.

Events go back through `request.sink`, which must be thread-safe (the servicer uses
`loop.call_soon_threadsafe` into an `asyncio.Queue`).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from llm.data.tokenizers import BaseTokenizer
from llm.inference import IncrementalDecoder, stream_generate
from llm.models.decoder import DecoderModel
from llm_engine.validation import GenerationSpec

log = logging.getLogger(__name__)

# Prompt ids decoded (never emitted) before the first new token, so a tokenizer that
# decodes a token differently after a space/word gets the first token's text right.
_CONTEXT_IDS = 4


@dataclass(frozen=True)
class Token:
    token_id: int
    text: str  # UTF-8 safe delta; may be "" while text is held back
    logprob: float | None


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" | "length"
    text: str  # held-back text flushed at the end
    token_ids: tuple[int, ...]  # the stop token, if one ended the request (not decoded)
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str
    unavailable: bool = False  # the engine is shutting down (retryable elsewhere)


Event = Token | Finished | Failed


@dataclass(eq=False)
class GenerationRequest:
    spec: GenerationSpec
    sink: Callable[[Event], None]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    submitted_at: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Thread-safe; the scheduler stops the request before its next token."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class QueueFull(Exception):
    pass


@dataclass(eq=False)
class _Slot:
    request: GenerationRequest
    tokens: Iterator[tuple[int, float | None]]
    decoder: IncrementalDecoder
    started_at: float
    generated: int = 0


class Scheduler:
    def __init__(
        self,
        model: DecoderModel,
        tokenizer: BaseTokenizer,
        *,
        max_queue: int = 64,
        n_slots: int = 1,
    ) -> None:
        if max_queue < 1 or n_slots != 1:
            raise ValueError("max_queue must be >= 1 and n_slots must be 1 (batching: later)")
        self.model, self.tokenizer = model, tokenizer
        self.max_queue, self.n_slots = max_queue, n_slots
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._active: list[_Slot] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llm-scheduler", daemon=True)

    # -- called from other threads --------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request, or raise `QueueFull` at once (never block the caller)."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running token, fail everything else as unavailable, join."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    # -- the scheduler thread ------------------------------------------------------------

    def _run(self) -> None:
        log.info("scheduler_started", extra={"max_queue": self.max_queue, "slots": self.n_slots})
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._active):
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = self._take_admissible()
            for request in admitted:
                self._admit(request)
            for slot in list(self._active):
                self._step(slot)
        self._fail_all("the engine is shutting down")
        log.info("scheduler_stopped")

    def _take_admissible(self) -> list[GenerationRequest]:
        taken = []
        while self._waiting and len(self._active) + len(taken) < self.n_slots:
            request = self._waiting.popleft()
            if request.cancelled:  # the caller left while it waited: nothing to run
                log.info(
                    "request_cancelled", extra={"request_id": request.request_id, "queued": True}
                )
                continue
            taken.append(request)
        return taken

    def _admit(self, request: GenerationRequest) -> None:
        spec = request.spec
        tokens = stream_generate(
            self.model,
            spec.prompt_ids,
            max_new_tokens=spec.max_new_tokens,
            sampling=spec.sampling,
            stop_token_ids=spec.stop_token_ids,
            logprobs=spec.logprobs,
        )
        decoder = IncrementalDecoder(
            self.tokenizer, stop=spec.stop, context_ids=spec.prompt_ids[-_CONTEXT_IDS:]
        )
        self._active.append(_Slot(request, tokens, decoder, time.monotonic()))
        log.debug("request_admitted", extra={"request_id": request.request_id})

    def _step(self, slot: _Slot) -> None:
        request, spec = slot.request, slot.request.spec
        if request.cancelled:
            self._free(slot, "cancelled")
            return
        try:
            token, logprob = next(slot.tokens)  # prefill on the first call, then one decode
        except Exception as e:  # a bug or OOM must fail this request, not the engine
            log.exception("generation_failed", extra={"request_id": request.request_id})
            self._free(slot, "error")
            _emit(request, Failed(f"generation failed: {type(e).__name__}: {e}"))
            return
        slot.generated += 1
        if token in spec.stop_token_ids:
            self._finish(slot, "stop", stop_token=token)
            return
        _emit(request, Token(token, slot.decoder.add([token]), logprob))
        if slot.decoder.stopped:
            self._finish(slot, "stop")
        elif slot.generated >= spec.max_new_tokens:
            self._finish(slot, "length")

    def _finish(self, slot: _Slot, reason: str, stop_token: int | None = None) -> None:
        self._free(slot, reason)
        _emit(
            slot.request,
            Finished(
                reason=reason,
                text=slot.decoder.flush(),
                token_ids=() if stop_token is None else (stop_token,),
                prompt_tokens=len(slot.request.spec.prompt_ids),
                completion_tokens=slot.generated,
            ),
        )

    def _free(self, slot: _Slot, reason: str) -> None:
        self._active.remove(slot)
        slot.tokens.close()  # ends the generator (and its inference_mode) now
        request, now = slot.request, time.monotonic()
        log.info(
            "request_finished" if reason not in ("cancelled", "error") else f"request_{reason}",
            extra={
                "request_id": request.request_id,
                "finish_reason": reason,
                "prompt_tokens": len(request.spec.prompt_ids),
                "completion_tokens": slot.generated,
                "queue_s": round(slot.started_at - request.submitted_at, 4),
                "run_s": round(now - slot.started_at, 4),
            },
        )

    def _fail_all(self, message: str) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for slot in list(self._active):
            self._free(slot, "error")
            _emit(slot.request, Failed(message, unavailable=True))
        for request in waiting:
            _emit(request, Failed(message, unavailable=True))


def _emit(request: GenerationRequest, event: Event) -> None:
    # A broken sink (its event loop already closed) must not kill the scheduler thread.
    try:
        request.sink(event)
    except Exception:
        log.warning("event_dropped", extra={"request_id": request.request_id}, exc_info=True)
