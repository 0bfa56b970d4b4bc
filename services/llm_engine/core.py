"""The engine core: the model and the `Scheduler` loop, in this process or its own.

Served, the scheduler thread (model steps, sampling, detokenizing) shared one GIL with the
grpc.aio event loop that relays tokens, and a model step took up to twice as long served
as alone (docs/benchmarks.md). As in vLLM v1,
the engine core runs in a child process (`EngineCore`, the default; `--no-engine-process`
keeps it in-process) and the server process keeps only the tokenizer, for validation.

IPC is one socket pair (`multiprocessing.connection` framing, pickled tuples). Down:
`CoreOptions` first, then ("submit", key, request_id, spec, submitted_at), ("cancel", key),
("lora", key, "load" | "unload", name, path), ("stop",). Up: ("loaded", ModelFacts) or
("failed", exception) once, then one ("step", events, admitted keys, metric ops, active
slots) per scheduler iteration: every event of the step in one message, not one per
token; and ("lora_done", key, AdapterError | None, result) per "lora" (an unload's
result: how many requests still run with the adapter). The server process replays the metric ops on
its Prometheus metrics, so `/metrics` shows the same series. The child exits when the
socket closes (the server process died); when the child dies, every request fails as
unavailable and `on_death` is called (the engine then exits 1, to be restarted).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch
from prometheus_client.metrics import MetricWrapperBase

from llm.checkpoint import CheckpointError, load_checkpoint
from llm.config import ModelConfig
from llm.core.openmp import release_openmp_threads
from llm.data.tokenizers import BaseTokenizer
from llm.inference.adapters import AdapterSet
from llm_engine import metrics
from llm_engine.scheduler import (
    AdapterError,
    Event,
    Failed,
    Finished,
    GenerationRequest,
    QueueFull,
    Scheduler,
    Token,
    _emit,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoreOptions:
    """What a process needs to load the model and run the scheduler (picklable)."""

    checkpoint: str
    device: str = "cpu"
    dtype: torch.dtype | None = None
    adapter: str | None = None
    merge_adapter: bool = True
    max_queue: int = 64
    n_slots: int = 8
    prefill_chunk: int = 512
    compile: bool = False
    max_model_len: int | None = None
    kv_cache_gib: float | None = None
    threads: int = 0  # torch intra-op threads of the engine-core process; 0: torch's default
    log_level: str = "INFO"
    loras: tuple[tuple[str, str], ...] = ()  # (name, path) of LoRA adapters served at start
    enable_lora: bool = False  # serve LoRA adapters (implied by `loras`)
    max_loras: int = 4  # adapters served at once
    max_lora_rank: int = 16  # the highest adapter rank served


@dataclass
class ModelFacts:
    """What the server process needs of the loaded model: no weights."""

    tokenizer: BaseTokenizer
    config: ModelConfig
    uri: str
    name: str
    generation_defaults: dict[str, float]
    n_params: int
    dtype: str
    context_length: int  # what a prompt plus its new tokens may take (--max-model-len)
    cache_bytes: int = 0
    lora_adapters: dict[str, str] | None = None  # name -> path; None: no LoRA serving


def build(options: CoreOptions) -> tuple[Scheduler, ModelFacts]:
    """Load the checkpoint (and a LoRA adapter on it), size the KV cache
    (`kv_cache_context`), build the (not yet started) scheduler."""
    from llm_engine.server import _apply_adapter, free_memory, kv_cache_context

    loaded = load_checkpoint(options.checkpoint, device=options.device, dtype=options.dtype)
    if options.adapter is not None:
        _apply_adapter(loaded, options.adapter, options.merge_adapter)
    adapters = None
    if options.enable_lora or options.loras:
        adapters = AdapterSet(loaded.model, options.max_loras, options.max_lora_rank)
    gib = options.kv_cache_gib
    budget = int(gib * 2**30) if gib else int(0.9 * free_memory(options.device))
    context = kv_cache_context(loaded.model, options.n_slots, options.max_model_len, budget)
    scheduler = Scheduler(
        loaded.model, loaded.tokenizer, max_queue=options.max_queue, n_slots=options.n_slots,
        prefill_chunk=options.prefill_chunk, compile=options.compile, max_seq_len=context,
        adapters=adapters,
    )  # fmt: skip
    for name, path in options.loras:
        scheduler.load_lora(name, path)
    cache = loaded.model.cache_bytes()
    log.info(
        "kv_cache",
        extra={"bytes": cache, "mib": round(cache / 2**20, 1), "slots": options.n_slots,
               "context_length": context, "budget_mib": round(budget / 2**20, 1)},
    )  # fmt: skip
    facts = ModelFacts(
        tokenizer=loaded.tokenizer,
        config=loaded.config,
        uri=loaded.uri,
        name=loaded.name,
        generation_defaults=dict(loaded.generation_defaults),
        n_params=loaded.model.num_params(),
        dtype=str(loaded.model.embed_tokens.weight.dtype).removeprefix("torch."),
        context_length=context,
        cache_bytes=cache,
        lora_adapters=scheduler.lora_adapters if adapters is not None else None,
    )
    # This thread is done with the model: the scheduler thread runs every later step. Kept,
    # this thread's OpenMP workers would make the scheduler thread's workers sleep between
    # parallel regions (`llm.core.openmp`).
    release_openmp_threads()
    return scheduler, facts


# -- the engine-core process -------------------------------------------------------------


class _Metric:
    """Stands in for one Prometheus metric: records what is done to it."""

    def __init__(self, recorder: _Recorder, name: str, label: str | None = None) -> None:
        self._recorder, self._name, self._label = recorder, name, label

    def labels(self, label: str) -> _Metric:
        return _Metric(self._recorder, self._name, label)

    def set(self, value: float) -> None:
        self._recorder.add((self._name, self._label, "set", value))

    def inc(self, value: float = 1) -> None:
        self._recorder.add((self._name, self._label, "inc", value))

    def observe(self, value: float) -> None:
        self._recorder.add((self._name, self._label, "observe", value))


class _Recorder:
    """`llm_engine.metrics` as the scheduler uses it, recording (name, label, op, value)."""

    def __init__(self) -> None:
        self._ops: list[tuple[str, str | None, str, float]] = []
        self._lock = threading.Lock()
        for name in dir(metrics):
            if isinstance(getattr(metrics, name), MetricWrapperBase):
                setattr(self, name, _Metric(self, name))

    def add(self, op: tuple[str, str | None, str, float]) -> None:
        with self._lock:
            self._ops.append(op)

    def take(self) -> list[tuple[str, str | None, str, float]]:
        with self._lock:
            ops, self._ops = self._ops, []
        return ops


def replay(ops: list[tuple[str, str | None, str, float]]) -> None:
    """Apply ops a `_Recorder` recorded to this process's metrics."""
    for name, label, op, value in ops:
        metric = getattr(metrics, name)
        if label is not None:
            metric = metric.labels(label)
        getattr(metric, op)(value)


class _Child:
    """The engine-core process's side: requests in, one message per scheduler step out."""

    def __init__(self, scheduler: Scheduler, up: Connection, recorder: _Recorder) -> None:
        self.scheduler, self.up, self.recorder = scheduler, up, recorder
        self.requests: dict[int, GenerationRequest] = {}
        self._events: list[tuple] = []
        self._admitted: list[int] = []
        self._lock = threading.Lock()  # the buffers
        self._send_lock = threading.Lock()
        scheduler.metrics = recorder
        scheduler.on_admit = self._on_admit
        scheduler.on_iteration = self.flush

    def _on_admit(self, request: GenerationRequest) -> None:
        with self._lock:
            self._admitted.append(request._core_key)  # type: ignore[attr-defined]

    def event(self, key: int, event: Event) -> None:
        # Tokens, most of the traffic, as plain tuples: cheaper to pickle than dataclasses.
        item = (key, *_token_fields(event)) if isinstance(event, Token) else (key, event)
        with self._lock:
            self._events.append(item)
        if isinstance(event, (Finished, Failed)):
            self.requests.pop(key, None)

    def flush(self) -> None:
        with self._lock:
            events, self._events = self._events, []
            admitted, self._admitted = self._admitted, []
        ops = self.recorder.take()
        if events or admitted or ops:
            self.send(("step", events, admitted, ops, self.scheduler.active_slots))

    def send(self, message: tuple) -> None:
        with self._send_lock:
            self.up.send(message)

    def _lora(self, key: int, op: str, name: str, path: str) -> None:
        """A load or unload, off the reading thread (reading an adapter takes a while)."""
        error, result = None, None
        try:
            if op == "load":
                self.scheduler.load_lora(name, path)
            else:
                result = self.scheduler.unload_lora(name)
        except AdapterError as e:
            error = e
        except Exception as e:  # a bug must answer the caller, not hang it
            error = AdapterError("invalid", f"{type(e).__name__}: {e}")
        self.send(("lora_done", key, error, result))

    def serve(self, down: Connection) -> None:
        """Take requests and cancels until told to stop; exit at once if the server
        process is gone (the pipe closed without a stop)."""
        while True:
            try:
                message = down.recv()
            except (EOFError, OSError):
                log.error("engine_core_orphaned")  # the server process died
                os._exit(1)
            kind = message[0]
            if kind == "submit":
                _, key, request_id, spec, submitted_at = message
                request = GenerationRequest(
                    spec,
                    lambda event, key=key: self.event(key, event),
                    request_id=request_id,
                    submitted_at=submitted_at,
                )
                request._core_key = key  # type: ignore[attr-defined]
                self.requests[key] = request
                try:
                    self.scheduler.submit(request)
                except QueueFull as e:
                    self.event(key, Failed(str(e), unavailable=True))
                    self.flush()
            elif kind == "cancel":
                request = self.requests.pop(message[1], None)
                if request is not None:
                    request.cancel()
            elif kind == "lora":
                threading.Thread(target=self._lora, args=message[1:], daemon=True).start()
            elif kind == "stop":
                self.scheduler.stop()
                self.flush()
                self.send(("stopped",))
                return


_CHILD = "import sys; from llm_engine.core import _child_main; _child_main(int(sys.argv[1]))"


def _token_fields(token: Token) -> tuple:
    return (token.token_id, token.text, token.logprob, token.top)


def _child_main(fd: int) -> None:
    """The engine-core process: `python -c ... _child_main(FD)`, FD its end of the socket."""
    import signal

    from llm_common.logs import setup_logging

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server process's to handle
    conn = Connection(fd)
    options: CoreOptions = conn.recv()
    setup_logging(options.log_level)
    if options.threads:
        torch.set_num_threads(options.threads)
    try:
        scheduler, facts = build(options)
    except BaseException as e:  # torch's CheckpointException is a BaseException
        conn.send(("failed", _picklable(e)))
        return
    child = _Child(scheduler, conn, _Recorder())
    child.send(("loaded", facts))
    scheduler.start()
    child.serve(conn)


def _picklable(e: BaseException) -> BaseException:
    """`e` if it survives pickling (its type and message are what the server reports)."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        if isinstance(e, CheckpointError):
            return CheckpointError(str(e))
        return RuntimeError(f"{type(e).__name__}: {e}")


# -- the server process's side -----------------------------------------------------------


class EngineCore:
    """The scheduler's interface (`submit`, `stop`, `queue_depth`, `active_slots`,
    `n_slots`, `GenerationRequest.cancel`) for an engine core in a child process."""

    def __init__(self, options: CoreOptions, on_death: Callable[[str], None] | None = None):
        self.options, self.n_slots, self.max_queue = options, options.n_slots, options.max_queue
        self.on_death = on_death
        self.process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self._keys = itertools.count(1)
        self._requests: dict[int, GenerationRequest] = {}
        self._waiting: set[int] = set()
        self._active = 0
        self._closed = False  # no new requests: stopping, or the child is gone
        self._stopping = False
        self._reader: threading.Thread | None = None
        self._lora_calls: dict[int, Future] = {}
        self._lora_adapters: dict[str, str] | None = None

    def load(self) -> ModelFacts:
        """Start the child and wait until it has loaded the model (blocking). Raises what
        loading raised there."""
        # A fresh interpreter (not multiprocessing's spawn, which would re-run the
        # parent's __main__) with this one's import path; its end of a socket pair is
        # the only one, so either side sees EOF when the other dies.
        ours, theirs = socket.socketpair()
        with self._lock:
            if self._stopping:
                raise RuntimeError("the engine is shutting down")
            self._conn = Connection(ours.detach())
            fd = theirs.detach()
            try:
                self.process = subprocess.Popen(
                    [sys.executable, "-c", _CHILD, str(fd)],
                    pass_fds=(fd,),
                    stdin=subprocess.DEVNULL,
                    stdout=sys.__stderr__ if sys.__stderr__ is not None else subprocess.DEVNULL,
                    env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
                )
            finally:
                os.close(fd)
        log.info("engine_core_started", extra={"pid": self.process.pid})
        self._conn.send(self.options)
        try:
            message = self._conn.recv()
        except (EOFError, OSError):
            code = self._wait(5)
            raise RuntimeError(f"the engine core exited while loading (exit code {code})") from None
        if message[0] == "failed":
            self._wait(10)
            raise message[1]
        facts: ModelFacts = message[1]
        self._lora_adapters = facts.lora_adapters
        self._reader = threading.Thread(target=self._read, name="llm-core-reader", daemon=True)
        self._reader.start()
        return facts

    def _wait(self, timeout: float) -> int | None:
        """The child's exit code once it exits within `timeout` s (negative: a signal)."""
        assert self.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        return self.process.returncode

    # -- the scheduler's interface ---------------------------------------------------------

    def start(self) -> None:
        pass  # the child started its scheduler once loaded

    def submit(self, request: GenerationRequest) -> None:
        with self._lock:
            if self._closed:
                raise QueueFull("the engine is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            key = next(self._keys)
            self._requests[key] = request
            self._waiting.add(key)
            request._on_cancel = lambda: self._cancel(key)
            self._send(("submit", key, request.request_id, request.spec, request.submitted_at))
            metrics.QUEUE_DEPTH.set(len(self._waiting))

    def _cancel(self, key: int) -> None:
        with self._lock:
            if self._requests.pop(key, None) is not None:
                self._waiting.discard(key)
                if not self._closed:
                    self._send(("cancel", key))

    def _send(self, message: tuple) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):  # the child is gone
            self._conn.send(message)  # (the reader fails its requests) or never started

    def stop(self, timeout: float = 10.0) -> None:
        """The running step finishes, everything else fails as unavailable; the child exits."""
        with self._lock:
            self._stopping = self._closed = True
            self._send(("stop",))
        if self.process is None:  # never started
            return
        if self._reader is not None:
            self._reader.join(timeout)
        if self.process.poll() is None and self._wait(timeout) is None:
            log.warning("engine_core_killed", extra={"pid": self.process.pid})
            self.process.kill()
            self._wait(5)
        self._fail_all("the engine is shutting down")

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active_slots(self) -> int:
        return self._active

    @property
    def adapters(self) -> object | None:
        return None if self._lora_adapters is None else self  # LoRA serving is on

    @property
    def lora_adapters(self) -> dict[str, str]:
        return dict(self._lora_adapters or {})

    def load_lora(self, name: str, path: str) -> None:
        self._lora_call("load", name, path)
        assert self._lora_adapters is not None
        self._lora_adapters[name] = path

    def unload_lora(self, name: str) -> int:
        running = self._lora_call("unload", name, "")
        assert self._lora_adapters is not None
        self._lora_adapters.pop(name, None)
        return running

    def _lora_call(self, op: str, name: str, path: str) -> Any:
        """Run a load/unload in the child; blocks; returns its result or raises its
        `AdapterError`."""
        if self._lora_adapters is None:
            raise AdapterError("disabled", "this engine serves no LoRA adapters (--enable-lora)")
        done: Future = Future()
        with self._lock:
            if self._closed:
                raise AdapterError("invalid", "the engine is shutting down")
            key = next(self._keys)
            self._lora_calls[key] = done
            self._send(("lora", key, op, name, path))
        error, result = done.result()
        if error is not None:
            raise error
        return result

    # -- the reader thread -----------------------------------------------------------------

    def _read(self) -> None:
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "step":
                self._on_step(*message[1:])
            elif message[0] == "lora_done":
                with self._lock:
                    call = self._lora_calls.pop(message[1], None)
                if call is not None:
                    call.set_result(message[2:])
        code = self._wait(5)
        with self._lock:
            self._closed = True
            died = not self._stopping
        if died:
            reason = f"the engine core died (exit code {code})"
            log.error("engine_core_died", extra={"exit_code": code, "pid": self.process.pid})
            self._fail_all(reason)
            if self.on_death is not None:
                self.on_death(reason)

    def _on_step(self, events: list[tuple], admitted: list[int], ops: list, active: int) -> None:
        # Counts first: whoever sees a request's end sees its slot freed.
        with self._lock:
            self._waiting.difference_update(admitted)
            self._active = active
            targets = []
            for item in events:
                key = item[0]
                event = Token(*item[1:]) if len(item) > 2 else item[1]
                if isinstance(event, (Finished, Failed)):
                    request = self._requests.pop(key, None)
                    self._waiting.discard(key)
                else:
                    request = self._requests.get(key)
                if request is not None:
                    targets.append((request, event))
        replay(ops)
        metrics.QUEUE_DEPTH.set(len(self._waiting))
        metrics.ACTIVE_SLOTS.set(active)
        for request, event in targets:
            _emit(request, event)

    def _fail_all(self, message: str) -> None:
        with self._lock:
            requests, self._requests = list(self._requests.values()), {}
            calls, self._lora_calls = list(self._lora_calls.values()), {}
            self._waiting.clear()
        for call in calls:
            call.set_result((AdapterError("invalid", message), None))
        with self._lock:
            self._active = 0
        for request in requests:
            _emit(request, Failed(message, unavailable=True))
        metrics.QUEUE_DEPTH.set(0)
        metrics.ACTIVE_SLOTS.set(0)
        metrics.KV_CACHE_USAGE.set(0)
