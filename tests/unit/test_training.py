"""The training loop learns, checkpoints what it learned, and resumes exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tests.support import train_tiny

from llm.checkpoint import (
    MANIFEST,
    checkpoint_dir,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_trainer_state,
)
from llm.config import ModelConfig
from llm.training.optim import build_optimizer, build_scheduler, lr_factor
from llm.training.trainer import Trainer


def test_short_run_lowers_validation_loss(tiny_run: tuple[Path, Trainer]) -> None:
    run_dir, trainer = tiny_run
    first, last = trainer.history[0]["val_loss"], trainer.history[-1]["val_loss"]
    # An untrained model over ~106 characters scores ln(106) = 4.66; 300 steps reach ~1.9.
    assert last < 2.2, trainer.history
    assert last < first - 0.2, trainer.history
    assert math.isfinite(trainer.history[-1]["train_loss"])
    assert (run_dir / "loss.png").stat().st_size > 1000
    events = [json.loads(line)["event"] for line in (run_dir / "metrics.jsonl").open()]
    assert events.count("eval") == 3 and events.count("train") == 3
    assert list((run_dir / "tensorboard").iterdir())


def test_checkpoint_holds_the_trained_model(tiny_run: tuple[Path, Trainer]) -> None:
    run_dir, trainer = tiny_run
    ckpts = list_checkpoints(str(run_dir))
    assert [c.rsplit("-", 1)[-1] for c in ckpts] == ["00000200", "00000300"]  # keep_last=2
    loaded = load_checkpoint(str(run_dir))
    assert loaded.uri == ckpts[-1] and loaded.name == "tiny"
    state = load_trainer_state(loaded.uri)
    assert state["step"] == trainer.step == 300
    # The loaded model scores the validation windows as the trainer last measured them.
    trainer.model.load_state_dict(loaded.model.state_dict())
    assert abs(trainer.evaluate() - trainer.last_val_loss) < 1e-5


def test_resume_continues_exactly(tmp_path: Path) -> None:
    """A run that lost its last checkpoint resumes from step 40 and ends where 80 straight do."""
    every_40 = {"checkpoint": {"interval": 40}}
    straight = train_tiny(tmp_path / "straight", max_steps=80, **every_40)
    train_tiny(tmp_path / "resumed", max_steps=80, **every_40)
    # As if the job died while writing step 80: files there, manifest not yet.
    last = Path(checkpoint_dir(str(tmp_path / "resumed"), 80))
    (last / MANIFEST).unlink()
    assert latest_checkpoint(str(tmp_path / "resumed")).endswith("step-00000040")
    resumed = train_tiny(tmp_path / "resumed", max_steps=80, **every_40)
    assert resumed.step == 80
    a = load_checkpoint(str(tmp_path / "straight")).model.state_dict()
    b = load_checkpoint(str(tmp_path / "resumed")).model.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.history[-1] == straight.history[-1]


def test_optimizer_groups_and_schedule() -> None:
    from llm.models import DecoderModel

    model = DecoderModel(ModelConfig.from_preset("tiny"))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert all(p.dim() >= 2 for p in decay["params"]) and decay["weight_decay"] == 0.1
    assert all(p.dim() == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique  # tied weight counted once
    sched = build_scheduler(opt, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    lrs = []
    for _ in range(110):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == 1e-4 and abs(lrs[9] - 1e-3) < 1e-12  # linear warmup
    assert abs(lrs[60] - 0.55e-3) < 1e-5  # halfway down the cosine
    assert abs(sched.get_last_lr()[0] - 1e-4) < 1e-9  # floor at min_lr_ratio
    assert lr_factor(60, 10, 110, "linear", 0.1) == pytest.approx(0.55)
    assert lr_factor(60, 10, 110, "constant") == 1.0
    with pytest.raises(ValueError, match="schedule='cosin'"):
        build_scheduler(opt, 10, 110, "cosin")


def test_cpu_peak_for_mfu_is_measured_with_the_training_threads(monkeypatch) -> None:
    """torch's Timer defaults to one thread, which made MFU exceed 100% on two cores."""
    import torch.utils.benchmark as tub

    from llm.training.run import default_peak_flops

    seen = {}
    real_timer = tub.Timer

    def recording_timer(*args, **kwargs):
        seen["num_threads"] = kwargs.get("num_threads", 1)
        return real_timer(*args, **kwargs)

    monkeypatch.setattr(tub, "Timer", recording_timer)
    assert default_peak_flops(torch.device("cpu"), "fp32") > 0
    assert seen["num_threads"] == torch.get_num_threads()
