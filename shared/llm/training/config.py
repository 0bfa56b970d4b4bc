"""Training-side configuration sections (plain pydantic; `llm.settings` reads them from env/YAML/CLI)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrainingConfig(_Section):
    task: Literal["lm", "sft"] = "lm"
    max_steps: int = Field(default=1000, gt=0, description="optimizer steps")
    batch_size: int = Field(default=16, gt=0, description="sequences per micro-batch per rank")
    grad_accum_steps: int = Field(
        default=1, gt=0, description="micro-batches per optimizer step (see global_batch_size)"
    )
    global_batch_size: int | None = Field(
        default=None,
        gt=0,
        description="sequences per optimizer step, all ranks together; when set,"
        " grad_accum_steps is derived as global_batch_size / (batch_size x world size), so the"
        " data order and the optimization stay the same whatever number of workers runs"
        " (elastic jobs resume at another size); None: batch_size x grad_accum_steps x world size",
    )
    block_size: int = Field(default=128, gt=1, description="tokens per sequence")
    eval_interval: int = Field(default=200, gt=0)
    eval_batches: int = Field(default=20, gt=0)
    log_interval: int = Field(default=50, gt=0)
    seed: int = 1337
    device: str = Field(default="auto", description="auto | cpu | cuda | cuda:N")
    early_stopping_patience: int = Field(
        default=0, ge=0, description="evaluations without improvement before stopping; 0 = off"
    )
    max_bad_steps: int = Field(
        default=5, gt=0, description="consecutive non-finite losses tolerated (each skipped)"
    )
    progress: bool = Field(default=True, description="progress bar on an interactive console")
    sample_log: bool = Field(
        default=False,
        description="debugging aid: rank 0 appends each optimizer step's global sample ids"
        " (gathered from every rank) to samples.jsonl in the run directory; one collective"
        " per step",
    )

    @model_validator(mode="after")
    def _one_batch_knob(self) -> TrainingConfig:
        if self.global_batch_size is not None and "grad_accum_steps" in self.model_fields_set:
            raise ValueError(
                "training.grad_accum_steps and training.global_batch_size are both set: with"
                " global_batch_size the accumulation is derived per world size; unset one"
            )
        return self

    def accum_steps(self, world_size: int) -> int:
        """Micro-batches per optimizer step on `world_size` ranks (ValueError naming the
        fields when training.global_batch_size cannot be divided that way)."""
        if self.global_batch_size is None:
            return self.grad_accum_steps
        per = self.batch_size * world_size
        if self.global_batch_size % per:
            raise ValueError(
                f"training.global_batch_size={self.global_batch_size} is not divisible by"
                f" training.batch_size={self.batch_size} x world size {world_size} = {per}:"
                " choose a global batch that every allowed worker count divides"
            )
        return self.global_batch_size // per

    def for_world(self, world_size: int) -> TrainingConfig:
        """This config with grad_accum_steps resolved for `world_size` ranks."""
        return self.model_copy(update={"grad_accum_steps": self.accum_steps(world_size)})

    def sequences_per_step(self, world_size: int) -> int:
        """The global batch: sequences per optimizer step, all ranks."""
        return self.batch_size * self.accum_steps(world_size) * world_size


class OptimizationConfig(_Section):
    optimizer: Literal["adamw", "adamw8bit", "muon"] = Field(
        default="adamw",
        description="adamw; adamw8bit (bitsandbytes); muon: Muon for the attention and MLP"
        " matrices of the blocks, AdamW (lr, weight_decay, betas) for embeddings, LM head,"
        " norms and biases",
    )
    lr: float = Field(default=1e-3, gt=0, description="peak lr (of AdamW's parameters)")
    muon_lr: float = Field(
        default=0.02,
        gt=0,
        description="optimizer=muon: peak lr of the Muon matrices (scaled by"
        " sqrt(max(1, rows/cols)) as torch's Muon does; the schedule applies to it too)",
    )
    muon_momentum: float = Field(
        default=0.95, ge=0, lt=1, description="optimizer=muon: Muon's (Nesterov) momentum"
    )
    muon_weight_decay: float = Field(
        default=0.0,
        ge=0,
        description="optimizer=muon: decoupled weight decay of the Muon matrices (times the lr)",
    )
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    weight_decay: float = Field(default=0.1, ge=0)
    beta1: float = Field(default=0.9, ge=0, lt=1)
    beta2: float = Field(default=0.95, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = Field(default=50, ge=0)
    grad_clip: float = Field(default=1.0, ge=0, description="max grad norm; 0 = off")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32", description="autocast dtype; fp16 uses a grad scaler (GPU only)"
    )
    compile: bool = Field(default=False, description="torch.compile the model (see compile_scope)")
    compile_scope: Literal["auto", "model", "blocks"] = Field(
        default="auto",
        description="model: one graph (fastest steps, longer first compile); blocks: each"
        " block alone (short compiles, what FSDP needs); auto: blocks under FSDP or past"
        " 8 layers, else model",
    )
    compile_eval: bool = Field(
        default=False,
        description="evaluate through the compiled model too (a second compile, of the"
        " inference graph); off: evaluation runs the same modules eagerly, which costs less"
        " than that compile unless evaluation is a large share of the run",
    )
    activation_checkpointing: Literal["none", "full", "selective"] = Field(
        default="none",
        description="recompute block activations in backward to save memory: full = every"
        " block, selective = every other block (half the saving, half the recompute)",
    )
    router_bias_update_rate: float | None = Field(
        default=None,
        ge=0,
        description="MoE choice-bias balancing (DeepSeek-V3): bias += rate * sign(mean load -"
        " load) per step; None = 0.001 for models with model.router_choice_bias (off for"
        " LoRA/QLoRA, whose adapter is saved without the base's bias), else off",
    )
    peak_tflops: float = Field(
        default=0.0, ge=0, description="hardware peak for MFU; 0 = a measured default per device"
    )


class DistributedConfig(_Section):
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    strategy: Literal["ddp", "fsdp"] = "ddp"
    timeout_s: int = Field(default=600, gt=0)


class CheckpointConfig(_Section):
    run_dir: str = Field(default="runs/default", description="local directory or s3:// URI")
    interval: int = Field(default=500, gt=0, description="steps between checkpoints")
    keep_last: int = Field(default=2, gt=0)
    resume: bool = Field(default=True, description="continue from the newest committed checkpoint")
    format: Literal["auto", "full", "sharded"] = Field(
        default="auto",
        description="sharded: every rank writes its own shards (torch.distributed.checkpoint);"
        " full: rank 0 writes gathered weights; auto: sharded under FSDP, else full",
    )
    init_from: str | None = Field(
        default=None, description="start from these weights (our checkpoint or an HF directory)"
    )
    lease_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="another trainer on this run_dir is refused until its lease's heartbeat"
        " (every lease_timeout_s / 4) is this old; set LLM_JOB_ID so a restarted job takes"
        " its own lease over at once",
    )


class FinetuneConfig(_Section):
    """Adapters over a frozen base (`checkpoint.init_from`): LoRA, or QLoRA on an NF4 base."""

    method: Literal["none", "lora", "qlora"] = Field(
        default="none",
        description="none: train every weight; lora: adapters over the frozen base from"
        " checkpoint.init_from; qlora: the same over its linear layers quantized to NF4",
    )
    r: int = Field(default=8, gt=0, description="LoRA rank")
    alpha: float = Field(default=16.0, gt=0, description="LoRA scale numerator (scale = alpha / r)")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="dropout on the LoRA input")
    targets: tuple[str, ...] = Field(
        default=("all-linear",),
        description="module-name suffixes as PEFT's target_modules (q_proj, v_proj, ...);"
        " all-linear = every linear layer but lm_head",
    )
    save_merged: bool = Field(
        default=False,
        description="also write the merged weights (init_from + adapter) into the final"
        " checkpoint, so it serves without the adapter",
    )
    quant_backend: Literal["auto", "bitsandbytes", "torch"] = Field(
        default="auto", description="qlora's NF4 kernels: bitsandbytes where it runs, else torch"
    )
