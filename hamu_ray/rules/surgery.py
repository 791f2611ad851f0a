"""Explicit gradient surgery (EUPMU, two backprops): the bounded-utility-loss step.

With the unlearning direction u = −g_f, the step d = u + λ*·g_r with
λ* = max(0, (−g_r·u − ε)/‖g_r‖²) keeps the first-order retain increase of a unit step,
g_r·(−d), at or below ε (ε ≥ 0 allows an increase, ε < 0 demands a decrease); SGD at lr then
raises the retain loss by at most lr·ε to first order. λ* is computed on the whole model
(one multiplier, as in the paper).

Implicit surgery (one backprop) solves the same problem by dual ascent: each step descends
L_u + w·L_r (L_u = −forget loss), then `dual_update` raises w when the measured retain rise per
unit step, (ℓ_r after − ℓ_r before)/lr, exceeds ε and lowers it (not below 0) otherwise. In the
paper's form: δ = (ℓ_r before − ℓ_r after)/lr + ε, w ← max(0, w − β·δ). Same ε sign as above.

Not here: reducing statistics across ranks, logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hamu_ray.rules.stats import TINY, BlockStats, RuleResult, check_number, predicted_effects


@dataclass(frozen=True, kw_only=True)
class SurgeryParams:
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        check_number("epsilon", self.epsilon)


@dataclass(frozen=True, kw_only=True)
class ImplicitSurgeryParams:
    epsilon: float = 0.0  # allowed retain-loss rise per unit step, as in SurgeryParams
    dual_lr: float = 1.0  # β: step size of the dual ascent on w
    initial_weight: float = 1.0  # w at step 1
    fast: bool = False  # measure "after" on the next step's retain batch: no extra forward

    def __post_init__(self) -> None:
        SurgeryParams(epsilon=self.epsilon)
        for name in ("dual_lr", "initial_weight"):
            check_number(name, getattr(self, name), low=0.0)
        if not isinstance(self.fast, bool):
            raise ValueError(f"fast must be true or false, got {self.fast!r}")


def dual_update(weight: float, retain_before: float, retain_after: float, lr: float,
                params: ImplicitSurgeryParams) -> float:
    """The dual weight for the next step: w ← max(0, w − β·((ℓ_before − ℓ_after)/lr + ε))."""
    delta = (retain_before - retain_after) / lr + params.epsilon
    return max(0.0, weight - params.dual_lr * delta)


def surgery(stats: BlockStats, lr: float, params: SurgeryParams) -> RuleResult:
    total = stats.total()
    # −g_r·u = rf: the retain increase of a unit step along u; λ* pulls it down to ε. Tensors on
    # the statistics' device throughout; the one host read is the branch name.
    multiplier = torch.where(total.rr > TINY,
                             ((total.rf - params.epsilon) / total.rr.clamp_min(TINY)).clamp_min(0.0), 0.0)
    k = stats.num_blocks
    retain_coef = multiplier.expand(k).clone()
    forget_coef = torch.full_like(stats.ff, -1.0)
    diagnostics = predicted_effects(stats, retain_coef, forget_coef, lr)
    diagnostics["surgery_multiplier"] = float(multiplier)
    branch = "projected" if diagnostics["surgery_multiplier"] > 0 else "plain"
    return RuleResult(retain_coef, forget_coef, (branch,) * k, None, diagnostics)
