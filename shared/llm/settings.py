"""pydantic-settings roots: every field from env `LLM_<SECTION>__<FIELD>`, YAML, or CLI flags.

Precedence: CLI > environment > YAML file > defaults. `resolved_with_sources` reports
where each value came from (`llm-train --print-config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from llm.config import ModelConfig
from llm.data.datamodule import DataConfig
from llm.training.config import (
    CheckpointConfig,
    DistributedConfig,
    FinetuneConfig,
    OptimizationConfig,
    TrainingConfig,
)


class _ModelBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    preset: str = "small"

    def build(self, **defaults: Any) -> ModelConfig:
        """The preset with every field that was set here overriding it (and `defaults` under them)."""
        overrides = {k: v for k, v in self.model_dump(exclude={"preset"}).items() if v is not None}
        return ModelConfig.from_preset(self.preset, **{**defaults, **overrides})


# Every ModelConfig field as an optional override of the preset, so the section follows
# ModelConfig as it grows (LLM_MODEL__DIM=1024, --model.dim 1024).
ModelSection = create_model(
    "ModelSection",
    __base__=_ModelBase,
    **{
        name: (field.annotation | None, Field(default=None, description=field.description))
        for name, field in ModelConfig.model_fields.items()
    },
)


class _DataBase(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    source: str = Field(
        default="default",
        description="lm: text file or directory ('default' = Python's docs); sft: chat JSONL;"
        " tokenized at start-up (use data.dataset_path for data prepared by `llm-data prepare`)",
    )
    tokenizer: str = Field(
        default="char",
        description="'char' (fitted to data.source, or the one saved with data.dataset_path's"
        " shards) or a tokenizer / checkpoint directory",
    )

    def to_data_config(self, training: TrainingConfig, world_size: int = 1) -> DataConfig:
        """The data library's config: the fields here plus those the training section owns."""
        values = self.model_dump(exclude={"source", "tokenizer", "dataset_path"})
        return DataConfig(
            **values,
            dataset_path=self.dataset_path or self.source,
            task="sft" if training.task == "sft" else "pretrain",
            seq_len=training.block_size,
            global_batch_size=training.sequences_per_step(world_size),
            micro_batch_size=training.batch_size,
            seed=training.seed,
            max_val_batches=training.eval_batches,
        )


# The data library's `DataConfig`, less what the training section already sets (task,
# seq_len = training.block_size, global batch = training.global_batch_size or batch_size x
# grad_accum_steps x ranks, micro-batch = training.batch_size, seed, validation batches =
# training.eval_batches), so `--data.sampling shuffled` etc. follow
# DataConfig as it grows; `dataset_path` becomes optional next to `source`.
_OWNED_BY_TRAINING = {
    "task", "seq_len", "global_batch_size", "micro_batch_size", "seed", "max_val_batches"
}  # fmt: skip
DataSection = create_model(
    "DataSection",
    __base__=_DataBase,
    dataset_path=(
        str | None,
        Field(default=None, description=DataConfig.model_fields["dataset_path"].description),
    ),
    **{
        name: (field.annotation, field)
        for name, field in DataConfig.model_fields.items()
        if name not in _OWNED_BY_TRAINING | {"dataset_path", "tokenizer_path", "val_fraction"}
    },
    # The trainer has always held out 10% (the library's default is 5%): small corpora
    # keep a validation split worth measuring, and earlier runs keep their meaning.
    val_fraction=(float, Field(default=0.1, gt=0, lt=1)),
)


class TrainerSettings(BaseSettings):
    """Everything `llm-train` reads."""

    model_config = SettingsConfigDict(
        env_prefix="LLM_", env_nested_delimiter="__", extra="forbid", frozen=True,
        nested_model_default_partial_update=True,
    )  # fmt: skip
    yaml_file: ClassVar[Path | None] = None

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    optimization: OptimizationConfig = Field(default_factory=OptimizationConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)

    def data_config(self, world_size: int = 1) -> DataConfig:
        """The data library's `DataConfig` for a run on `world_size` ranks."""
        return self.data.to_data_config(self.training, world_size)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (the parsed CLI) > env > YAML > defaults
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if cls.yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=cls.yaml_file))
        return tuple(sources)


def load_settings(
    cli: dict[str, Any] | None = None, yaml_file: str | Path | None = None
) -> TrainerSettings:
    """Resolve settings from CLI values (nested dict), the environment and a YAML file."""
    if yaml_file is not None and not Path(yaml_file).is_file():
        raise FileNotFoundError(f"{yaml_file}: config file not found")
    settings_cls = type("TrainerSettingsFromFile", (TrainerSettings,), {})
    settings_cls.yaml_file = Path(yaml_file) if yaml_file is not None else None
    return settings_cls(**(cli or {}))


def sources_of(
    cli: dict[str, Any] | None = None, yaml_file: str | Path | None = None
) -> dict[str, str]:
    """`section.field` -> "cli" | "env" | "yaml" for every value not left at its default."""
    found: dict[str, str] = {}

    def walk(tree: dict[str, Any], origin: str, prefix: str = "") -> None:
        for k, v in tree.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(v, origin, key + ".")
            else:
                found.setdefault(key, origin)

    walk(cli or {}, "cli")
    walk(EnvSettingsSource(TrainerSettings)(), "env")
    if yaml_file is not None:
        walk(YamlConfigSettingsSource(TrainerSettings, yaml_file=Path(yaml_file))(), "yaml")
    return found
