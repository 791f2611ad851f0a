"""The schema of one unlearning job: what the engine needs. Every error names the field (and the file)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from hamu_ray.objectives import METHODS, Method, check_objective_params
from hamu_ray.rules import get_rule
from hamu_ray.rules.surgery import ImplicitSurgeryParams
from hamu_ray.schema import ConfigError, Section, load, validate  # noqa: F401 (ConfigError re-exported)

# Forget objectives whose gradient is zero at the original model, and why. Under such an
# objective only a rule that also steps along g_r leaves the start; the others stop at step 1
# (hamu-q: infeasible) or take zero steps forever (surgery, ga, gru).
ZERO_FORGET_GRADIENT_AT_START = {
    "kl": "KL to the teacher, the original itself, is at its minimum there",
}
MOVES_WITHOUT_FORGET_GRADIENT = ("gdiff", "pcgrad", "hamu-u", "ft")


class DataSection(Section):
    forget: str | None  # parquet or jsonl, a local path or a URI; None: plain training on retain
    retain: str
    eval: str | None = None
    input_column: str = "x"  # list of floats per row
    label_column: str = "y"  # integer class per row
    retain_batch_size: int = Field(32, gt=0)  # per worker and step
    forget_batch_size: int = Field(32, gt=0)
    anchor: Literal["retain", "forget"] = "retain"  # its epochs define the run; the other cycles
    shuffle_seed: int | None = 0  # None: keep file order


class ModelSection(Section):
    kind: Literal["mlp", "cnn"] = "mlp"  # hamu_ray.models.MODELS
    sizes: list[int] = Field(min_length=2)  # mlp: [inputs, hidden..., classes]; cnn: [inputs, classes]
    channels: list[int] = Field(default_factory=lambda: [16, 32])  # cnn: one residual block each
    weights: str | None = None  # safetensors of the model to unlearn; read, never written

    @model_validator(mode="after")
    def _shape(self) -> "ModelSection":
        if self.kind == "cnn":
            side = round(self.sizes[0] ** 0.5)
            if side * side != self.sizes[0] or len(self.sizes) != 2 or not self.channels:
                raise ValueError("a cnn takes square images: sizes [side², classes] and channels "
                                 f"[c1, ...]; got sizes {self.sizes}, channels {self.channels}")
        return self


class MethodSection(Section):
    name: str  # a method of hamu_ray.objectives.METHODS: a rule with its two objectives
    rule: str | None = None  # another rule for the method's objectives (e.g. npo with hamu-q)
    hparams: dict[str, Any] = Field(default_factory=dict)  # the rule's (or implicit surgery's)
    objective: dict[str, Any] = Field(default_factory=dict)  # objective hyper-parameters (beta, ...)

    @model_validator(mode="after")
    def _method_exists(self) -> "MethodSection":
        if self.name not in METHODS:
            raise ValueError(f"unknown method {self.name!r}; valid methods: {', '.join(METHODS)}")
        if self.spec.implicit:
            if self.rule is not None:
                raise ValueError(f"{self.name} is one-backprop and takes no rule")
            try:
                ImplicitSurgeryParams(**self.hparams)  # ValueError names the bad value
            except TypeError as exc:  # an unknown keyword
                raise ValueError(f"{self.name}: {exc}; valid: epsilon, dual_lr, initial_weight, "
                                 "fast") from None
        else:
            self._check_rule()
        check_objective_params(self.spec, self.objective)
        return self

    def _check_rule(self) -> None:
        try:  # ValueError names the bad rule or hyper-parameter
            get_rule(self.rule_name, **self.hparams)
        except TypeError as exc:  # a required hyper-parameter is missing: pydantic would not
            # turn a TypeError into a field error, so it would escape as a traceback
            raise ValueError(f"rule {self.rule_name}: {exc}") from None
        reason = ZERO_FORGET_GRADIENT_AT_START.get(self.spec.forget)
        if reason and self.rule_name not in MOVES_WITHOUT_FORGET_GRADIENT:
            raise ValueError(
                f"{self.name} cannot run under rule {self.rule_name}: its forget objective "
                f"({self.spec.forget}) has a zero gradient at the original model ({reason}), and "
                f"{self.rule_name} has nothing to move along; valid rules for {self.name}: "
                f"{', '.join(MOVES_WITHOUT_FORGET_GRADIENT)}")

    @property
    def spec(self) -> Method:
        return METHODS[self.name]

    @property
    def rule_name(self) -> str | None:
        return self.rule or self.spec.rule


class TrainSettings(Section):
    """Optimisation settings of one training or unlearning stage (a pipeline's train/unlearn)."""
    lr: float = Field(gt=0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0)
    optimizer: Literal["SGD", "AdamW"] = "SGD"  # HAMU's guarantee is for plain SGD
    clip_norm: float | None = Field(None, gt=0)  # clips g_r and g_f each, before the rule
    zero_stage: Literal[0, 1, 2, 3] = 0
    bf16: bool = False
    checkpoint_every: int | None = Field(None, gt=0)  # steps; None: only the final export
    progress_every: int = Field(50, gt=0)  # the driver prints a progress line every so many steps


class TrainSection(TrainSettings):
    """A job's train section: a stage's settings plus what only a single job sets."""
    seed: int = 0
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
        if self.data.forget is None and self.method.name != "ft":
            raise ValueError(f"data.forget is missing: method {self.method.name} needs a forget set "
                             "(only ft trains on the retain set alone)")
        return self



def load_config(path: str | Path, overrides: Sequence[str] = ()) -> UnlearnConfig:
    return load(path, overrides, UnlearnConfig)


def parse_config(raw: dict[str, Any], source: str = "<config>", schema: type[Section] | None = None):
    """A job from a YAML mapping (or, with `schema`, another section)."""
    return validate(raw, source, schema or UnlearnConfig)
