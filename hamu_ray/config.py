"""The one pydantic schema for an unlearning job. Every error names the field (and the file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hamu_ray.rules import get_rule


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSection(Section):
    forget: str  # parquet or jsonl: a local path or any URI pyarrow's filesystems accept
    retain: str
    eval: str | None = None
    input_column: str = "x"  # list of floats per row
    label_column: str = "y"  # integer class per row
    retain_batch_size: int = Field(32, gt=0)  # per worker and step
    forget_batch_size: int = Field(32, gt=0)
    anchor: Literal["retain", "forget"] = "retain"  # its epochs define the run; the other cycles
    shuffle_seed: int | None = 0  # None: keep file order


class ModelSection(Section):
    kind: Literal["mlp"] = "mlp"
    sizes: list[int] = Field(min_length=2)  # [inputs, hidden..., classes]
    weights: str | None = None  # safetensors of the model to unlearn; read, never written


class MethodSection(Section):
    rule: str
    hparams: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _rule_exists(self) -> "MethodSection":
        get_rule(self.rule, **self.hparams)  # ValueError names the bad rule or hyper-parameter
        return self


class TrainSection(Section):
    lr: float = Field(gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    optimizer: Literal["SGD", "AdamW"] = "SGD"  # HAMU's guarantee is for plain SGD
    clip_norm: float | None = Field(None, gt=0)  # clips g_r and g_f each, before the rule
    zero_stage: Literal[0, 1, 2, 3] = 0
    bf16: bool = False
    seed: int = 0
    checkpoint_every: int | None = Field(None, gt=0)  # steps; None: only the final export
    fail_after_step: int | None = Field(None, gt=0)  # TEST ONLY: crash once after this step


class ClusterSection(Section):
    address: str | None = None  # None: $RAY_ADDRESS, else an embedded local Ray
    num_workers: int = Field(2, gt=0)
    cpus_per_worker: float = Field(0.5, gt=0)  # < 1 leaves Ray Data a CPU on small machines
    use_gpu: bool | Literal["auto"] = "auto"
    max_failures: int = Field(0, ge=0)  # worker-group restarts from the latest checkpoint


class UnlearnConfig(Section):
    data: DataSection
    model: ModelSection
    method: MethodSection
    train: TrainSection
    cluster: ClusterSection = ClusterSection()
    output_dir: str  # created by the run; must not exist yet (nothing is overwritten)

    @model_validator(mode="after")
    def _cross_checks(self) -> "UnlearnConfig":
        if self.train.fail_after_step and not self.train.checkpoint_every:
            raise ValueError("train.fail_after_step needs train.checkpoint_every to resume from")
        return self


class ConfigError(ValueError):
    """Every problem in one message, each line naming the file and the field."""


def load_config(path: str | Path) -> UnlearnConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the pipeline: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(raw, source=str(path))


def parse_config(raw: dict[str, Any], source: str = "<config>") -> UnlearnConfig:
    try:
        return UnlearnConfig.model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
                 + (f" (got {err['input']!r})" if err["type"] != "missing" else "")
                 for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None
