"""Trainer settings: CLI > env > YAML > defaults, every field reachable, errors name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm.settings import ModelSection, TrainerSettings, load_settings, sources_of
from llm_trainer.cli import main, parse_args


@pytest.fixture
def yaml_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  preset: tiny\n  dim: 48\ntraining:\n  max_steps: 3\n  batch_size: 5\n"
        "optimization:\n  lr: 0.01\n"
    )
    return path


def test_precedence_cli_over_env_over_yaml(
    yaml_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLM_TRAINING__MAX_STEPS", "7")
    monkeypatch.setenv("LLM_OPTIMIZATION__LR", "0.02")
    cli, config, _ = parse_args(["--config", str(yaml_file), "--optimization.lr", "0.5"])
    s = load_settings(cli, config)
    assert s.optimization.lr == 0.5  # cli
    assert s.training.max_steps == 7  # env over yaml
    assert s.training.batch_size == 5  # yaml over default
    assert s.model.preset == "tiny" and s.model.dim == 48
    assert s.training.block_size == 128  # default
    assert sources_of(cli, config) == {
        "optimization.lr": "cli", "training.max_steps": "env", "model.preset": "yaml",
        "model.dim": "yaml", "training.batch_size": "yaml",
    }  # fmt: skip


def test_every_model_field_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from llm.config import ModelConfig

    assert set(ModelConfig.model_fields) <= set(ModelSection.model_fields)
    monkeypatch.setenv("LLM_MODEL__N_LAYERS", "3")
    cfg = TrainerSettings().model.build(vocab_size=99)
    assert cfg.n_layers == 3 and cfg.vocab_size == 99 and cfg.dim == 192  # rest from "small"


def test_print_config_names_sources(
    yaml_file: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("LLM_TRAINING__SEED", "42")
    assert main(["--config", str(yaml_file), "--training.max-steps", "9", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "  max_steps: 9  # cli" in out
    assert "  seed: 42  # env LLM_TRAINING__SEED" in out
    assert "  batch_size: 5  # yaml" in out
    assert "  block_size: 128  # default" in out


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        (["--optimization.lr", "-1"], {}, "optimization.lr: Input should be greater than 0"),
        (
            ["--training.max-steps", "ten"],
            {},
            "training.max_steps: Input should be a valid integer",
        ),
        ([], {"LLM_TRAINING__BATCH_SIZE": "0"}, "training.batch_size"),
        ([], {"LLM_OPTIMIZATION__SCHEDULE": "cosin"}, "optimization.schedule"),
        ([], {"LLM_TRAINING__NOPE": "1"}, "training.nope"),
        (["--config", "/nonexistent.yaml"], {}, "/nonexistent.yaml: config file not found"),
    ],
)
def test_invalid_values_exit_2_naming_the_field(
    argv: list[str], env: dict[str, str], expected: str, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(argv) == 2
    assert expected in capsys.readouterr().err


def test_global_batch_size_derives_the_accumulation_per_world_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLM_TRAINING__GLOBAL_BATCH_SIZE", "24")
    s = load_settings({"training": {"batch_size": 2}})
    t = s.training
    assert [t.accum_steps(w) for w in (1, 2, 3, 4)] == [12, 6, 4, 3]
    assert t.for_world(3).grad_accum_steps == 4
    for world in (1, 2, 3, 4):  # the data library sees the same global batch at every size
        cfg = s.data_config(world)
        assert (cfg.global_batch_size, cfg.micro_batch_size) == (24, 2)
    with pytest.raises(ValueError, match=r"training.global_batch_size=24 is not divisible by"
                       r" training.batch_size=2 x world size 5 = 10"):  # fmt: skip
        t.accum_steps(5)
    # Unset: today's product, with the accumulation as configured.
    monkeypatch.delenv("LLM_TRAINING__GLOBAL_BATCH_SIZE")
    s = load_settings({"training": {"batch_size": 2, "grad_accum_steps": 3}})
    assert s.training.accum_steps(4) == 3 and s.data_config(4).global_batch_size == 24
    assert s.data_config(4).micro_batch_size == 2


def test_global_batch_size_and_grad_accum_steps_exclude_each_other(capsys) -> None:
    argv = ["--training.global-batch-size", "8", "--training.grad-accum-steps", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "training.grad_accum_steps and training.global_batch_size are both set" in err
