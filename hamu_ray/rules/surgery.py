"""Explicit gradient surgery (EUPMU, two backprops): the bounded-utility-loss step.

With the unlearning direction u = −g_f, the step d = u + λ*·g_r with
λ* = max(0, (−g_r·u − ε)/‖g_r‖²) keeps the first-order retain increase of a unit step,
g_r·(−d), at or below ε (ε ≥ 0 allows an increase, ε < 0 demands a decrease); SGD at lr then
raises the retain loss by at most lr·ε to first order. λ* is computed on the whole model
(one multiplier, as in the paper). The one-backprop "implicit" variant is a loop-level method:
it keeps a dual weight across steps and so is not a per-step rule.

Not here: reducing statistics across ranks, the dual-weight update, logging.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hamu_ray.rules.stats import TINY, BlockStats, RuleResult, predicted_effects


@dataclass(frozen=True, kw_only=True)
class SurgeryParams:
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon)):
            raise ValueError(f"epsilon must be a finite number, got {self.epsilon!r}")


def surgery(stats: BlockStats, lr: float, params: SurgeryParams) -> RuleResult:
    total = stats.total()
    rr, rf = float(total.rr), float(total.rf)
    # −g_r·u = rf: the retain increase of a unit step along u; λ* pulls it down to ε.
    multiplier = max(0.0, (rf - params.epsilon) / rr) if rr > TINY else 0.0
    k = stats.num_blocks
    retain_coef = torch.full((k,), multiplier, dtype=torch.float64)
    forget_coef = torch.full((k,), -1.0, dtype=torch.float64)
    diagnostics = predicted_effects(stats, retain_coef, forget_coef, lr)
    diagnostics["surgery_multiplier"] = multiplier
    branch = "projected" if multiplier > 0 else "plain"
    return RuleResult(retain_coef, forget_coef, (branch,) * k, None, diagnostics)
