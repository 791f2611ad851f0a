"""Unlearning rules: reduced per-block gradient statistics in, step coefficients out.

The one table of rules is RULES below; CLI choices, config validation and docs read it.
Pure torch: no Ray, DeepSpeed, MLflow or pydantic import belongs in this package.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from hamu_ray.rules import baselines, hamu, surgery
from hamu_ray.rules.stats import BlockStats, NonFiniteStatsError, RuleResult, StopReason, took_step

__all__ = ["RULES", "BlockStats", "NonFiniteStatsError", "Rule", "RuleResult", "RuleSpec",
           "StopReason", "get_rule", "took_step"]


@dataclass(frozen=True)
class RuleSpec:
    solve: Callable[[BlockStats, float, Any], RuleResult]
    params: type
    summary: str
    # the first-order quantity the rule keeps ≥ its constraint B on every step it takes
    # ("forget_gain": g_f·Δ, "retain_drop": −g_r·Δ); None: the rule promises no such bound
    guarantees: str | None = None


RULES: dict[str, RuleSpec] = {
    "hamu-q": RuleSpec(hamu.hamu_q, hamu.HamuParams,
                       "guarantee forget gain B at least retain cost within radius R", "forget_gain"),
    "hamu-u": RuleSpec(hamu.hamu_u, hamu.HamuParams,
                       "guarantee retain-loss drop B at most forget cost within radius R", "retain_drop"),
    "surgery": RuleSpec(surgery.surgery, surgery.SurgeryParams,
                        "explicit gradient surgery: retain increase bounded by epsilon"),
    "gdiff": RuleSpec(baselines.gdiff, baselines.NoParams, "gradient difference (g_r − g_f)/2"),
    "gru": RuleSpec(baselines.gru, baselines.ProjectionParams,
                    "unlearning direction projected off g_r on conflict"),
    "pcgrad": RuleSpec(baselines.pcgrad, baselines.ProjectionParams,
                       "symmetric projection of g_r and unlearning direction on conflict"),
    "ga": RuleSpec(baselines.ga, baselines.NoParams, "gradient ascent on the forget loss"),
    "ft": RuleSpec(baselines.ft, baselines.NoParams, "fine-tune on the retain set only"),
}


@dataclass(frozen=True)
class Rule:
    name: str
    spec: RuleSpec
    params: Any

    def __call__(self, stats: BlockStats, lr: float) -> RuleResult:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
        stats.check_finite()
        return self.spec.solve(stats, float(lr), self.params)


def get_rule(name: str, **hparams: Any) -> Rule:
    """The rule called `name` with its hyper-parameters; ValueError names anything unknown or bad."""
    if name not in RULES:
        raise ValueError(f"unknown rule {name!r}; valid rules: {', '.join(RULES)}")
    spec = RULES[name]
    fields = {f.name: f for f in dataclasses.fields(spec.params)}
    unknown = sorted(set(hparams) - set(fields))
    if unknown:
        valid = ", ".join(fields) or "none"
        raise ValueError(f"rule {name!r} has no hyper-parameter(s) {', '.join(unknown)}; valid: {valid}")
    for key, value in hparams.items():
        if fields[key].type in ("bool",) and not isinstance(value, bool):
            raise ValueError(f"rule {name!r}: {key} must be true or false, got {value!r}")
    # a missing required field would surface as the dataclass's TypeError; name it instead
    missing = [f.name for f in fields.values() if f.name not in hparams
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"rule {name!r} needs hyper-parameter(s) {', '.join(missing)}")
    return Rule(name, spec, spec.params(**hparams))
