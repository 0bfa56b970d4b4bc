"""`llm-train`: the trainer job's entrypoint (plain, under torchrun, or in a PyTorchJob).

Every setting is a field of `llm.settings.TrainerSettings`, settable as a flag
(`--optimization.lr 3e-4`), an environment variable (`LLM_OPTIMIZATION__LR=3e-4`) or in a
YAML file (`--config run.yaml`); precedence CLI > env > YAML > defaults. The flags come
from the settings as every service's do (`llm_common.cli`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Any

from pydantic import Field, ValidationError

from llm.settings import TrainerSettings, load_settings, sources_of
from llm_common.cli import format_errors, parse_flags

log = logging.getLogger("llm_trainer")


class TrainCli(TrainerSettings):
    """llm-train: train a decoder model and write committed checkpoints to the run directory."""

    config: str | None = Field(default=None, description="YAML file with any of the sections below")
    print_config: bool = Field(default=False, description="print the resolved settings and exit")


def parse_args(argv: list[str]) -> tuple[dict[str, Any], str | None, bool]:
    parsed = parse_flags(TrainCli, argv, "llm-train", TrainCli.__doc__ or "")
    config = parsed.pop("config", None)
    print_config = bool(parsed.pop("print_config", False))
    return parsed, config, print_config


def render_config(settings: TrainerSettings, sources: dict[str, str]) -> str:
    """YAML of the resolved settings, each value annotated with where it came from."""
    env_name = lambda key: "LLM_" + key.upper().replace(".", "__")  # noqa: E731
    out = []
    for section, values in settings.model_dump(mode="json").items():
        out.append(f"{section}:")
        for name, value in values.items():
            key = f"{section}.{name}"
            origin = sources.get(key, "default")
            note = f"env {env_name(key)}" if origin == "env" else origin
            out.append(f"  {name}: {json.dumps(value)}  # {note}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["submit"]:  # llm-train submit: the same settings, as a PyTorchJob
        from llm_trainer import submit

        return submit.main(argv[1:])
    logging.basicConfig(
        level=os.environ.get("LLM_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        cli, config, print_config = parse_args(argv)
        settings = load_settings(cli, config)
    except ValidationError as e:
        print(f"llm-train: {format_errors(TrainerSettings, e)}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"llm-train: error: {e}", file=sys.stderr)
        return 2
    if print_config:
        print(render_config(settings, sources_of(cli, config)))
        return 0
    return train(settings)


def train(settings: TrainerSettings) -> int:
    from llm.training.data import build_data
    from llm.training.distributed import destroy_distributed, init_distributed
    from llm.training.run import preflight, run_training

    t = settings.training
    info = init_distributed(t.device, settings.distributed.backend, settings.distributed.timeout_s)
    try:
        try:
            preflight(settings, info.device)
            tok, data = build_data(settings, info.rank, info.world_size)
            settings.model.build(vocab_size=tok.vocab_size)  # fail now on a bad model config
        except (ValueError, FileNotFoundError, ValidationError) as e:
            print(f"llm-train: error: {e}", file=sys.stderr)
            return 2
        engine = run_training(settings, tok, data, info)
    finally:
        destroy_distributed()
    if info.is_main:
        summary = {"event": "train_done", "run_dir": settings.checkpoint.run_dir, "step": engine.step,
                   **engine.eval_metrics(engine.last_val_loss),
                   "skipped_steps": engine.skipped_steps}  # fmt: skip
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
