"""Training callbacks: everything around the loop that is not the loop.

Each hook receives the trainer; callbacks run on every rank and gate their own output on
`trainer.dist.is_main`. Files go to `trainer.local_dir` (the run directory itself when it is
local, a staging copy that `RunFiles` uploads when it is `s3://`).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import TYPE_CHECKING, Any

from llm import storage

if TYPE_CHECKING:
    from llm.training.trainer import Trainer

log = logging.getLogger(__name__)


class Callback:
    def on_train_start(self, trainer: Trainer) -> None: ...
    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, trainer: Trainer) -> None: ...  # just before it is written
    def on_train_end(self, trainer: Trainer) -> None: ...


class JsonlMetrics(Callback):
    """One JSON object per logged step and per evaluation in `metrics.jsonl`."""

    def __init__(self, log_interval: int) -> None:
        self.log_interval = log_interval

    def _write(self, trainer: Trainer, record: dict[str, Any]) -> None:
        if trainer.dist.is_main:
            with open(trainer.local_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def on_train_start(self, trainer: Trainer) -> None:
        self._write(
            trainer, {"event": "start", "step": trainer.step, "world_size": trainer.dist.world_size}
        )

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.step % self.log_interval == 0:
            self._write(trainer, {"event": "train", **metrics})

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._write(trainer, {"event": "eval", **metrics})


class ConsoleLogger(Callback):
    """Log lines for files and non-interactive consoles; a tqdm bar on a terminal."""

    def __init__(self, log_interval: int, progress: bool) -> None:
        self.log_interval, self.progress, self.bar = log_interval, progress, None

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main and self.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=trainer.max_steps, initial=trainer.step, unit="step", dynamic_ncols=True
            )

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if not trainer.dist.is_main:
            return
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                tok_s=f"{metrics.get('tokens_per_s', 0):.0f}",
            )  # fmt: skip
        elif trainer.step % self.log_interval == 0:
            log.info(
                "step %d/%d loss %.4f lr %.2e %.0f tok/s mfu %.1f%%",
                trainer.step, trainer.max_steps, metrics["loss"], metrics["lr"],
                metrics.get("tokens_per_s", 0), 100 * metrics.get("mfu", 0),
            )  # fmt: skip

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if trainer.dist.is_main:
            msg = f"step {trainer.step} val_loss {metrics['val_loss']:.4f} ppl {metrics['val_ppl']:.2f}"
            if "val_bits_per_byte" in metrics:
                msg += f" bpb {metrics['val_bits_per_byte']:.3f}"
            self.bar.write(msg) if self.bar is not None else log.info(msg)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class RunSummary(Callback):
    """One screen at the start (size, tokens per step, parallelism, where checkpoints go),
    then, `eta_after` steps in, the measured time per step and the time left."""

    def __init__(self, lines: list[str], eta_after: int = 5) -> None:
        self.lines, self.eta_after = lines, eta_after
        self.t0: float | None = None
        self.step0 = 0

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            steps = f"steps {trainer.step} -> {trainer.max_steps}"
            log.info("run summary\n  %s", "\n  ".join([*self.lines, steps]))

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.t0 is None:  # the clock starts after the first step (compile, warm-up)
            self.t0, self.step0 = time.perf_counter(), trainer.step
        elif trainer.step == self.step0 + self.eta_after and trainer.dist.is_main:
            per_step = (time.perf_counter() - self.t0) / self.eta_after
            left = trainer.max_steps - trainer.step
            log.info(
                "step %d: %.3f s/step, ETA %s for the remaining %d steps",
                trainer.step, per_step, _duration(per_step * left), left,
            )  # fmt: skip


def _duration(seconds: float) -> str:
    h, rest = divmod(int(seconds), 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class Throughput(Callback):
    """Tokens/s and model FLOPs utilisation (6N + attention FLOPs per token, PaLM appendix B)."""

    def __init__(self, flops_per_token: float, peak_flops: float) -> None:
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.t0 = self.tokens0 = None

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        if self.t0 is None:  # the first step includes compile/warm-up: start the clock after it
            self.t0, self.tokens0 = now, trainer.tokens_seen
            return
        dt = now - self.t0
        if dt > 0:
            tps = (trainer.tokens_seen - self.tokens0) / dt
            metrics["tokens_per_s"] = tps
            if self.peak_flops > 0:
                metrics["mfu"] = tps * self.flops_per_token / self.peak_flops


class LRMonitor(Callback):
    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        for i, group in enumerate(trainer.optimizer.param_groups):
            metrics[f"lr/group{i}"] = group["lr"]


class TensorBoard(Callback):
    def __init__(self, log_interval: int) -> None:
        self.log_interval, self.writer = log_interval, None

    def on_train_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(trainer.local_dir / "tensorboard"))

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.writer is not None and trainer.step % self.log_interval == 0:
            for k, v in metrics.items():
                if k != "step" and math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, trainer.step)

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            for k in ("val_loss", "val_ppl", "val_bits_per_byte"):
                if k in metrics and math.isfinite(metrics[k]):
                    self.writer.add_scalar(
                        f"val/{k.removeprefix('val_')}", metrics[k], trainer.step
                    )
            self.writer.flush()

    def on_train_end(self, trainer: Trainer) -> None:
        if self.writer is not None:
            self.writer.close()


class LossPlot(Callback):
    """`loss.png`: train and validation loss, redrawn from metrics.jsonl at each evaluation."""

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if not trainer.dist.is_main:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train, val = ([], []), ([], [])
        with open(trainer.local_dir / "metrics.jsonl") as f:
            for line in f:
                r = json.loads(line)
                if r.get("event") == "train":
                    train[0].append(r["step"]), train[1].append(r["loss"])
                elif r.get("event") == "eval":
                    val[0].append(r["step"]), val[1].append(r["val_loss"])
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(*train, label="train", alpha=0.7)
        ax.plot(*val, "o-", label="validation")
        ax.set_xlabel("step"), ax.set_ylabel("loss"), ax.legend(), ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(trainer.local_dir / "loss.png", dpi=100)
        plt.close(fig)


class EarlyStopping(Callback):
    def __init__(self, patience: int) -> None:
        self.patience, self.best, self.bad = patience, math.inf, 0

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        if metrics["val_loss"] < self.best:
            self.best, self.bad = metrics["val_loss"], 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                log.info("early stopping: no improvement in %d evaluations", self.patience)
                trainer.should_stop = True


class SampleLog(Callback):
    """Debugging aid (`training.sample_log`): which samples each optimizer step trained on.

    Rank 0 appends `{"step", "world_size", "ids"}` per step to `samples.jsonl`: the ids of
    the rows every rank's micro-batches held, gathered in rank order (pretraining: window
    starts in the token stream; sft: packed row indices), so a run resumed at another world
    size can be checked to train on the same global batches. One all_gather per step.
    """

    def on_train_start(self, trainer: Trainer) -> None:
        if not hasattr(trainer.data, "consumed"):
            raise ValueError("training.sample_log: this data module does not record sample ids")
        trainer.data.consumed = []

    def on_step_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        from llm.training.distributed import all_gather_object

        ids, trainer.data.consumed = trainer.data.consumed, []
        gathered = all_gather_object(ids)
        if trainer.dist.is_main:
            record = {"step": trainer.step, "world_size": trainer.dist.world_size,
                      "ids": [i for rank_ids in gathered for i in rank_ids]}  # fmt: skip
            with open(trainer.local_dir / "samples.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")


class RunFiles(Callback):
    """Mirror metrics.jsonl, loss.png and TensorBoard events to a remote run directory.

    Runs first: on start it fetches the metrics an earlier attempt of the job wrote, so a
    restarted job appends to the same history instead of replacing it.
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def on_train_start(self, trainer: Trainer) -> None:
        remote = storage.join(self.run_dir, "metrics.jsonl")
        if trainer.dist.is_main and storage.exists(remote):
            (trainer.local_dir / "metrics.jsonl").write_bytes(storage.read_bytes(remote))

    def _sync(self, trainer: Trainer) -> None:
        if not trainer.dist.is_main:
            return
        for path in sorted(trainer.local_dir.rglob("*")):
            if path.is_file():
                rel = path.relative_to(trainer.local_dir).as_posix()
                storage.write_bytes(storage.join(self.run_dir, rel), path.read_bytes())

    def on_eval(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        self._sync(trainer)

    def on_checkpoint(self, trainer: Trainer) -> None:
        # Before the commit: whoever sees the checkpoint also sees the metrics that led to it.
        self._sync(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        self._sync(trainer)
