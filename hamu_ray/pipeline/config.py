"""The schema of a pipeline (prepare → original → oracle → unlearn per method → evaluate →
compare) and of its threshold search. Each training stage becomes an engine job (UnlearnConfig)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import ConfigDict, Discriminator, Field, ValidationError, field_validator, model_validator

from hamu_ray.engine.config import ClusterSection, MethodSection, TrainSettings, model_kind
from hamu_ray.tasks.causal_lm import LoraSection, TextData
from hamu_ray.tasks.classifier import ClassifierModel
from hamu_ray.tasks.small_llama import SmallLlama
from hamu_ray.schema import FieldError, Section, field_path, load, problem, tagged


def load_pipeline(path: str | Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    return load(path, overrides, PipelineConfig)


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


class BuiltinQASection(Section):
    """A built-in QA set (pipeline.qa_sets), forgotten by entity: country-qa, real country facts
    (pipeline.country_qa); fictitious-qa, invented people (pipeline.fictitious_qa)."""
    source: Literal["country-qa", "fictitious-qa"]
    forget_share: float = Field(0.1, gt=0, lt=1)  # of the entities (TOFU's forget01/05/10)
    holdout_share: float = Field(0.1, gt=0, lt=1)  # entities never trained on (membership)
    eval_retain_rows: int = Field(200, gt=0)  # a fixed sample of the retain set, scored per model
    seed: int = 0
    batch_size: int = Field(16, gt=0)  # per worker; forget and retain alike
    text: TextData = TextData(max_length=64)
    forget_tokens: Literal["answer", "fact"] = "answer"  # every method's forget loss: whole answers, or facts

    @model_validator(mode="after")
    def _shares(self) -> "BuiltinQASection":
        if self.forget_share + self.holdout_share >= 1:
            raise ValueError(f"forget_share {self.forget_share} + holdout_share {self.holdout_share} "
                             "must leave entities to retain")
        return self


class FilesSection(Section):
    """The user's own rows (parquet or jsonl) in place of a built-in set: question/answer rows
    for a language model, input/label rows for a classifier."""
    source: Literal["files"]
    forget: str
    retain: str
    holdout: str | None = None  # language model: rows the original never saw (membership
    # inference; without it the membership metrics are absent)
    test: str | None = None  # classifier (required): held-out rows, for accuracy and membership
    eval_retain_rows: int = Field(200, gt=0)  # language model: the retain sample scored per model
    seed: int = 0
    batch_size: int = Field(16, gt=0)
    text: TextData = TextData()  # language model: columns, prompt, max_length
    # language model: every method's forget loss on whole answers, or on the fact spans only
    # (needs a fact or answer_value column marking every forget row's fact)
    forget_tokens: Literal["answer", "fact"] = "answer"
    input_column: str = "x"  # classifier: a list of floats per row
    label_column: str = "y"  # classifier: an integer class per row
    forget_classes: list[int] = Field(default_factory=list)  # classifier: classes forgotten whole
    # (excluded from test_acc_retained)


class PipelineClassifier(ClassifierModel):
    """A classifier: built and trained here, or the user's (`weights`: safetensors of this shape,
    trained on forget + retain; `oracle`, optional: the same shape trained on retain alone)."""
    oracle: str | None = None


class LanguageModelSection(Section):
    """The original language model: an existing one (`path`, a Hugging Face directory trained on
    forget + retain; `oracle`, optional, one trained on retain alone), or one built here (`init`)
    and trained by the pipeline, as is the oracle on retain alone."""
    kind: Literal["causal_lm"]
    init: SmallLlama | None = None
    path: str | None = None
    oracle: str | None = None
    dtype: Literal["fp32", "bf16"] = "fp32"
    gradient_checkpointing: bool = False
    lora: LoraSection | None = None  # unlearning trains adapters (merged into each export)

    def job_model(self, path: str, *, trains_adapters: bool) -> dict:
        """The engine's model section for a stage that starts from `path`."""
        lora = self.lora.model_dump() | {"export_merged": True} if self.lora and trains_adapters else None
        return {"kind": "causal_lm", "path": path, "dtype": self.dtype,
                "gradient_checkpointing": self.gradient_checkpointing, "lora": lora}

    @model_validator(mode="after")
    def _one_origin(self) -> "LanguageModelSection":
        if (self.init is None) == (self.path is None):
            raise ValueError("give exactly one of init (a small Llama built and trained here) and "
                             "path (an existing original model)")
        if self.oracle is not None and self.path is None:
            raise ValueError("oracle: with init the pipeline trains the oracle itself; an oracle "
                             "model goes with path")
        return self


DATA_SOURCES = {"fashion-mnist": "images", "digits": "images", "country-qa": "builtin-qa",
                "fictitious-qa": "builtin-qa", "files": "files"}
BUILTIN_QA = ("country-qa", "fictitious-qa")


def _data_kind(raw: Any) -> str | None:
    source = raw.get("source") if isinstance(raw, dict) else getattr(raw, "source", None)
    return DATA_SOURCES.get(source) if isinstance(source, str) else None  # a list: no source


PipelineData = Annotated[Union[tagged(DatasetSection, "images"), tagged(BuiltinQASection, "builtin-qa"),
                               tagged(FilesSection, "files")],
                         Discriminator(_data_kind, custom_error_type="source",
                                       custom_error_message="source must be one of "
                                       + ", ".join(DATA_SOURCES))]
PipelineModel = Annotated[Union[tagged(PipelineClassifier, "classifier"), tagged(LanguageModelSection, "causal_lm")],
                          Discriminator(model_kind)]


class MethodEntry(MethodSection):
    label: str | None = None  # its name in tables and runs (default: the method's name)
    train: dict[str, Any] = Field(default_factory=dict)  # overrides of the pipeline's unlearn settings

    @property
    def key(self) -> str:
        return self.label or self.name


class TrackingSection(Section):
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite in the output directory
    experiment: str = "hamu-ray"
    registered_model: str | None = None  # the registry's name for this pipeline's models (None: its name)


class SearchDomain(Section):
    """One searched hyper-parameter: a range (uniform, or log-uniform) or a list of values; for
    HAMU's constraint_ratio also `preflight: true`: a log range read from the hardness pre-flight
    of the original model (tune.preflight_range)."""
    low: float | None = None
    high: float | None = None
    log: bool = False
    values: list[float | str] | None = Field(None, min_length=1)
    preflight: bool = False

    @model_validator(mode="after")
    def _range_or_values(self) -> "SearchDomain":
        if self.preflight:
            if self.low is not None or self.high is not None or self.values is not None:
                raise ValueError("preflight: true sets the range itself; give no low, high or values")
        elif self.values is not None:
            if self.low is not None or self.high is not None:
                raise ValueError("give either values or low/high, not both")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a range needs low < high; got low {self.low}, high {self.high}")
        elif self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0; got {self.low}")
        return self

    def candidates(self) -> list[float | str]:
        """Values to validate now (a pre-flight range is known only when the search starts)."""
        if self.preflight:
            return []
        return list(self.values) if self.values is not None else [self.low, self.high]


# what a search may vary, by rule: HAMU's constraint as a ratio of lr (B = ratio·lr), its
# radius mode ("lr" or a fixed R), surgery's epsilon, and the learning rate (any other rule)
SEARCHABLE = {"hamu-q": ("constraint_ratio", "radius", "lr"), "hamu-u": ("constraint_ratio", "radius", "lr"),
              "surgery": ("epsilon", "lr"), None: ("epsilon", "lr")}  # None: surgery-implicit
LR_ONLY = ("lr",)


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
    utility_floor: float = Field(2.0, ge=0)  # utility (test accuracy on the retained classes;
    # a language model's model utility) may drop at most this many points (hundredths) below the original's
    scheduler: AshaSection | None = AshaSection()  # None: every trial runs to the end
    cpus_per_trial: float = Field(0.0, ge=0)  # the trial's own process (it mostly waits); its
    # workers ask for theirs (cluster section)
    seed: int = 0
    # how trials are ranked: forget_quality (the best KS p-value among those within the utility
    # floor), or matched (the most utility among those that reached the monitor's forget target,
    # monitor.stop_at: methods compared at matched forgetting; the floor is not used)
    rank: Literal["forget_quality", "matched"] = "forget_quality"


class PipelineMonitor(Section):
    """Evaluation during each method's run (the engine's monitor): fixed samples of the forget
    and retain sets scored every `every` steps; stop_at oracle stops a method at the first
    evaluation whose forget probability is at or below the oracle's on the same sample, so that
    the methods are compared at matched forgetting (a number: that probability itself)."""
    every: int = Field(10, gt=0)  # steps
    forget_rows: int = Field(64, gt=0)  # sample sizes (at most the set)
    retain_rows: int = Field(64, gt=0)
    stop_at: Literal["oracle"] | float | None = None
    batch_size: int = Field(32, gt=0)

    @field_validator("stop_at")
    @classmethod
    def _probability(cls, value):
        if isinstance(value, float) and not 0 <= value <= 1:
            raise ValueError(f"a forget probability between 0 and 1, or oracle; got {value}")
        return value


# a fresh AdamW's first steps move every weight by about lr whatever its gradient: at train.lr
# they disturb the original itself (demo: its forget probability 0.95 -> 0.60), a tenth leaves it
# (0.95) while unlearned models still recover (README, "Does the forgetting survive attacks?")
RELEARN_LR_OF_TRAIN = 0.1


class RelearnSection(Section):
    """The relearning attack (arXiv 2410.08827, 2406.13356): each model fine-tuned `steps` AdamW
    steps on a held-apart part of the forget set, then its other rows scored; with `benign`, the
    same steps on retain rows alone, scored on the same rows."""
    share: float = Field(0.1, gt=0, lt=1)  # of the forget set's entities (its `entity` column;
    # of its rows where it has none) held apart to relearn on, at least one; the rest is scored
    steps: int = Field(10, gt=0)
    lr: float | None = Field(None, gt=0)  # None: a tenth of train.lr (PipelineConfig.relearn_lr)
    batch_size: int = Field(8, gt=0)
    benign: bool = True  # also relearn on retain rows only (steps × batch_size of them)


class RobustnessSection(Section):
    """Attacks on every evaluated model (the original, the oracle, each method's run) that try
    to bring the forgotten knowledge back; the forget metrics are scored again after each, with
    the share of the forgetting they undo (hamu_ray.attacks)."""
    quantize: list[Literal[8, 4]] | None = Field(None, min_length=1)  # bits: the linear layers
    # fake-quantized round-to-nearest (int8 per output channel, int4 in groups of 128), e.g. [8, 4]
    relearn: RelearnSection | None = None

    @field_validator("quantize")
    @classmethod
    def _once_each(cls, bits: list[int] | None) -> list[int] | None:
        if bits is not None and len(set(bits)) != len(bits):
            raise ValueError("a width listed twice: give each once, e.g. [8, 4]")
        return bits

    @model_validator(mode="after")
    def _an_attack(self) -> "RobustnessSection":
        if self.quantize is None and self.relearn is None:
            raise ValueError("no attack: give quantize (e.g. [8, 4]), relearn (e.g. {}) or both")
        return self


def seed_run_name(key: str, index: int, seed: int) -> str:
    """A method's run with its `index`-th seed: the label for the first (so seeds: 1 names and
    caches its runs as before seeds existed), `<label>-seed<seed>` for the others."""
    return key if index == 0 else f"{key}-seed{seed}"


class PipelineConfig(Section):
    name: str
    output_dir: str  # stages are cached here by a hash of their inputs: a re-run skips them
    data: PipelineData  # a built-in image set (classifiers) or QA set (language models)
    model: PipelineModel
    train: TrainSettings | None = None  # the original model and the retrain oracle, when the
    # pipeline trains them (required then; your own model, model.weights or model.path, leaves it out)
    pretrain: TrainSettings | None = None  # model.init on a built-in QA set (required there): the
    # shared pretraining on text that names every entity and holds no fact, before original and oracle fork
    unlearn: TrainSettings  # every method, unless its entry overrides a field
    methods: list[MethodEntry] = Field(min_length=1)
    cluster: ClusterSection = ClusterSection()
    tracking: TrackingSection = TrackingSection()
    tune: TuneSection | None = None  # `hamu-ray tune`: the threshold search
    monitor: PipelineMonitor | None = None  # evaluation during unlearning; None: end points only
    seeds: int = Field(1, ge=1)  # runs of every method (seed data.seed + i: data order, every
    # random draw); the table shows mean ± sd over them. The original and the oracle: one each
    robustness: RobustnessSection | None = None  # attacks re-scored after the evaluation
    # (quantize: [8, 4], relearn: {}); a classifier's in accuracy; None: none

    @model_validator(mode="after")
    def _cross_checks(self) -> "PipelineConfig":
        keys = [m.key for m in self.methods]
        if len(set(keys)) != len(keys):
            raise ValueError(f"methods: labels must be unique, got {keys}; set label: on repeats")
        if self.data.source in BUILTIN_QA and not self.is_lm or self.data.source in ("fashion-mnist", "digits") and self.is_lm:
            raise ValueError(f"data.source {self.data.source} and model.kind {self.model.kind} "
                             f"do not go together: {' and '.join(BUILTIN_QA)} are for causal_lm, "
                             "the image sets for mlp and cnn (files for either)")
        if self.data.source == "files":
            self._check_files()
        if not self.is_lm and getattr(self.data, "forget_tokens", "answer") != "answer":
            raise ValueError("data.forget_tokens: fact spans are a language model's (a classifier "
                             "forgets whole rows)")
        if self.is_lm and self.data.text.format != "qa":
            raise ValueError("data.text.format: a language-model pipeline scores question/answer "
                             "rows (qa); plain text is for single jobs (hamu-ray unlearn)")
        if self.is_lm and self.data.source in BUILTIN_QA and self.model.path is not None:
            raise ValueError(f"model.path: the {self.data.source} set trains its own original (model.init); "
                             "an existing model goes with data.source files")
        self._check_pretrain()
        if not self.is_lm and (self.model.weights is not None) != (self.data.source == "files"):
            raise ValueError("model.weights: your own classifier goes with data.source files (and "
                             "needs one); a built-in image set trains its own")
        if not self.is_lm and self.model.oracle is not None and self.model.weights is None:
            raise ValueError("model.oracle: an oracle goes with model.weights (your own classifier)")
        for i, m in enumerate(self.methods):  # overrides are validated here, not at the method's stage
            self._check_train_overrides(i, m)
        if self.tune is not None and not self.has_oracle:
            raise ValueError("tune: the search ranks trials by forget quality against the oracle; "
                             "give model.oracle")
        if self.train is None and self.given_original is None:
            raise FieldError("train", "Field required: the pipeline trains its original model and the "
                             "oracle with these settings (only your own model, model.weights or "
                             "model.path, goes without)")
        trained_bf16 = (self.train is None or self.train.bf16) and self.unlearn.bf16
        if self.is_lm and (self.model.dtype == "bf16") != trained_bf16:
            raise ValueError(f"model.dtype {self.model.dtype} needs train.bf16 and unlearn.bf16 "
                             "to match it (bf16 weights train in DeepSpeed's bf16 mode)")
        if self.tune is not None:
            self._check_search(self.tune)
        self._check_seed_runs(keys)
        relearn = self.robustness.relearn if self.robustness is not None else None
        if relearn is not None and relearn.lr is None and self.train is None:
            raise FieldError("robustness.relearn.lr", "required with your own model: there is no train.lr "
                             "to relearn at")
        if self.monitor is not None and self.monitor.stop_at == "oracle" and not self.has_oracle:
            raise ValueError("monitor.stop_at: oracle needs an oracle model (model.oracle); give "
                             "one, or a forget probability to stop at")
        return self

    def _check_seed_runs(self, keys: list[str]) -> None:
        """A method's later seeds are named `<label>-seed<s>` (seed_run_name): no label may be one."""
        taken = set(keys)
        for key in keys:
            clash = next((name for _, name in self.seed_runs(key)[1:] if name in taken), None)
            if clash is not None:
                raise ValueError(f"methods: the label {clash!r} is the name of {key}'s run with another "
                                 "seed (seeds); choose another label")

    @property
    def relearn_lr(self) -> float:
        """The relearning attack's rate: robustness.relearn.lr, else RELEARN_LR_OF_TRAIN × train.lr."""
        given = self.robustness.relearn.lr
        return given if given is not None else RELEARN_LR_OF_TRAIN * self.train.lr

    @property
    def method_seeds(self) -> list[int]:
        """The seeds every method runs with: data.seed (the first: the run seeds: 1 makes), then up."""
        return [self.data.seed + i for i in range(self.seeds)]

    def seed_runs(self, key: str) -> list[tuple[int, str]]:
        """(seed, run name) of method `key`'s runs, the first seed's run named by the label alone."""
        return [(seed, seed_run_name(key, i, seed)) for i, seed in enumerate(self.method_seeds)]

    def _check_pretrain(self) -> None:
        """Pretraining is the built-in QA sets' (their text names every entity, holds no fact)."""
        builtin_init = self.is_lm and self.data.source in BUILTIN_QA and self.model.init is not None
        if builtin_init and self.pretrain is None:
            raise FieldError("pretrain", f"Field required: a small Llama built here (model.init) on "
                             f"{self.data.source} is first pretrained on text that names every entity "
                             "and holds none of its facts, so that the original and the oracle differ "
                             "only in the facts (e.g. pretrain: {lr: 0.005, epochs: 3})")
        if self.pretrain is not None and not builtin_init:
            raise FieldError("pretrain", f"pretraining text is built for the built-in QA sets "
                             f"({', '.join(BUILTIN_QA)}) with model.init; remove it here")

    def _check_train_overrides(self, index: int, entry: MethodEntry) -> None:
        """The entry's `train:` over the pipeline's unlearn settings, each error at its key."""
        try:
            self.unlearn_settings(entry)
        except ValidationError as exc:
            errors = exc.errors()
            where = f"methods.{index}.train"
            if len(errors) == 1:
                raise FieldError(f"{where}.{field_path(errors[0]['loc'])}",
                                 problem(errors[0], TrainSettings)) from None
            raise FieldError(where, "; ".join(f"{field_path(e['loc'])}: {problem(e, TrainSettings)}"
                                              for e in errors)) from None

    def _check_files(self) -> None:
        """Each file setting belongs to one kind of model."""
        d = self.data
        # set to something other than its default (a dumped config repeats every default)
        fields = {f for f, info in FilesSection.model_fields.items()
                  if getattr(d, f) != info.get_default(call_default_factory=True)}
        if self.is_lm:
            wrong = [f for f in ("test", "input_column", "label_column", "forget_classes") if f in fields]
            if wrong:
                raise ValueError(f"data.{wrong[0]} is for classifier pipelines; a language model's "
                                 "unseen rows are data.holdout")
        else:
            wrong = [f for f in ("holdout", "eval_retain_rows", "text") if f in fields]
            if wrong:
                raise ValueError(f"data.{wrong[0]} is for language-model pipelines; a classifier's "
                                 "unseen rows are data.test")
            if d.test is None:
                raise ValueError("data.test: a classifier pipeline needs held-out rows (accuracy "
                                 "and membership inference)")

    @property
    def given_original(self) -> str | None:
        """The user's own original model (None: the pipeline trains it)."""
        return self.model.path if self.is_lm else self.model.weights

    @property
    def has_oracle(self) -> bool:
        """Trained here, or given by the user."""
        return self.given_original is None or self.model.oracle is not None

    def _check_search(self, tune: TuneSection) -> None:
        if tune.rank == "matched" and (self.monitor is None or self.monitor.stop_at is None):
            raise ValueError("tune.rank: matched ranks the trials that reached the monitor's forget "
                             "target; set monitor.stop_at (oracle, or a forget probability)")
        entry = self.method_entry(tune.method)
        if entry is None:
            raise ValueError(f"tune.method: {tune.method!r} is not a label in methods "
                             f"({', '.join(m.key for m in self.methods)})")
        allowed = SEARCHABLE.get(entry.rule_name, LR_ONLY)
        unknown = sorted(set(tune.space) - set(allowed))
        if unknown:
            raise ValueError(f"tune.space: {', '.join(unknown)} cannot be searched for "
                             f"{entry.key}; valid: {', '.join(allowed)}")
        preflight = sorted(name for name, domain in tune.space.items() if domain.preflight)
        if preflight and preflight != ["constraint_ratio"]:
            raise ValueError(f"tune.space.{preflight[-1]}: preflight: true is for constraint_ratio only")
        if preflight and {"lr", "radius"} & set(tune.space):
            raise ValueError("tune.space.constraint_ratio: a pre-flight range holds at the method's own lr "
                             "and radius; do not search lr or radius with it")
        if self._lr_cancels(tune, entry):
            raise ValueError(
                f"tune.space.lr: every trial of {entry.key} would take the same steps: with a fixed "
                "radius and B not tied to lr, a HAMU step under plain SGD is Δ = α·g_f + β·g_r, "
                "whatever lr is; search radius (or constraint_ratio, B = ratio·lr) instead")
        for name, domain in tune.space.items():  # every candidate must make a valid method
            for value in domain.candidates():
                try:
                    self.trial_settings(entry, {name: value})
                except (ValidationError, ValueError, TypeError) as exc:
                    raise ValueError(f"tune.space.{name}: {value!r} is not valid: {exc}") from None
        self._check_grace_period(tune, entry)

    def _lr_cancels(self, tune: TuneSection, entry: MethodEntry) -> bool:
        """A searched lr that no HAMU step depends on: the rule divides its coefficients by lr
        and plain SGD multiplies them back, so lr acts only through an "lr" radius or a B of
        ratio·lr (an optimizer with its own state, AdamW, does depend on it)."""
        if entry.rule_name not in ("hamu-q", "hamu-u") or "lr" not in tune.space or "constraint_ratio" in tune.space:
            return False
        radii = tune.space["radius"].candidates() if "radius" in tune.space else [entry.hparams.get("radius", "lr")]
        return "lr" not in radii and self.unlearn_settings(entry).optimizer == "SGD"

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

    @property
    def is_lm(self) -> bool:
        return self.model.kind == "causal_lm"

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
