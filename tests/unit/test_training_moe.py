"""MoE training: the router's balancing losses reach the gradients (with accumulation and the
NaN guard), are logged apart from the LM loss, stay out of evaluation, and balance experts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.support import CPU, tiny_settings
from tests.unit.test_trainer_data import train
from tests.unit.test_trainer_paths import FAST, SMALL, nan_on

from llm.models.decoder import DecoderModel
from llm.training.data import build_data
from llm.training.trainer import Trainer, causal_lm_loss

# One MoE layer of 4 experts (top-2), small enough for hundreds of steps in seconds.
MOE = {"preset": "tiny-moe", "dim": 32, "n_layers": 1}


# DeepSeek-V3 routing: sigmoid scores and a choice bias, balanced without an aux loss.
DEEPSEEK = {**MOE, "router_order": "sigmoid_topk", "router_choice_bias": True,
            "router_aux_loss_coef": 0.0, "router_z_loss_coef": 0.0}  # fmt: skip


def _trainer(tmp_path: Path, accum: int, model: dict[str, Any] = MOE) -> Trainer:
    """A real trainer and data module; plain SGD at lr 1 so a step moves params by -grad."""
    training = {**SMALL, "grad_accum_steps": accum}
    settings = tiny_settings(tmp_path, 1, model=model, training=training)
    tok, data = build_data(settings)
    torch.manual_seed(0)
    model = DecoderModel(settings.model.build(vocab_size=tok.vocab_size, max_seq_len=64))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    o = settings.optimization.model_copy(update={"grad_clip": 0.0})
    return Trainer(model, opt, sched, data, settings.training, o, CPU, tmp_path)


def test_train_step_adds_the_aux_loss_over_accumulated_micro_batches(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, accum=2)
    model, data = trainer.model, trainer.data
    assert model.config.router_aux_loss_coef > 0 and model.config.router_z_loss_coef > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data_state = data.state_dict()
    metrics = trainer.train_step()

    # By hand: the mean over the two micro-batches of LM loss + aux_loss(), one SGD step.
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(before)
    data.load_state_dict(data_state)
    lms, auxes, loads = [], [], []
    for _ in range(2):
        lm = causal_lm_loss(model, data.next_batch())
        aux = model.aux_loss()
        ((lm + aux) / 2).backward()
        lms.append(lm.item()), auxes.append(aux.item()), loads.append(model.expert_load())
    with torch.no_grad():
        for name, p in model.named_parameters():
            torch.testing.assert_close(after[name], p - p.grad, msg=name)
    assert metrics["loss"] == pytest.approx(sum(lms) / 2, rel=1e-5)  # the LM part alone
    assert metrics["aux_loss"] == pytest.approx(sum(auxes) / 2, rel=1e-5) and auxes[0] > 0
    load = sum(loads) / 2  # (1 layer, 4 experts), summing to top_k = 2
    assert metrics["expert_load_max"] == pytest.approx((load.max() / load.mean()).item())


def test_evaluation_is_the_pure_lm_loss(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, accum=1)
    model = trainer.model.eval()
    batches = list(trainer.data.val_batches())
    with torch.no_grad():
        lm = [causal_lm_loss(model, b).item() for b in batches]
    assert model.aux_loss().item() > 0
    assert trainer.evaluate() == pytest.approx(sum(lm) / len(lm), rel=1e-6)


def test_nan_guard_holds_for_moe(tmp_path: Path) -> None:
    trainer = train(
        tmp_path, 6, nan_on({2, 3}), model=MOE, training={**SMALL, "eval_interval": 6},
        optimization=FAST, checkpoint={"interval": 6},
    )  # fmt: skip
    assert trainer.step == 6 and trainer.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def _val_balance(trainer: Trainer) -> float:
    """max over MoE layers of (busiest expert's share / mean share) on the validation set."""
    model = trainer.model.eval()
    with torch.no_grad():
        loads = [
            (model(b["input_ids"]), model.expert_load())[1] for b in trainer.data.val_batches()
        ]
    load = torch.stack(loads).mean(0)
    return (load.amax(-1) / load.mean(-1)).max().item()


@pytest.mark.slow
def test_aux_loss_balances_the_experts(tmp_path: Path) -> None:
    """The same run with the balancing losses and with their coefficients at 0: only the
    first ends balanced (measured on the validation windows; 1.0 = even, 2.0 = two experts
    take every token). The coefficient is 10x the preset's so that 200 steps show it
    whatever the seed; the preset's 0.01 moves the same way, more slowly."""
    steps = 200
    runs: dict[str, Any] = {}
    for name, coef in (("with", 0.1), ("without", 0.0)):
        z = {"router_z_loss_coef": 0.0} if coef == 0 else {}
        trainer = train(
            tmp_path / name, steps, model={**MOE, "router_aux_loss_coef": coef, **z},
            training={**SMALL, "batch_size": 8, "eval_interval": steps, "log_interval": 50},
            optimization={**FAST, "lr": 3e-3, "warmup_steps": 20},
            checkpoint={"interval": steps},
        )  # fmt: skip
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
        runs[name] = (_val_balance(trainer), [r for r in records if r["event"] == "train"])
    (with_aux, logged_with), (without, logged_without) = runs["with"], runs["without"]
    assert with_aux < 1.45 and without > with_aux + 0.3, (with_aux, without)
    assert len(logged_with) == 4
    assert all(r["aux_loss"] > 0 and 1 <= r["expert_load_max"] <= 2 for r in logged_with)
    assert all(r["aux_loss"] == 0 for r in logged_without)
    assert list((tmp_path / "with" / "tensorboard").iterdir())


def test_dense_models_log_no_router_metrics(tmp_path: Path) -> None:
    trainer = train(
        tmp_path, 2, training={**SMALL, "eval_interval": 2}, optimization=FAST,
        checkpoint={"interval": 2},
    )  # fmt: skip
    assert trainer.moe is None
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    assert record["event"] == "train" and "aux_loss" not in record


def test_choice_bias_moves_toward_the_mean_load(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, accum=1, model=DEEPSEEK)
    assert trainer.bias_update_rate == 0.001  # on by default for choice-bias routing
    bias = trainer.model.layers[0].mlp.e_score_correction_bias
    assert torch.all(bias == 0)
    trainer.train_step()
    load = trainer.model.expert_load()[0]  # the step's only forward
    assert not torch.all(load == load.mean())
    torch.testing.assert_close(bias, 0.001 * torch.sign(load.mean() - load))
    assert _trainer(tmp_path / "moe", accum=1).bias_update_rate == 0.0  # softmax routing: off


@pytest.mark.slow
def test_choice_bias_balances_the_experts(tmp_path: Path) -> None:
    """DeepSeek-V3 routing with no aux loss: the bias update alone evens the load out."""
    balance = {}
    for rate in (0.01, 0.0):
        trainer = train(
            tmp_path / str(rate), 200, model=DEEPSEEK,
            training={**SMALL, "batch_size": 8, "eval_interval": 200, "log_interval": 50},
            optimization={**FAST, "lr": 3e-3, "warmup_steps": 20,
                          "router_bias_update_rate": rate},
            checkpoint={"interval": 200},
        )  # fmt: skip
        balance[rate] = _val_balance(trainer)
    assert balance[0.01] < 1.3 and balance[0.0] > balance[0.01] + 0.4, balance


def test_lora_fine_tunes_leave_the_router_bias_alone(tmp_path: Path) -> None:
    """An adapter is saved without the base's buffers: a LoRA run must not move the choice
    bias (the served base + adapter would route differently from the trained model)."""
    from tests.support import shrink, train_tiny

    from llm.checkpoint import load_checkpoint
    from llm.settings import load_settings
    from llm.training.run import run_training

    base_dir = tmp_path / "base"
    v3 = {**shrink("deepseek-v2-lite"), "preset": "deepseek-v2-lite", "shared_expert_hidden_dim": 48,
          "router_order": "sigmoid_topk", "router_choice_bias": True,
          "router_group_score": "top2_sum", "router_n_groups": 2, "router_topk_groups": 1}  # fmt: skip
    v3.pop("vocab_size"), v3.pop("max_seq_len")
    train_tiny(base_dir, 4, model=v3, checkpoint={"interval": 4})  # a deepseek_v3 base

    def lora(run: str, **optimization: float) -> Trainer:
        raw = tiny_settings(tmp_path / run, 4).model_dump(exclude={"model"})
        raw["finetune"] = {"method": "lora"}
        raw["checkpoint"]["init_from"] = str(base_dir)
        raw["optimization"].update(optimization)
        settings = load_settings(raw)
        tok, data = build_data(settings)
        return run_training(settings, tok, data, CPU)

    trainer = lora("lora")
    assert trainer.bias_update_rate == 0.0
    moved = [b for n, b in trainer.model.named_buffers() if n.endswith("e_score_correction_bias")]
    saved = load_checkpoint(str(base_dir)).model.named_buffers()
    want = [b for n, b in saved if n.endswith("e_score_correction_bias")]
    assert want and all(torch.equal(a, b) for a, b in zip(moved, want, strict=True))
    with pytest.raises(ValueError, match=r"router_bias_update_rate with finetune\.method=lora"):
        lora("lora2", router_bias_update_rate=0.01)
