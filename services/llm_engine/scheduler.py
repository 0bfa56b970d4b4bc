"""The scheduler thread: the only code that touches the model.

Requests wait in a bounded FIFO (full: `QueueFull`, which the servicer answers with
RESOURCE_EXHAUSTED) and are never dropped: each one ends with exactly one `Finished` or
`Failed` event, or is dropped silently only after its caller cancelled it. Each loop
iteration frees the slots of cancelled requests, admits waiting requests into free slots,
and runs one `BatchGenerator.step()`: a chunk of prefill, one batched decode token for
every generating slot. Text, stop strings and events are per request, on the host.

Events go back through `request.sink`, which must be thread-safe (the servicer uses
`loop.call_soon_threadsafe` into an `asyncio.Queue`).

With LoRA adapters (`AdapterSet`), a request names its adapter (`GenerationSpec.adapter`)
and gets its index at admission. `load_lora`/`unload_lora`, from any thread, read the
adapter there and change the served weights on the scheduler thread between two steps.
An unload drains, as vLLM's does (its frontend forgets the name at once while requests
already sent keep their adapter): requests waiting for the adapter fail as not found,
those running with it finish with it, and its slot is freed when the last one ends.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from llm.core.openmp import release_openmp_threads
from llm.data.tokenizers import BaseTokenizer
from llm.inference import BatchGenerator, IncrementalDecoder, Request, TokenEvent
from llm.inference.adapters import AdapterSet
from llm.inference.grammar import GrammarError, Matcher, grammar_tokenizer
from llm.models.decoder import DecoderModel
from llm_engine import metrics
from llm_engine.validation import GenerationSpec

log = logging.getLogger(__name__)

# Prompt ids decoded (never emitted) before the first new token, so a tokenizer that
# decodes a token differently after a space/word gets the first token's text right.
_CONTEXT_IDS = 4
T = TypeVar("T")


@dataclass(frozen=True)
class Token:
    token_id: int
    text: str  # UTF-8 safe delta; may be "" while text is held back
    logprob: float | None
    top: list[tuple[int, float]] = field(default_factory=list)  # most likely alternatives


@dataclass(frozen=True)
class PromptLogprobs:
    """Before the first token, when asked: prompt tokens 1..P-1 as (id, logprob, top)."""

    entries: list[tuple[int, float, list[tuple[int, float]]]]


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
    not_found: bool = False  # its LoRA adapter was unloaded while it waited


Event = Token | PromptLogprobs | Finished | Failed


@dataclass(eq=False)
class GenerationRequest:
    spec: GenerationSpec
    sink: Callable[[Event], None]
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    submitted_at: float = field(default_factory=time.monotonic)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    # Set by an engine core in another process (`llm_engine.core`): tells it of the cancel.
    _on_cancel: Callable[[], None] | None = field(default=None, repr=False)

    def cancel(self) -> None:
        """Thread-safe; the scheduler stops the request before its next token."""
        self._cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class QueueFull(Exception):
    pass


class AdapterError(Exception):
    """A LoRA adapter load or unload refused; `kind` says why: "disabled" (no LoRA
    serving), "not_found", "exists", "full", "invalid" (unreadable or unservable)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(kind, message)
        self.kind, self.message = kind, message

    def __str__(self) -> str:
        return self.message


@dataclass(eq=False)
class _Slot:
    request: GenerationRequest
    work: Request  # the BatchGenerator's view of it
    decoder: IncrementalDecoder
    started_at: float
    first_token_at: float | None = None
    last_token_at: float | None = None


class Scheduler:
    def __init__(
        self,
        model: DecoderModel,
        tokenizer: BaseTokenizer,
        *,
        max_queue: int = 64,
        n_slots: int = 8,
        prefill_chunk: int = 512,
        compile: bool = False,
        max_seq_len: int | None = None,
        adapters: AdapterSet | None = None,
    ) -> None:
        if max_queue < 1 or n_slots < 1:
            raise ValueError("max_queue and n_slots must be >= 1")
        self.model, self.tokenizer = model, tokenizer
        self.max_queue, self.n_slots = max_queue, n_slots
        self.batch = BatchGenerator(
            model, n_slots, max_seq_len=max_seq_len, prefill_chunk=prefill_chunk,
            compile=compile, adapters=adapters,
        )  # fmt: skip
        self.adapters = adapters
        self._controls: collections.deque[tuple[Callable[[], object], Future]] = (
            collections.deque()
        )  # run on the scheduler thread between steps
        self.batch.warmup()  # compiles now, not during the first requests
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._active: dict[int, _Slot] = {}  # id(work request) -> slot
        self._cond = threading.Condition()
        self._stopping = False
        self._grammar_vocab = None  # the grammar engine's view of the tokenizer, when needed
        # Where the metrics go (`llm_engine.metrics`; in an engine-core process a recorder
        # that ships them to the server process) and hooks that process sets: a request
        # took a slot; one loop iteration ended (its events are out: send them as one).
        self.metrics: Any = metrics
        self.on_admit: Callable[[GenerationRequest], None] | None = None
        self.on_iteration: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name="llm-scheduler", daemon=True)

    # -- called from other threads --------------------------------------------------------

    def start(self) -> None:
        # The model's thread shares the GIL with the gRPC server's event loop: a thread
        # that wants the GIL waits up to the switch interval for the other to yield it.
        # A shorter interval than Python's 5 ms keeps the step's Python between model calls
        # from waiting on the event loop (docs/benchmarks.md has the measurement).
        sys.setswitchinterval(min(sys.getswitchinterval(), 0.0005))
        self._thread.start()

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request, or raise `QueueFull` at once (never block the caller)."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(request)
            self.metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the running step, fail everything else as unavailable, join."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def lora_adapters(self) -> dict[str, str]:
        """name -> path of the LoRA adapters served (a copy; thread-safe enough to read)."""
        return dict(self.adapters.paths) if self.adapters is not None else {}

    def load_lora(self, name: str, path: str) -> None:
        """Serve one more adapter (PEFT directory, local or remote); blocks until done.
        Raises `AdapterError`."""
        from llm_engine.server import local_copy

        adapters = self._lora_set()
        if name in adapters.paths:
            raise AdapterError("exists", f"a LoRA adapter named {name!r} is already loaded")
        try:
            with local_copy(path) as directory:
                loras = adapters.read(name, directory)  # off the scheduler thread
        except (OSError, ValueError, KeyError, NotImplementedError) as e:
            raise AdapterError("invalid", f"cannot load LoRA adapter {name!r}: {e}") from None
        finally:
            # The caller's thread (a server's worker thread, kept for later calls) is done
            # with torch: OpenMP workers it started reading a large adapter would make the
            # scheduler thread's workers sleep between parallel regions (`llm.core.openmp`).
            release_openmp_threads()
        self._control(lambda: self._install(name, loras, path))
        log.info("lora_loaded", extra={"lora_name": name, "lora_path": path})

    def unload_lora(self, name: str) -> int:
        """Stop serving an adapter (between two steps; blocks until then): requests naming
        it are refused from now on, those waiting for it fail as not found, those running
        with it finish with it and its slot is freed when the last one ends. Returns how
        many still run with it. Raises `AdapterError`."""
        self._lora_set()
        running = self._control(lambda: self._uninstall(name))
        log.info("lora_unloaded", extra={"lora_name": name, "running_requests": running})
        return running

    def _lora_set(self) -> AdapterSet:
        if self.adapters is None:
            raise AdapterError("disabled", "this engine serves no LoRA adapters (--enable-lora)")
        return self.adapters

    def _control(self, fn: Callable[[], T]) -> T:
        done: Future[T] = Future()
        with self._cond:
            if self._stopping or not self._thread.is_alive():
                done.set_result(fn())  # no step runs: nothing to wait for
                return done.result()
            self._controls.append((fn, done))
            self._cond.notify()
        return done.result()

    def _install(self, name: str, loras: dict, path: str) -> None:
        adapters = self._lora_set()
        if name in adapters.paths:
            raise AdapterError("exists", f"a LoRA adapter named {name!r} is already loaded")
        if not adapters.free_indices:
            draining = len(adapters.retired)
            why = (f" ({draining} of them unloaded, their slots freed when the requests still "
                   "running with them end)" if draining else "")  # fmt: skip
            raise AdapterError("full", f"{adapters.max_loras} LoRA adapters are loaded "
                               f"already{why} (--max-loras); unload one first")  # fmt: skip
        adapters.install(name, loras, path)

    def _uninstall(self, name: str) -> int:
        adapters = self._lora_set()
        if name not in adapters.paths:
            raise AdapterError("not_found", f"no LoRA adapter named {name!r} is loaded")
        with self._cond:
            waiting = [r for r in self._waiting if r.spec.adapter == name]
            self._waiting = collections.deque(r for r in self._waiting if r.spec.adapter != name)
            self.metrics.QUEUE_DEPTH.set(len(self._waiting))
        for request in waiting:
            _emit(request, _unloaded(request))
        return self.batch.unload_adapter(name)

    def _run_controls(self) -> None:
        with self._cond:
            controls, self._controls = list(self._controls), collections.deque()
        for fn, done in controls:
            try:
                done.set_result(fn())
            except Exception as e:
                done.set_exception(e)

    @property
    def active_slots(self) -> int:
        return self.batch.active

    @property
    def kv_cache_usage(self) -> float:
        """The fraction of the cache's token positions (slots x context) that running
        requests fill: their prompts' cached tokens and the tokens generated so far."""
        context = self.batch.max_seq_len
        used = sum(min(s.work.prefilled + s.work.generated, context) for s in self._active.values())
        return used / (self.n_slots * context)

    # -- the scheduler thread ------------------------------------------------------------

    def _run(self) -> None:
        log.info("scheduler_started", extra={"max_queue": self.max_queue, "slots": self.n_slots})
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._active or self._controls):
                    self._cond.wait()
                if self._stopping:
                    break
                admitted = self._take_admissible()
                self.metrics.QUEUE_DEPTH.set(len(self._waiting))
            self._run_controls()
            for slot in [s for s in self._active.values() if s.request.cancelled]:
                self.batch.cancel(slot.work)
                self._free(slot, "cancelled")
            for request in admitted:
                self._admit(request)
            if self._active:
                self._step()
            self.metrics.ACTIVE_SLOTS.set(self.batch.active)
            self.metrics.KV_CACHE_USAGE.set(self.kv_cache_usage)
            if self.on_iteration is not None:
                self.on_iteration()
        self._fail_all("the engine is shutting down")
        self._run_controls()
        if self.on_iteration is not None:
            self.on_iteration()
        log.info("scheduler_stopped")

    def _take_admissible(self) -> list[GenerationRequest]:
        taken = []
        while self._waiting and self.batch.free_slots - len(taken) > 0:
            request = self._waiting.popleft()
            if request.cancelled:  # the caller left while it waited: nothing to run
                log.info(
                    "request_cancelled", extra={"request_id": request.request_id, "queued": True}
                )
                continue
            taken.append(request)
        return taken

    def _grammar(self, grammar: str) -> Matcher:
        if self._grammar_vocab is None:
            vocab, stops = self.model.config.vocab_size, self.tokenizer.stop_ids
            self._grammar_vocab = grammar_tokenizer(self.tokenizer, vocab, stops)
        return Matcher(self._grammar_vocab, grammar)

    def _admit(self, request: GenerationRequest) -> None:
        spec = request.spec
        try:
            grammar = self._grammar(spec.grammar) if spec.grammar is not None else None
        except GrammarError as e:  # validated already: a grammar the tokenizer cannot spell
            _emit(request, Failed(f"structured_output: {e}"))
            return
        adapter = 0
        if spec.adapter:
            try:
                adapter = self._lora_set().index(spec.adapter)
            except (AdapterError, KeyError):  # unloaded while it waited
                _emit(request, _unloaded(request))
                return
        work = Request(
            spec.prompt_ids,
            spec.sampling,
            spec.max_new_tokens,
            spec.stop_token_ids,
            logprobs=spec.logprobs,
            top_logprobs=spec.top_logprobs,
            prompt_logprobs=spec.prompt_logprobs,
            min_tokens=spec.min_tokens,
            grammar=grammar,
            adapter=adapter,
        )
        self.batch.add(work)
        decoder = IncrementalDecoder(
            self.tokenizer,
            stop=spec.stop,
            context_ids=spec.prompt_ids[-_CONTEXT_IDS:],
            include_stop=spec.include_stop,
            min_tokens=spec.min_tokens,
            skip_special_tokens=spec.skip_special_tokens,
            keep_special=spec.tool_call_tokens,
        )
        self._active[id(work)] = _Slot(request, work, decoder, time.monotonic())
        self.metrics.QUEUE_SECONDS.observe(time.monotonic() - request.submitted_at)
        if self.on_admit is not None:
            self.on_admit(request)
        log.debug("request_admitted", extra={"request_id": request.request_id, "slot": work.slot})

    def _step(self) -> None:
        # Prompt tokens computed, not copied from the prefix cache: prefilled - cached.
        prefilling = {id(s.work): s.work.prefilled - s.work.cached for s in self._active.values()}
        started = time.monotonic()
        try:
            events = self.batch.step()
        except Exception as e:  # a bug or OOM must fail the requests, not the engine
            log.exception("generation_failed")
            for slot in list(self._active.values()):
                self.batch.cancel(slot.work)
                self._free(slot, "error")
                _emit(slot.request, Failed(f"generation failed: {type(e).__name__}: {e}"))
            return
        elapsed = time.monotonic() - started
        prefilled = sum(
            s.work.prefilled - s.work.cached - prefilling.get(id(s.work), 0)
            for s in self._active.values()
        )
        decoded = sum(1 for e in events if e.request.generated > 1)
        if prefilled:
            self.metrics.PREFILL_TOKENS.inc(prefilled)
        if decoded:
            self.metrics.DECODE_TOKENS.inc(decoded)
        self.metrics.STEP_SECONDS.observe(elapsed)
        for event in events:
            self._on_token(self._active[id(event.request)], event)

    def _on_token(self, slot: _Slot, event: TokenEvent) -> None:
        now = time.monotonic()
        if slot.first_token_at is None:
            slot.first_token_at = now
            self.metrics.TIME_TO_FIRST_TOKEN.observe(now - slot.request.submitted_at)
        else:
            self.metrics.INTER_TOKEN_LATENCY.observe(now - (slot.last_token_at or now))
        slot.last_token_at = now
        if event.prompt_logprobs is not None:
            _emit(slot.request, PromptLogprobs(event.prompt_logprobs))
        token = event.token_id
        if token < 0:  # max_tokens=0: the prompt was only scored
            self._finish(slot, "length")
            return
        delta, reason = self.batch.detokenize(event, slot.decoder)
        if delta is None:  # a stop token
            self._finish(slot, "stop", stop_token=token)
            return
        _emit(slot.request, Token(token, delta, event.logprob, event.top))
        if reason is not None:
            self._finish(slot, reason)

    def _finish(self, slot: _Slot, reason: str, stop_token: int | None = None) -> None:
        self._free(slot, reason)
        # The stop token's text ends the output only when asked (and then only if it has
        # text: special tokens are skipped unless skip_special_tokens is off).
        last = (stop_token,) if stop_token is not None and slot.request.spec.include_stop else ()
        _emit(
            slot.request,
            Finished(
                reason=reason,
                text=slot.decoder.flush(last),
                token_ids=() if stop_token is None else (stop_token,),
                prompt_tokens=len(slot.request.spec.prompt_ids),
                completion_tokens=slot.work.generated,
            ),
        )

    def _free(self, slot: _Slot, reason: str) -> None:
        del self._active[id(slot.work)]
        request, now = slot.request, time.monotonic()
        self.metrics.REQUESTS.labels(reason).inc()
        log.info(
            "request_finished" if reason not in ("cancelled", "error") else f"request_{reason}",
            extra={
                "request_id": request.request_id,
                "finish_reason": reason,
                "prompt_tokens": len(request.spec.prompt_ids),
                "completion_tokens": slot.work.generated,
                "queue_s": round(slot.started_at - request.submitted_at, 4),
                "run_s": round(now - slot.started_at, 4),
            },
        )

    def _fail_all(self, message: str) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for slot in list(self._active.values()):
            self.batch.cancel(slot.work)
            self._free(slot, "error")
            # Not the refusal text: a gateway must not run it again elsewhere.
            _emit(slot.request, Failed("the engine stopped during the generation", True))
        for request in waiting:
            _emit(request, Failed(message, unavailable=True))
        self.metrics.QUEUE_DEPTH.set(0)
        self.metrics.ACTIVE_SLOTS.set(self.batch.active)
        self.metrics.KV_CACHE_USAGE.set(self.kv_cache_usage)


def _unloaded(request: GenerationRequest) -> Failed:
    """The failure of a request whose LoRA adapter was unloaded while it waited."""
    name = request.spec.adapter
    log.info("request_adapter_unloaded", extra={"request_id": request.request_id, "lora_name": name})  # fmt: skip
    return Failed(f"the model {name!r} does not exist: its LoRA adapter was unloaded while "
                  "the request waited", not_found=True)  # fmt: skip


def _emit(request: GenerationRequest, event: Event) -> None:
    # A broken sink (its event loop already closed) must not kill the scheduler thread.
    try:
        request.sink(event)
    except Exception:
        log.warning("event_dropped", extra={"request_id": request.request_id}, exc_info=True)
