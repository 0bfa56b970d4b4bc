"""Assemble a training run from settings: data, model, wrappers, optimizer, resume, callbacks.

The order of `apply_*` calls is fixed here: build on the device ->
(optional) load initial weights -> activation checkpointing -> compile -> DDP/FSDP. Fine-tuning with adapters
(`finetune.method` lora/qlora) replaces the first two: load the base from
`checkpoint.init_from` -> (qlora) quantize it -> apply LoRA (`llm.training.finetune`).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from llm import storage
from llm.checkpoint import (
    is_sharded,
    load_checkpoint,
    load_trainer_state,
    read_config,
    resume_checkpoint,
)
from llm.checkpoint.sharded import load_sharded
from llm.config import ModelConfig
from llm.data.tokenizers import BaseTokenizer
from llm.models.decoder import DecoderModel
from llm.settings import TrainerSettings
from llm.training import callbacks as cb
from llm.training.checkpointing import Checkpointer
from llm.training.distributed import (
    DistInfo,
    apply_activation_checkpointing,
    apply_compile,
    apply_ddp,
    apply_fsdp,
    barrier,
    broadcast_object,
    compile_scope,
    init_distributed,
)
from llm.training.finetune import (
    AdapterWriter,
    base_model_type,
    build_finetune_model,
    check_finetune,
    load_base,
    resume_adapter,
)
from llm.training.lease import RunLease
from llm.training.optim import build_optimizer, build_scheduler
from llm.training.trainer import (
    Batch,
    TrainData,
    Trainer,
    causal_lm_loss,
    val_tokens_per_byte,
)

log = logging.getLogger(__name__)


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmuls plus 12*L*d*T for attention (PaLM, app. B)."""
    return 6 * n_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def default_peak_flops(device: torch.device, precision: str) -> float:
    """A stated peak for MFU: the GPU's datasheet number, or a measured matmul rate on the CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}
        return next((v for k, v in table.items() if k in name), 100e12)
    from torch.utils.benchmark import Timer

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a = torch.randn(1024, 1024, dtype=dtype)
    # Timer runs on one thread unless told otherwise: measure with the threads training uses.
    timer = Timer("a @ a", globals={"a": a}, num_threads=torch.get_num_threads())
    timing = timer.blocked_autorange(min_run_time=0.2)
    return 2 * 1024**3 / timing.median


def preflight(settings: TrainerSettings, device: torch.device) -> None:
    """Refuse, before any work, what this platform cannot do (ValueError naming the setting)."""
    o, f = settings.optimization, settings.finetune
    check_finetune(f, settings.checkpoint.init_from, settings.distributed.strategy, device.type)
    if f.method != "none" and settings.model.model_fields_set:
        fields = sorted(f"model.{k}" for k in settings.model.model_fields_set)
        raise ValueError(
            f"{', '.join(fields)}: fine-tuning (finetune.method={f.method}) takes the"
            " architecture of checkpoint.init_from; leave the model settings unset"
        )
    if o.precision == "fp16" and device.type != "cuda":
        raise ValueError(
            f"optimization.precision=fp16 needs a GPU (device is {device}); use bf16 on the CPU"
        )
    if o.optimizer == "muon" and settings.distributed.strategy == "fsdp":
        # Newton-Schulz needs each whole matrix; FSDP holds only a shard of it per rank.
        raise ValueError(
            "optimization.optimizer=muon: not with distributed.strategy=fsdp (Muon needs"
            " whole matrices); use ddp or optimizer adamw"
        )
    if o.optimizer == "adamw8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ValueError(
                "optimization.optimizer=adamw8bit needs bitsandbytes, which cannot be imported"
                f" here ({e}); install it (pip install bitsandbytes) or use adamw"
            ) from None


def run_training(
    settings: TrainerSettings,
    tokenizer: BaseTokenizer,
    data: TrainData,
    info: DistInfo | None = None,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] = causal_lm_loss,
) -> Trainer:
    """Train per `settings`; resumes from the run directory's newest checkpoint that
    verifies, holding the run's lease (`llm.training.lease`) throughout.

    `tokenizer` and `data` come from `llm.training.data.build_data(settings, rank, world)`;
    `loss_fn` replaces the next-token loss (tests inject non-finite losses with it).
    """
    t, c = settings.training, settings.checkpoint
    info = info or init_distributed(
        t.device, settings.distributed.backend, settings.distributed.timeout_s
    )
    preflight(settings, info.device)
    lease, latest = _claim_run(c.run_dir, c.resume, c.lease_timeout_s, info.is_main)
    try:
        return _train(settings, tokenizer, data, info, loss_fn, lease, latest)
    finally:
        if lease is not None:
            lease.release()


def _claim_run(
    run_dir: str, resume: bool, lease_timeout_s: float, is_main: bool
) -> tuple[RunLease | None, str | None]:
    """Rank 0 takes the run's lease and picks the checkpoint to resume from (hashes
    verified, falling back past bad ones); every rank gets its answer or its error."""
    lease, latest, error = None, None, None
    if is_main:
        try:
            candidate = RunLease(run_dir, stale_after_s=lease_timeout_s)
            candidate.acquire()
            lease = candidate
            latest = resume_checkpoint(run_dir) if resume else None
        except Exception as e:
            error = e
    message = None if error is None else f"{type(error).__name__}: {error}"
    latest, message = broadcast_object((latest, message))
    if error is not None:
        if lease is not None:
            lease.release()
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 could not start the run in {run_dir}: {message}")
    return lease, latest


def _train(
    settings: TrainerSettings,
    tokenizer: BaseTokenizer,
    data: TrainData,
    info: DistInfo,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor],
    lease: RunLease | None,
    latest: str | None,
) -> Trainer:
    t, o, c = settings.training, settings.optimization, settings.checkpoint
    t = t.for_world(info.world_size)  # grad_accum_steps derived from global_batch_size
    torch.manual_seed(t.seed)
    f = settings.finetune
    adapter: AdapterWriter | None = None
    if f.method != "none":
        model, n_params = build_finetune_model(f, c.init_from, tokenizer, t.block_size, info.device)
        model_cfg = model.config
        adapter = AdapterWriter(f, c.init_from, c.run_dir)
        if latest is not None:
            resume_adapter(model, latest, base_model_type(c.init_from))
    else:
        if c.init_from and not settings.model.model_fields_set:
            # Full fine-tuning takes the architecture (and weights) of checkpoint.init_from.
            model = load_base(c.init_from, info.device).float().train()
            model_cfg = model.config
        else:
            model_cfg = settings.model.build(
                vocab_size=tokenizer.vocab_size, max_seq_len=max(t.block_size, 256)
            )
            model = DecoderModel(model_cfg).to(info.device)
            if c.init_from:
                _load_initial_weights(model, c.init_from, info.device)
        if t.block_size > model_cfg.max_seq_len:
            raise ValueError(
                f"training.block_size={t.block_size}: longer than the context of"
                f" checkpoint.init_from ({model_cfg.max_seq_len})"
            )
        if latest is not None:
            if read_config(latest) != model_cfg:
                raise ValueError(
                    f"{latest}: its model config differs from the requested one;"
                    " use a new checkpoint.run_dir or the same model settings"
                )
            if not is_sharded(latest):  # sharded ones load after wrapping, below
                model.load_state_dict(
                    load_checkpoint(latest, device=info.device).model.state_dict()
                )
        n_params = model.num_params()

    fsdp = info.enabled and settings.distributed.strategy == "fsdp"
    if o.activation_checkpointing != "none":  # before compile and wrapping, as torchtitan
        apply_activation_checkpointing(model, o.activation_checkpointing)
    if o.compile:
        apply_compile(model, compile_scope(o.compile_scope, model_cfg.n_layers, fsdp))
    wrapped = model
    if fsdp:
        wrapped = apply_fsdp(model)
    elif info.enabled:
        wrapped = apply_ddp(model, info)

    optimizer = build_optimizer(
        wrapped, o.lr, o.weight_decay, (o.beta1, o.beta2), o.optimizer,
        o.muon_lr, o.muon_momentum, o.muon_weight_decay,
    )  # fmt: skip
    scheduler = build_scheduler(optimizer, o.warmup_steps, t.max_steps, o.schedule, o.min_lr_ratio)

    local_dir = _local_run_dir(c.run_dir)
    peak = (
        o.peak_tflops * 1e12 if o.peak_tflops > 0 else default_peak_flops(info.device, o.precision)
    )
    tokens_per_step = t.batch_size * t.block_size * t.grad_accum_steps * info.world_size
    parallel = settings.distributed.strategy if info.enabled else "single process"
    summary = [
        f"model: {n_params / 1e6:.2f}M parameters, {model_cfg.n_layers} layers, dim {model_cfg.dim}"
        + (f", {model_cfg.n_experts} experts" if model_cfg.mlp_impl == "moe" else ""),
        f"tokens per optimizer step: {tokens_per_step:,} = batch {t.batch_size} x block"
        f" {t.block_size} x grad accum {t.grad_accum_steps} x world size {info.world_size}",
        f"world size {info.world_size} ({parallel}) on {info.device}, {o.precision},"
        f" compile {o.compile}, activation checkpointing {o.activation_checkpointing}",
        f"checkpoints: every {c.interval} steps to {c.run_dir} (keep last {c.keep_last});"
        f" metrics: {local_dir / 'metrics.jsonl'}",
        f"peak {peak / 1e12:.1f} TFLOP/s for MFU",
    ]
    callbacks: list[cb.Callback] = [
        cb.RunSummary(summary),
        cb.LRMonitor(),
        cb.Throughput(flops_per_token(model_cfg, n_params, t.block_size), peak),
        cb.JsonlMetrics(t.log_interval),
        cb.ConsoleLogger(t.log_interval, t.progress),
        cb.TensorBoard(t.log_interval),
        cb.LossPlot(),
    ]
    if t.early_stopping_patience > 0:
        callbacks.append(cb.EarlyStopping(t.early_stopping_patience))
    if t.sample_log:
        callbacks.append(cb.SampleLog())
    if not storage.is_local(c.run_dir):
        callbacks.insert(0, cb.RunFiles(c.run_dir))

    # Adapters are saved alone (AdapterWriter); sharding is for whole-model state.
    sharded = adapter is None and (c.format == "sharded" or (c.format == "auto" and fsdp))
    checkpointer = Checkpointer(
        c.run_dir, model, tokenizer, c.keep_last, settings, adapter, sharded=sharded,
        lease=lease, verified=latest,
    )  # fmt: skip
    if adapter is not None and o.router_bias_update_rate is None:
        # An adapter is saved alone: a base's router bias moved in training would be lost.
        o = o.model_copy(update={"router_bias_update_rate": 0.0})
    elif adapter is not None and o.router_bias_update_rate:
        raise ValueError(
            "optimization.router_bias_update_rate with finetune.method="
            f"{settings.finetune.method}: the adapter is saved without the base's router bias"
            " it would move; set it to 0 or fine-tune fully"
        )
    trainer = Trainer(
        wrapped, optimizer, scheduler, data, t, o, info, local_dir, callbacks,
        loss_fn=loss_fn, checkpointer=checkpointer, checkpoint_interval=c.interval,
        tokens_per_byte=val_tokens_per_byte(data, tokenizer, info.device),
    )  # fmt: skip
    if latest is not None:
        if is_sharded(latest):
            load_sharded(latest, wrapped, optimizer)  # collective: each rank its shards
        trainer.load_state_dict(load_trainer_state(latest))
        log.info("resumed from %s at step %d", latest, trainer.step)
    barrier()
    trainer.fit()
    return trainer


def _local_run_dir(run_dir: str) -> Path:
    if storage.is_local(run_dir):
        path = Path(storage.url_to_fs(run_dir)[1])
    else:  # metrics/plots are staged locally and mirrored by callbacks.RunFiles
        path = Path(tempfile.mkdtemp(prefix="llm-run-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _load_initial_weights(model: DecoderModel, uri: str, device: torch.device) -> None:
    """Full fine-tuning start: our checkpoint (run or step dir) or a Hugging Face directory."""
    source = load_base(uri, device)
    if source.config != model.config:
        raise ValueError(
            f"checkpoint.init_from={uri}: its model config differs from the requested one"
        )
    model.load_state_dict(source.state_dict())
