"""The one pydantic schema for an unlearning job. Every error names the field (and the file)."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hamu_ray.errors import UserError
from hamu_ray.objectives import METHODS, Method, check_objective_params
from hamu_ray.rules import get_rule
from hamu_ray.rules.surgery import ImplicitSurgeryParams

# Forget objectives whose gradient is zero at the original model, and why. Under such an
# objective only a rule that also steps along g_r leaves the start; the others stop at step 1
# (hamu-q: infeasible) or take zero steps forever (surgery, ga, gru).
ZERO_FORGET_GRADIENT_AT_START = {
    "kl": "KL to the teacher, the original itself, is at its minimum there",
}
MOVES_WITHOUT_FORGET_GRADIENT = ("gdiff", "pcgrad", "hamu-u", "ft")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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


StageTrain = TrainSettings  # the name pipeline.py and tune.py import


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


class ConfigError(UserError, ValueError):
    """Every problem in one message, each line naming the file and the field."""


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> UnlearnConfig:
    return parse_config(apply_overrides(read_yaml(path), overrides, str(path)), source=str(path))


def load_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    raw = apply_overrides(read_yaml(path), overrides, str(path))
    return parse_config(raw, source=str(path), schema=PipelineConfig)


def config_kind(raw: dict[str, Any], source: str) -> Literal["pipeline", "job"]:
    """Which schema a YAML mapping is for, by its top-level keys."""
    if "methods" in raw:
        return "pipeline"
    if "method" in raw and "output_dir" in raw:
        return "job"
    raise ConfigError(f"{source}: neither a pipeline (it has methods:) nor a job (it has method: "
                      "and output_dir:)")


# ---- KEY=VALUE overrides (`hamu-ray run p.yaml unlearn.lr=0.02 methods.0.hparams.constraint=0.1`)

def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], source: str) -> dict[str, Any]:
    """A copy of `raw` with each dotted path set to its YAML-parsed value. Integers index lists;
    a missing (or null) mapping key is created, and the schema then judges what was made."""
    merged = copy.deepcopy(raw)
    for override in overrides:
        keys, value = parse_override(override, source)
        node = merged
        for depth, key in enumerate(keys[:-1]):
            node = step_into(node, key, keys[:depth + 1], override, source)
        set_key(node, keys[-1], value, override, source)
    return merged


def parse_override(override: str, source: str) -> tuple[list[str], Any]:
    path, sep, text = override.partition("=")
    keys = path.strip().split(".")
    if not sep or not all(keys):
        raise ConfigError(f"{source}: override {override!r}: expected KEY=VALUE with a dotted key, "
                          "e.g. unlearn.lr=0.02 or methods.0.hparams.constraint=0.1")
    try:
        return keys, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        problem = str(exc).replace("\n", " ")
        raise ConfigError(f"{source}: override {override!r}: the value is not YAML: {problem}") from None


def step_into(node: Any, key: str, walked: list[str], override: str, source: str) -> Any:
    if isinstance(node, dict):
        if node.get(key) is None:  # absent or null: a new mapping
            node[key] = {}
        child = node[key]
    else:
        child = node[list_index(node, key, override, source)]
    if not isinstance(child, (dict, list)):
        raise ConfigError(f"{source}: override {override!r}: {'.'.join(walked)} is {child!r}, "
                          "not a mapping or a list")
    return child


def set_key(node: dict | list, key: str, value: Any, override: str, source: str) -> None:
    if isinstance(node, dict):
        node[key] = value
    else:
        node[list_index(node, key, override, source)] = value


def list_index(items: list, key: str, override: str, source: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise ConfigError(f"{source}: override {override!r}: {key!r} is not an index of a list of "
                          f"{len(items)} item(s)")
    return int(key)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def parse_config(raw: dict[str, Any], source: str = "<config>", schema: type[Section] | None = None):
    try:
        return (schema or UnlearnConfig).model_validate(raw)
    except ValidationError as exc:
        lines = [f"{source}: {'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
                 + (f" (got {err['input']!r})" if err["type"] != "missing" and err["loc"] else "")
                 for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(lines)) from None


# ---------------------------------------------------------------------------------------------
# Pipelines: prepare → train the original → train the retain-only oracle → unlearn per method →
# evaluate → compare. Each training stage becomes an UnlearnConfig for the engine.

class ForgetRequest(Section):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    kind: Literal["class", "random"] = "class"
    forget_class: int = Field(0, alias="class", ge=0)  # kind class: the class to forget
    rho: float = Field(0.0, ge=0, le=1)  # share of the forget set drawn from other classes
    fraction: float | None = Field(None, gt=0, lt=1)  # kind random: share of the training split

    @model_validator(mode="after")
    def _kind_fields(self) -> "ForgetRequest":
        if self.kind == "random" and self.fraction is None:
            raise ValueError("kind random needs fraction (the share of the training split to forget)")
        return self


class DatasetSection(Section):
    source: Literal["fashion-mnist", "digits"]
    root: str | None = None  # fashion-mnist: the IDX files' folder (default: the Debian package's)
    forget: ForgetRequest = ForgetRequest()
    max_train_rows: int | None = Field(None, gt=0)  # a stratified subset, for quick runs
    seed: int = 0
    batch_size: int = Field(64, gt=0)  # per worker; forget and retain alike unless a method says


class MethodEntry(MethodSection):
    label: str | None = None  # its name in tables and runs (default: the method's name)
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the pipeline's unlearn settings

    @property
    def key(self) -> str:
        return self.label or self.name


class TrackingSection(Section):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite in the output directory
    experiment: str = "hamu-ray"


class SearchDomain(Section):
    """One searched hyper-parameter: a range (uniform, or log-uniform) or a list of values."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: list[float | str] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _range_or_values(self) -> "SearchDomain":
        if self.values is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either values or low/high, not both")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a range needs low < high; got low {self.low}, high {self.high}")
        elif self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0; got {self.low}")
        return self

    def candidates(self) -> list[float | str]:
        return list(self.values) if self.values is not None else [self.low, self.high]


# what a search may vary, by rule: HAMU's constraint as a ratio of lr (B = ratio·lr), its
# radius mode ("lr" or a fixed R), surgery's epsilon, and the learning rate
SEARCHABLE = {"hamu-q": ("constraint_ratio", "radius", "lr"), "hamu-u": ("constraint_ratio", "radius", "lr"),
              "surgery": ("epsilon", "lr"), None: ("epsilon", "lr")}  # None: surgery-implicit


class AshaSection(Section):
    metric: str = "loss/retain"  # a key of the engine's step reports; the final report has it too
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(2, gt=0)  # reports before a trial may be stopped
    reduction_factor: float = Field(2.0, gt=1)


class TuneSection(Section):
    method: str  # the label of a methods entry; its settings are the starting point of each trial
    space: dict[str, SearchDomain] = Field(min_length=1)
    num_samples: int = Field(8, gt=0)
    max_concurrent: int = Field(1, gt=0)
    utility_floor: float = Field(2.0, ge=0)  # test accuracy on the retained classes may drop
    # at most this many points below the original model's
    scheduler: AshaSection | None = AshaSection()  # None: every trial runs to the end
    cpus_per_trial: float = Field(0.0, ge=0)  # the trial's own process (it mostly waits); its
    # workers ask for theirs (cluster section)
    seed: int = 0


class PipelineConfig(Section):
    name: str
    output_dir: str  # stages are cached here by a hash of their inputs: a re-run skips them
    data: DatasetSection
    model: ModelSection
    train: TrainSettings  # the original model and the retrain oracle
    unlearn: TrainSettings  # every method, unless its entry overrides a field
    methods: list[MethodEntry] = Field(min_length=1)
    cluster: ClusterSection = ClusterSection()
    tracking: TrackingSection = TrackingSection()
    tune: TuneSection | None = None  # `hamu-ray tune`: the threshold search

    @model_validator(mode="after")
    def _cross_checks(self) -> "PipelineConfig":
        keys = [m.key for m in self.methods]
        if len(set(keys)) != len(keys):
            raise ValueError(f"methods: labels must be unique, got {keys}; set label: on repeats")
        if self.model.weights is not None:
            raise ValueError("model.weights: a pipeline trains its own original model; leave it out")
        for m in self.methods:  # overrides are validated here, not at the method's stage
            try:
                self.unlearn_settings(m)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"method {m.key}: train overrides: {problems}") from None
        if self.tune is not None:
            self._check_search(self.tune)
        return self

    def _check_search(self, tune: TuneSection) -> None:
        entry = self.method_entry(tune.method)
        if entry is None:
            raise ValueError(f"tune.method: {tune.method!r} is not a label in methods "
                             f"({', '.join(m.key for m in self.methods)})")
        if entry.rule_name not in SEARCHABLE:
            raise ValueError(f"tune.method: {entry.key} uses rule {entry.rule_name}; the search is "
                             "for hamu-q, hamu-u, surgery and surgery-implicit")
        allowed = SEARCHABLE[entry.rule_name]
        unknown = sorted(set(tune.space) - set(allowed))
        if unknown:
            raise ValueError(f"tune.space: {', '.join(unknown)} cannot be searched for "
                             f"{entry.key}; valid: {', '.join(allowed)}")
        for name, domain in tune.space.items():  # every candidate must make a valid method
            for value in domain.candidates():
                try:
                    self.trial_settings(entry, {name: value})
                except (ValidationError, ValueError, TypeError) as exc:
                    raise ValueError(f"tune.space.{name}: {value!r} is not valid: {exc}") from None
        self._check_grace_period(tune, entry)

    def _check_grace_period(self, tune: TuneSection, entry: MethodEntry) -> None:
        """ASHA needs grace_period ≤ max_t (else Ray's bare AssertionError at search start)."""
        horizon = self.search_horizon()
        if tune.scheduler is None or horizon is None or tune.scheduler.grace_period <= horizon:
            return
        train = self.unlearn_settings(entry)
        raise ValueError(
            f"tune.scheduler.grace_period: {tune.scheduler.grace_period} reports, but a trial of "
            f"{entry.key} makes only {horizon} (ceil(max_steps {train.max_steps} / progress_every "
            f"{train.progress_every}) + 1 evaluation); lower grace_period, or raise max_steps or "
            "lower progress_every for that method")

    def search_horizon(self) -> int | None:
        """ASHA's max_t: the reports one full trial of tune.method makes, from that method's own
        train settings: a step report every progress_every steps (and at the last step), then
        the evaluation. None without a tune section or a max_steps (unknown before running)."""
        entry = self.method_entry(self.tune.method) if self.tune is not None else None
        if entry is None:
            return None
        train = self.unlearn_settings(entry)
        if train.max_steps is None:
            return None
        return math.ceil(train.max_steps / train.progress_every) + 1

    def method_entry(self, key: str) -> MethodEntry | None:
        return next((m for m in self.methods if m.key == key), None)

    def trial_settings(self, entry: MethodEntry,
                       sample: dict[str, Any]) -> tuple[MethodSection, TrainSettings]:
        """The method and training settings of one search trial: `sample` over `entry`."""
        train = self.unlearn_settings(entry)
        if "lr" in sample:
            train = TrainSettings.model_validate({**train.model_dump(), "lr": float(sample["lr"])})
        hparams = dict(entry.hparams)
        if "constraint_ratio" in sample:
            hparams["constraint"] = float(sample["constraint_ratio"]) * train.lr
        if "radius" in sample:
            hparams["radius"] = sample["radius"] if sample["radius"] == "lr" else float(sample["radius"])
        if "epsilon" in sample:
            hparams["epsilon"] = float(sample["epsilon"])
        method = MethodSection.model_validate({**entry.model_dump(include={"name", "rule", "objective"}),
                                               "hparams": hparams})
        return method, train

    def unlearn_settings(self, entry: MethodEntry) -> TrainSettings:
        return TrainSettings.model_validate({**self.unlearn.model_dump(), **entry.train})
