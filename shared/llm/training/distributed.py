"""Process-group set-up and the `apply_*` wrappers, applied from outside the model.

Order (torchtitan): `apply_activation_checkpointing` -> `apply_compile` (per block or
whole) -> `apply_ddp` or `apply_fsdp`.
The environment comes from `torchrun` (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT)
or from a Kubeflow PyTorchJob, which injects the same variables (and PET_* for torchrun).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(device_name: str, backend: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Join the process group when launched with WORLD_SIZE > 1; a no-op otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        store = _attempt_store(rank, world_size, timeout)
        dist.init_process_group(
            backend, store=store, rank=rank, world_size=world_size, timeout=timeout
        )
        log.info("rank %d/%d joined (%s, %s)", rank, world_size, backend, device)
    return DistInfo(rank, local_rank, world_size, device)


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """The rendezvous store, with keys private to this restart attempt.

    torchrun keeps one agent store for its whole life; a group restarted after a worker
    died would otherwise read the addresses its dead predecessors published there, and
    gloo waits on those dead peers forever (seen here as an intermittent hang).
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=not agent_store and rank == 0, timeout=timeout,
        multi_tenant=not agent_store,
    )  # fmt: skip
    return dist.PrefixStore(
        f"llm/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store
    )


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (picklable); itself without a process group. Decisions
    made once on rank 0 (which checkpoint to resume, whether a save may start) reach every
    rank, and an error there becomes an error everywhere instead of a hang at a collective."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; `[obj]` without a process group."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Average a host scalar over ranks (for logging: metrics agree on every rank)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def all_reduce_mean_(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks in place (and return it); itself when not distributed."""
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def apply_activation_checkpointing(model: nn.Module, mode: str) -> None:
    """Recompute blocks' activations in backward instead of keeping them (non-reentrant
    `torch.utils.checkpoint`, so it composes with compile and FSDP2/DDP applied after).

    full: every block keeps only its input (least memory, about one more forward per
    step); selective: every other block (0, 2, ...), torchtitan's layer-wise selective
    option: about half the saving for half the recompute. Gradients are unchanged.
    """
    if mode not in ("none", "full", "selective"):
        raise ValueError(f"activation_checkpointing={mode!r}: use none, full or selective")
    for i, block in enumerate(model.layers):
        block.activation_checkpointing = mode == "full" or (mode == "selective" and i % 2 == 0)


def apply_compile(model: nn.Module, scope: str = "blocks") -> None:
    """Compile in place. `blocks`: each transformer block alone (small graphs, one compile
    reused by every layer, the unit FSDP shards). `model`: the whole forward as one graph,
    so norms, embeddings and the head fuse too (on small models a step is ~15% faster than
    per block; the first compile takes longer)."""
    if scope == "model":
        model.compile()
        return
    for block in model.layers:
        block.compile()


def compile_scope(scope: str, n_layers: int, fsdp: bool) -> str:
    """`auto`: per block under FSDP (it shards by block) and on deep models (compile time
    grows with the graph), the whole model otherwise."""
    if scope != "auto":
        return scope
    return "blocks" if fsdp or n_layers > 8 else "model"


def apply_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def apply_fsdp(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: shard each block, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model
