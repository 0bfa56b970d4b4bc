"""Trainer: the loop, with everything else (logging, checkpoints, plots) in callbacks.

One step = `grad_accum_steps` micro-batches (DDP syncs gradients on the last one only),
autocast in the configured precision, gradient clipping, a NaN/inf guard that skips the
step (and stops after `max_bad_steps` in a row), then optimizer and schedule.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from llm.training.callbacks import Callback
from llm.training.config import OptimizationConfig, TrainingConfig
from llm.training.distributed import DistInfo, all_reduce_mean, all_reduce_mean_

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class TrainData(Protocol):
    """What the trainer needs from a data module (rank-aware, resumable)."""

    def next_batch(self) -> Batch: ...
    def val_batches(self) -> Iterable[Batch]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteLossError(RuntimeError):
    pass


def val_tokens_per_byte(
    data: TrainData, tokenizer: Any, device: torch.device | None = None
) -> float | None:
    """Scored tokens per UTF-8 byte of the text they decode to, over the validation batches
    that `evaluate` scores (None without any bytes). Exact for the character tokenizer; for
    BPE a window cut inside a multi-byte character counts its replacement character (a few
    bytes per window); special tokens (EOS) are scored but have no bytes. On several ranks,
    the mean of each rank's ratio over its own batches."""
    tokens = n_bytes = 0
    for batch in data.val_batches():
        for row in batch["labels"]:
            ids = row[row != -100].tolist()
            tokens += len(ids)
            n_bytes += len(tokenizer.decode(ids).encode("utf-8"))
    # Every rank takes part in the reduction, even one without bytes (it would hang others).
    ratio = all_reduce_mean(tokens / n_bytes if n_bytes else 0.0, device or torch.device("cpu"))
    return ratio or None


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100 (lm and sft alike)."""
    # Packed SFT rows carry per-sample positions and document ids; plain windows do not.
    logits = model(
        batch["input_ids"],
        position_ids=batch.get("position_ids"),
        document_ids=batch.get("document_ids"),
    )  # (B, T, V)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100
    )


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        data: TrainData,
        training: TrainingConfig,
        optimization: OptimizationConfig,
        dist_info: DistInfo,
        local_dir: Path,
        callbacks: list[Callback] | None = None,
        loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = causal_lm_loss,
        checkpointer: Callable[[Trainer], None] | None = None,
        checkpoint_interval: int = 0,
        tokens_per_byte: float | None = None,
    ) -> None:
        self.model, self.optimizer, self.scheduler, self.data = model, optimizer, scheduler, data
        self.cfg, self.optim_cfg, self.dist = training, optimization, dist_info
        self.local_dir, self.callbacks, self.loss_fn = local_dir, callbacks or [], loss_fn
        self.checkpointer, self.checkpoint_interval = checkpointer, checkpoint_interval
        self.max_steps = training.max_steps
        self.tokens_per_byte = tokens_per_byte  # of the validation text, for bits per byte
        self.step = self.tokens_seen = self.bad_steps = self.skipped_steps = 0
        self.should_stop = False
        self.last_val_loss = math.nan
        self.history: list[dict[str, float]] = []
        self.autocast_dtype = AUTOCAST[optimization.precision]
        use_scaler = optimization.precision == "fp16"
        if use_scaler and dist_info.device.type != "cuda":
            raise ValueError("optimization.precision=fp16 needs a GPU (use bf16 on the CPU)")
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        # The DecoderModel under DDP (`.module`); FSDP2 and compile keep it as it is.
        inner = getattr(model, "module", model)
        is_moe = getattr(getattr(inner, "config", None), "mlp_impl", None) == "moe"
        self.moe: Any = inner if is_moe else None
        choice_bias = is_moe and inner.config.router_choice_bias
        rate = optimization.router_bias_update_rate
        self.bias_update_rate = (0.001 if choice_bias else 0.0) if rate is None else rate
        if self.bias_update_rate > 0 and not choice_bias:
            raise ValueError(
                "optimization.router_bias_update_rate needs an MoE model with"
                " model.router_choice_bias (DeepSeek-V3 routing)"
            )

    # -- state that a checkpoint carries ------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Loop state for a checkpoint; the Checkpointer adds model and optimizer (full form)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "data": self.data.state_dict(),
            "rng": _gather_rng_states(self.dist),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from llm.training.checkpointing import restore_optimizer

        if state["optimizer"] is not None:  # None: a sharded checkpoint restored it already
            restore_optimizer(self.model, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped_steps = state.get("skipped_steps", 0)
        self.data.load_state_dict(state["data"])
        rng = state["rng"]
        _set_rng_state(rng[self.dist.rank] if len(rng) == self.dist.world_size else rng[0])

    # -- the loop -----------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    def _forward_backward(
        self, batch: Batch, sync: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Backward of one micro-batch's (LM loss + MoE auxiliary loss) / grad_accum_steps.

        Returns the detached LM and auxiliary parts (each already divided) and the expert
        load of this forward (None for dense models).
        """
        batch = {k: v.to(self.dist.device, non_blocking=True) for k, v in batch.items()}
        no_sync = getattr(self.model, "no_sync", None)
        ctx = contextlib.nullcontext() if sync or no_sync is None else no_sync()
        accum, load = self.cfg.grad_accum_steps, None
        with ctx:
            with self._autocast():
                lm = self.loss_fn(self.model, batch) / accum
                aux = torch.zeros_like(lm)
                if self.moe is not None:
                    aux = self.moe.aux_loss() / accum
                    # Read before backward: activation checkpointing's recompute replaces it.
                    load = self.moe.expert_load()
                loss = lm + aux
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self.tokens_seen += batch["input_ids"].numel() * self.dist.world_size
        return lm.detach(), aux.detach(), load

    def train_step(self) -> dict[str, float]:
        """One optimizer step over grad_accum_steps micro-batches.

        The loss trained on is the LM loss plus, for MoE models, `aux_loss()`: the router's
        load-balancing and z losses with the config's coefficients, added to the mean LM
        loss as transformers' Mixtral/Qwen-MoE/gpt-oss do (`loss + router_aux_loss_coef *
        aux_loss`). Metrics report them apart: `loss` (LM), `aux_loss` (the weighted term
        added) and `expert_load_max` (the worst MoE layer's busiest expert over the mean
        load: 1.0 is perfectly balanced, E/top_k is every token on the same experts).
        """
        self.model.train()
        accum = self.cfg.grad_accum_steps
        loss = aux = torch.zeros((), device=self.dist.device)
        load = None
        for i in range(accum):
            lm_i, aux_i, load_i = self._forward_backward(self.data.next_batch(), i == accum - 1)
            loss, aux = loss + lm_i, aux + aux_i
            if load_i is not None:
                load = load_i / accum if load is None else load + load_i / accum
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else math.inf
        # Gradients are already averaged over ranks, so every rank sees the same norm and
        # takes the same skip decision without another collective.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        finite = bool(torch.isfinite(grad_norm)) and bool(torch.isfinite(loss + aux))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skips by itself on inf/nan gradients
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            self.skipped_steps += 1
            log.warning(
                "step %d: non-finite loss/gradients, step skipped (%d in a row)",
                self.step + 1,
                self.bad_steps,
            )
            if self.bad_steps >= self.cfg.max_bad_steps:
                raise NonFiniteLossError(
                    f"{self.bad_steps} consecutive non-finite steps (training.max_bad_steps="
                    f"{self.cfg.max_bad_steps}): lower optimization.lr or check the data"
                )
        self.scheduler.step()
        self.step += 1
        metrics = {
            "step": self.step,
            "loss": all_reduce_mean(loss.item(), self.dist.device),
            "grad_norm": grad_norm.item(),
            "lr": self.scheduler.get_last_lr()[0],
            "tokens": self.tokens_seen,
        }
        if load is not None:
            load = all_reduce_mean_(load)  # (MoE layers, E), the same on every rank
            if finite and self.bias_update_rate > 0:
                self.moe.update_choice_bias(load, self.bias_update_rate)
            metrics["aux_loss"] = all_reduce_mean(aux.item(), self.dist.device)
            metrics["expert_load_max"] = (load.amax(-1) / load.mean(-1)).max().item()
        return metrics

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean `loss_fn` over the validation batches: the pure LM loss. MoE auxiliary losses
        are a training regulariser, left out so val_loss compares across models and
        coefficients (and val_ppl = exp(val_loss) is a true perplexity)."""
        self.model.eval()
        total, n = 0.0, 0
        # A compiled model would compile again for eval mode without gradients (a new graph:
        # on short runs that compile costs more than the evaluation it speeds up).
        eager = not (self.optim_cfg.compile and self.optim_cfg.compile_eval)
        stance = torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext()
        with stance:
            for batch in self.data.val_batches():
                batch = {k: v.to(self.dist.device) for k, v in batch.items()}
                with self._autocast():
                    total += self.loss_fn(self.model, batch).item()
                n += 1
        self.model.train()
        return all_reduce_mean(total / max(n, 1), self.dist.device)

    def eval_metrics(self, val_loss: float) -> dict[str, float]:
        """val_loss (nats per token) with its perplexity and, when the validation text's
        bytes are known, bits per byte: the measure that compares across tokenizers."""
        out = {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 700.0))}
        if self.tokens_per_byte:
            out["val_bits_per_byte"] = val_loss * self.tokens_per_byte / math.log(2)
        return out

    def fit(self) -> list[dict[str, float]]:
        for cb in self.callbacks:
            cb.on_train_start(self)
        t_start = time.perf_counter()
        while self.step < self.max_steps and not self.should_stop:
            metrics = self.train_step()
            for cb in self.callbacks:
                cb.on_step_end(self, metrics)
            last = self.step == self.max_steps
            if self.step % self.cfg.eval_interval == 0 or last:
                self.last_val_loss = self.evaluate()
                record = {
                    "step": self.step,
                    "train_loss": metrics["loss"],
                    **self.eval_metrics(self.last_val_loss),
                }
                self.history.append(record)
                for cb in self.callbacks:
                    cb.on_eval(self, record)
            if self.checkpointer is not None and (
                self.step % self.checkpoint_interval == 0 or last or self.should_stop
            ):
                for cb in self.callbacks:
                    cb.on_checkpoint(self)
                self.checkpointer(self)
        for cb in self.callbacks:
            cb.on_train_end(self)
        log.info("training done at step %d in %.1f s", self.step, time.perf_counter() - t_start)
        return self.history


def _gather_rng_states(info: DistInfo) -> list[dict[str, Any]]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    if not dist.is_initialized():
        return [state]
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, state)
    return states


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
