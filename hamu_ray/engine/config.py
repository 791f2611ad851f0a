"""The schema of one unlearning job: what the engine needs. Every error names the field (and the file)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, model_validator

from hamu_ray.objectives import METHODS, Method, check_objective_params
from hamu_ray.rules import get_rule
from hamu_ray.rules.surgery import ImplicitSurgeryParams
from hamu_ray.tasks.causal_lm import CausalLMModel, TextData
from hamu_ray.tasks.classifier import ClassifierModel
from hamu_ray.schema import ConfigError, Section, load, read_yaml, tagged, validate

# Forget objectives whose gradient is zero at the original model, and why. Under such an
# objective only a rule that also steps along g_r leaves the start; the others stop at step 1
# (hamu-q: infeasible) or take zero steps forever (surgery, ga, gru).
ZERO_FORGET_GRADIENT_AT_START = {
    "kl": "KL to the teacher, the original itself, is at its minimum there",
}
MOVES_WITHOUT_FORGET_GRADIENT = ("gdiff", "pcgrad", "hamu-u", "ft")


class DataSection(Section):
    forget: str | None = None  # parquet or jsonl, a local path or a URI; None (or left out):
    # plain training on retain, method ft
    retain: str
    eval: str | None = None
    input_column: str = "x"  # classifier: list of floats per row
    label_column: str = "y"  # classifier: integer class per row
    text: TextData = TextData()  # causal LM: columns, prompt format, max_length
    # causal LM, qa: the forget loss on each answer's whole text, or on its fact span only (the
    # tokens of fact_column's text where it last occurs in the answer): what the oracle does not
    # know is the fact, not the answer's wording, which the retain rows share
    forget_tokens: Literal["answer", "fact"] = "answer"
    fact_column: str = "fact"
    retain_batch_size: int = Field(32, gt=0)  # per worker and step
    forget_batch_size: int = Field(32, gt=0)
    anchor: Literal["retain", "forget"] = "retain"  # its epochs define the run; the other cycles
    shuffle_seed: int | None = 0  # None: keep file order


def model_kind(raw: Any) -> str:
    kind = raw.get("kind", "mlp") if isinstance(raw, dict) else getattr(raw, "kind", "mlp")
    return "causal_lm" if kind == "causal_lm" else "classifier"


# the task's model section, chosen by model.kind (mlp, cnn: the classifier; causal_lm)
ModelSection = Annotated[Union[tagged(ClassifierModel, "classifier"), tagged(CausalLMModel, "causal_lm")],
                         Discriminator(model_kind)]


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
            raise ValueError(f"{self._rule_origin()}rule {self.rule_name}: {exc}") from None
        except ValueError as exc:
            raise ValueError(f"{self._rule_origin()}{exc}") from None
        reason = ZERO_FORGET_GRADIENT_AT_START.get(self.spec.forget)
        if reason and self.rule_name not in MOVES_WITHOUT_FORGET_GRADIENT:
            raise ValueError(
                f"{self.name} cannot run under rule {self.rule_name}: its forget objective "
                f"({self.spec.forget}) has a zero gradient at the original model ({reason}), and "
                f"{self.rule_name} has nothing to move along; valid rules for {self.name}: "
                f"{', '.join(MOVES_WITHOUT_FORGET_GRADIENT)}")

    def _rule_origin(self) -> str:
        """Where the rule comes from, when the user did not write it: the method's own."""
        if self.rule is not None or self.rule_name == self.name:
            return ""
        return (f"method {self.name} runs rule {self.rule_name} (its own; method.rule, e.g. "
                "hamu-q, runs it under another): ")

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
    offload: Literal["none", "optimizer", "all"] = "none"  # to CPU memory: optimizer ZeRO ≥ 1, all ZeRO-3
    # measure every rule step's realised forget gain and retain change on its own batches after
    # the step (two more forwards): auto for rules with a guarantee (hamu-q, hamu-u); one-backprop
    # methods and plain training ignore it (implicit surgery measures its own retain change)
    measure: bool | Literal["auto"] = "auto"
    checkpoint_every: int | None = Field(None, gt=0)  # steps; None: only the final export
    progress_every: int = Field(50, gt=0)  # the driver prints a progress line every so many steps


class TrainSection(TrainSettings):
    """A job's train section: a stage's settings plus what only a single job sets."""
    seed: int = 0


class ClusterSection(Section):
    address: str | None = None  # None: $RAY_ADDRESS, else an embedded local Ray
    num_workers: int = Field(2, gt=0)
    cpus_per_worker: float = Field(0.5, gt=0)  # < 1 leaves the driver's and the pipelines' tasks a CPU on small machines
    use_gpu: bool | Literal["auto"] = "auto"
    max_failures: int = Field(0, ge=0)  # worker-group restarts from the latest checkpoint


class MonitorSection(Section):
    """Evaluation during the run: every worker scores the same small samples of the forget and
    retain sets (hamu_ray.engine.monitor) before the first step, every `every` steps and after
    the last; with `stop_forget_prob` the run stops at the first evaluation whose mean forget
    probability is at or below it (stop reason forget_target), and that model is the export."""
    forget: str  # parquet or jsonl: a fixed sample of the forget set (file order)
    retain: str  # a fixed sample of the retain set
    every: int = Field(10, gt=0)  # steps
    stop_forget_prob: float | None = Field(None, ge=0, le=1)
    batch_size: int = Field(32, gt=0)  # rows per forward pass


class RelearnAttack(Section):
    """Relearning before a scoring (attacks.relearn.Relearning): `steps` AdamW steps at `lr` on
    batches of `batch_size` of the rows numbered `rows` (file order) of the parquet file `path`."""
    path: str
    rows: list[int] = Field(min_length=1)
    steps: int = Field(gt=0)
    lr: float = Field(gt=0)
    batch_size: int = Field(gt=0)
    seed: int = 0


class AttackSection(Section):
    """One attack on the final model before its `forget` evaluation set is scored again: the
    linear layers fake-quantized to `quantize_bits`, or the model fine-tuned by `relearning`."""
    quantize_bits: Literal[8, 4] | None = None
    relearning: RelearnAttack | None = None

    @model_validator(mode="after")
    def _one(self) -> "AttackSection":
        if (self.quantize_bits is None) == (self.relearning is None):
            raise ValueError("an attack is quantize_bits or relearning, one of them")
        return self


class EvaluationSection(Section):
    """Evaluation of the job's final model on its own workers (the model never leaves them):
    every row of each set scored, each rank its share (tasks.lm_scores), the per-example
    numbers written beside the export (engine.evaluation). Causal LM, qa format."""
    sets: dict[str, str] = Field(min_length=1)  # name → parquet file of rows (every worker reads it)
    batch_size: int = Field(64, gt=0)  # rows per forward pass and per greedy decoding
    max_new_tokens: int = Field(32, gt=0)  # greedy answers' length (ROUGE)
    # ZeRO-3 on 2+ workers: each rank scores with a whole copy of the model (gathered once, one
    # parameter at a time) instead of gathering every layer at every forward, and the ranks no
    # longer step in lockstep. auto: when the copy takes at most half of every rank's free
    # memory (GPU: its free memory; CPU: the node's available memory over its workers)
    whole_model: bool | Literal["auto"] = "auto"
    # name → attack: after the sets, each attack's copy of the model scores the forget set again
    # (`forget@<name>` in the scores); attacks need the model whole on every rank (under ZeRO-3
    # the whole copy, whatever auto would choose)
    attacks: dict[str, AttackSection] = {}

    @model_validator(mode="after")
    def _names(self) -> "EvaluationSection":
        bad = [name for name in (*self.sets, *self.attacks) if not name.isidentifier()]
        if bad:
            raise ValueError(f"evaluation.sets and attacks: names must be identifiers (letters, digits, _), got {bad}")
        if self.attacks and "forget" not in self.sets:
            raise ValueError("evaluation.attacks score the set named forget: add it to evaluation.sets")
        if self.attacks and self.whole_model is False:
            raise ValueError("evaluation.attacks need the model whole on every rank: whole_model false refuses "
                             "that (leave it auto or true)")
        return self


class UnlearnConfig(Section):
    data: DataSection
    model: ModelSection
    method: MethodSection
    train: TrainSection
    cluster: ClusterSection = ClusterSection()
    monitor: MonitorSection | None = None  # None: no evaluation during the run
    evaluation: EvaluationSection | None = None  # None: the final model is not scored here
    output_dir: str  # created by the run; must not exist yet (nothing is overwritten)

    @model_validator(mode="after")
    def _cross_checks(self) -> "UnlearnConfig":
        if self.data.forget is None and self.method.name != "ft":
            raise ValueError(f"data.forget is missing: method {self.method.name} needs a forget set "
                             "(only ft trains on the retain set alone)")
        offload, stage = self.train.offload, self.train.zero_stage
        if (offload == "optimizer" and stage == 0) or (offload == "all" and stage != 3):
            raise ValueError(f"train.offload {offload} needs train.zero_stage "
                             f"{'1, 2 or 3' if offload == 'optimizer' else '3'}, got {stage}")
        self._check_task()
        if self.method.hparams.get("trust_tolerance") is not None and not measures_steps(self):
            raise ValueError("method.hparams.trust_tolerance adapts the radius to the measured retain "
                             "change: it needs train.measure true or auto")
        return self

    def _check_task(self) -> None:
        from hamu_ray.objectives import uses_refusals

        lm = self.model.kind == "causal_lm"
        if uses_refusals(self.method.spec) and not (lm and self.data.text.format == "qa"):
            raise ValueError(f"method {self.method.name} replaces answers by refusals: it needs "
                             "model.kind causal_lm and data.text.format qa")
        if self.data.forget_tokens == "fact":
            if not (lm and self.data.text.format == "qa"):
                raise ValueError("data.forget_tokens fact (the loss on each answer's fact span) needs "
                                 "model.kind causal_lm and data.text.format qa")
            if uses_refusals(self.method.spec):
                raise ValueError(f"data.forget_tokens fact: method {self.method.name} trains on refusals, "
                                 "which hold no fact span; use forget_tokens answer")
        if self.evaluation is not None and not (lm and self.data.text.format == "qa"):
            raise ValueError("evaluation scores answers to questions: it needs model.kind causal_lm "
                             "and data.text.format qa")
        if lm and (self.model.dtype == "bf16") != self.train.bf16:
            raise ValueError(f"model.dtype {self.model.dtype} and train.bf16 {self.train.bf16} "
                             "disagree: bf16 weights train in DeepSpeed's bf16 mode (fp32 master "
                             "weights); set both or neither")



def measures_steps(cfg: UnlearnConfig) -> bool:
    """Whether the job's rule steps measure their realised effects (train.measure, auto resolved)."""
    from hamu_ray.rules import RULES

    if cfg.data.forget is None or cfg.method.spec.implicit:
        return False
    if cfg.train.measure == "auto":
        return RULES[cfg.method.rule_name].guarantees is not None
    return cfg.train.measure


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> UnlearnConfig:
    refuse_pipeline(read_yaml(path), path)
    return load(path, overrides, UnlearnConfig)


def refuse_pipeline(raw: dict[str, Any], path: str | Path) -> None:
    """A pipeline where a job belongs: one message saying what to do instead (the schema's
    errors would be one per key the two do not share)."""
    if "methods" not in raw:
        return
    labels = [m.get("label") or m.get("name") for m in raw["methods"] if isinstance(m, dict)] \
        if isinstance(raw["methods"], list) else []
    example = f" (e.g. --method {labels[0]})" if labels and isinstance(labels[0], str) else ""
    raise ConfigError(f"{path} is a pipeline (it has methods:), not a job (method: and output_dir:): "
                      f"`hamu-ray run` runs it; `hamu-ray plan` and `hamu-ray hardness` take the job of "
                      f"one of its methods with --method LABEL{example}")


def parse_config(raw: dict[str, Any], source: str = "<config>", schema: type[Section] | None = None):
    """A job from a YAML mapping (or, with `schema`, another section)."""
    return validate(raw, source, schema or UnlearnConfig)
