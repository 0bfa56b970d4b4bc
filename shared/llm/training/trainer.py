"""The single-process training loop: AdamW, warmup + cosine, clipping, validation, checkpoints.

Each checkpoint carries everything needed to continue exactly: model, optimizer,
scheduler, step and the batch sampler's RNG state; `train` resumes from the run
directory's newest committed checkpoint when there is one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from llm import storage
from llm.checkpoint import load_checkpoint, load_trainer_state, save_checkpoint
from llm.config import ModelConfig
from llm.data.dataset import TokenWindows
from llm.data.tokenizers import BaseTokenizer
from llm.models.decoder import DecoderModel
from llm.training.optim import build_optimizer, cosine_schedule

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """How to train (the model's shape is ModelConfig's business)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_dir: str = Field(description="local directory or s3:// URI for checkpoints")
    max_steps: int = Field(default=1000, gt=0)
    batch_size: int = Field(default=16, gt=0)
    block_size: int = Field(default=128, gt=1)
    lr: float = Field(default=1e-3, gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=50, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, ge=0, description="0 disables clipping")
    eval_interval: int = Field(default=200, gt=0)
    eval_batches: int = Field(default=20, gt=0)
    checkpoint_interval: int = Field(default=500, gt=0)
    keep_last: int = Field(default=2, gt=0)
    val_fraction: float = Field(default=0.1, gt=0, lt=1)
    seed: int = 1337
    device: str = "cpu"
    log_interval: int = Field(default=50, gt=0)


@dataclass
class TrainResult:
    step: int
    train_loss: float
    val_loss: float
    history: list[dict[str, float]] = field(default_factory=list)


def lm_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)  # (B, T, V)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: TokenWindows, batch_size: int, n_batches: int, device: str
) -> float:
    """Mean loss over a fixed set of validation windows (same windows every call)."""
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(n_batches):
        x, y = data.get_batch("val", batch_size, gen)
        losses.append(lm_loss(model, x.to(device), y.to(device)).item())
    model.train(was_training)
    return sum(losses) / len(losses)


def train(
    model_config: ModelConfig,
    cfg: TrainConfig,
    tokenizer: BaseTokenizer,
    tokens: torch.Tensor,
    on_eval: Callable[[dict[str, float]], None] | None = None,
) -> TrainResult:
    """Train a model on `tokens` (a 1-D stream), resuming from `cfg.run_dir` if it has checkpoints."""
    torch.manual_seed(cfg.seed)
    data = TokenWindows(tokens, cfg.block_size, cfg.val_fraction)
    device = cfg.device
    model = DecoderModel(model_config).to(device)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    scheduler = cosine_schedule(optimizer, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    gen = torch.Generator().manual_seed(cfg.seed)
    step = 0

    latest = storage.latest_checkpoint(cfg.run_dir)
    if latest is not None:
        loaded = load_checkpoint(latest, device=device)
        if loaded.config != model_config:
            raise ValueError(
                f"{latest}: checkpoint config differs from the requested model config;"
                " use a new run_dir or the same model settings"
            )
        model.load_state_dict(loaded.model.state_dict())
        state = load_trainer_state(latest)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        step = state["step"]
        log.info("resumed from %s at step %d", latest, step)

    model.train()
    history: list[dict[str, float]] = []
    train_loss = val_loss = float("nan")
    t0, tokens_seen = time.perf_counter(), 0
    while step < cfg.max_steps:
        x, y = data.get_batch("train", cfg.batch_size, gen)
        loss = lm_loss(model, x.to(device), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        tokens_seen += x.numel()
        train_loss = loss.item()

        if step % cfg.log_interval == 0:
            dt = time.perf_counter() - t0
            log.info(
                "step %d/%d loss %.4f lr %.2e %.0f tok/s",
                step, cfg.max_steps, train_loss, scheduler.get_last_lr()[0], tokens_seen / dt,
            )  # fmt: skip
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            val_loss = evaluate(model, data, cfg.batch_size, cfg.eval_batches, device)
            record = {"step": step, "train_loss": train_loss, "val_loss": val_loss}
            history.append(record)
            log.info("step %d val_loss %.4f", step, val_loss)
            if on_eval is not None:
                on_eval(record)
        if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps:
            state = {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "data_rng": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
            }
            ckpt = storage.checkpoint_dir(cfg.run_dir, step)
            save_checkpoint(ckpt, model, tokenizer, state, meta={"step": step, "val_loss": val_loss})
            storage.retain(cfg.run_dir, cfg.keep_last)
            log.info("saved %s", ckpt)
    return TrainResult(step, train_loss, val_loss, history)
