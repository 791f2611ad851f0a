"""HAMU: hardness-aware multi-objective unlearning, closed form per block (DESIGN §3).

HAMU-Q solves, for each block b,   min_Δ g_r·Δ   s.t.  g_f·Δ ≥ B_b,  ‖Δ‖ ≤ R_b.
The optimum is always Δ = α·g_f + β·g_r, so the rule returns the scalars and never sees a
gradient; Δ = −lr·d maps them to optimizer-gradient coefficients d = a·g_r + c·g_f.
HAMU-U is the reciprocal problem (max forget gain s.t. the retain loss drops by B), solved as
HAMU-Q on the effective pair (g_r, g_f) → (−g_f, −g_r).

Not here: summing statistics across ranks, touching parameters, logging (see hamu_ray.step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from hamu_ray.rules.stats import DTYPE, TINY, BlockStats, RuleResult, StopReason, predicted_effects

# sin²θ below this counts as colinear: g_r⊥ is then rounding noise, and its direction is meaningless.
COLINEAR_SIN2 = 1e-12
# B² > R²·ff·(1 + this) is infeasible: equality is the single feasible point Δ = (B/ff)·g_f.
FEASIBILITY_RTOL = 1e-12

RadiusMode = float | Literal["lr"]
Split = Literal["equal", "grad_norm", "exp_dot"]


@dataclass(frozen=True, kw_only=True)
class HamuParams:
    """constraint: B ≥ 0, the guaranteed first-order improvement per step (summed over blocks).
    radius: a fixed R > 0 per block, or "lr" for R_b = lr·‖g_r,b‖ (the direct branch is then an
    exact SGD step on the retain loss). full_grad: the whole model as one block (no split).
    constraint_split: how B is divided over blocks. on_infeasible: "stop" takes no step and stops;
    "ascent" takes the minimal-norm ascent (B/ff)·g_f, which leaves the radius.
    stop_on_criterion: stop when B exceeds the stopping rhs (otherwise only log the margin)."""

    constraint: float = 0.0
    radius: RadiusMode = "lr"
    full_grad: bool = False
    constraint_split: Split = "grad_norm"
    on_infeasible: Literal["stop", "ascent"] = "stop"
    stop_on_criterion: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.constraint, (int, float)) and math.isfinite(self.constraint)
                and self.constraint >= 0):
            raise ValueError(f"constraint must be a finite number ≥ 0, got {self.constraint!r}")
        if self.radius != "lr" and not (
            isinstance(self.radius, (int, float)) and not isinstance(self.radius, bool)
            and math.isfinite(self.radius) and self.radius > 0
        ):
            raise ValueError(f"radius must be a number > 0 or 'lr', got {self.radius!r}")
        _check_choice("constraint_split", self.constraint_split, ("equal", "grad_norm", "exp_dot"))
        _check_choice("on_infeasible", self.on_infeasible, ("stop", "ascent"))


def hamu_q(stats: BlockStats, lr: float, params: HamuParams) -> RuleResult:
    """HAMU-Q: guarantee a forget gain B at the least first-order retain cost."""
    return _hamu(stats, lr, params, reciprocal=False)


def hamu_u(stats: BlockStats, lr: float, params: HamuParams) -> RuleResult:
    """HAMU-U: guarantee a retain-loss drop B at the greatest first-order forget gain."""
    return _hamu(stats, lr, params, reciprocal=True)


def _hamu(stats: BlockStats, lr: float, params: HamuParams, *, reciprocal: bool) -> RuleResult:
    solved = stats.total() if params.full_grad else stats
    # Effective problem: HAMU-U is HAMU-Q on (g_r, g_f) → (−g_f, −g_r): rr↔ff swap, rf unchanged.
    eff = BlockStats(rr=solved.ff, ff=solved.rr, rf=solved.rf) if reciprocal else solved

    radius = lr * eff.rr.sqrt() if params.radius == "lr" else torch.full_like(eff.rr, params.radius)
    constraint = split_constraint(eff, params.constraint, params.constraint_split)
    alpha, beta, branch = solve_q(eff, constraint, radius, params.on_infeasible)
    rhs = stopping_rhs(eff, radius)

    stop = None
    if "infeasible" in branch:
        stop = StopReason.INFEASIBLE
    elif params.stop_on_criterion and params.constraint > rhs:
        stop = StopReason.CRITERION
    if stop is not None:  # no step is taken on a stop
        alpha, beta = torch.zeros_like(alpha), torch.zeros_like(beta)

    # Δ = α·g_f,eff + β·g_r,eff and d = −Δ/lr, in effective coordinates ...
    retain_coef, forget_coef = -beta / lr, -alpha / lr
    if reciprocal:  # ... mapped back: a·(−g_f) + c·(−g_r) = (−c)·g_r + (−a)·g_f
        retain_coef, forget_coef = -forget_coef, -retain_coef

    diagnostics = predicted_effects(solved, retain_coef, forget_coef, lr)
    diagnostics.update(cosine=stats.cosine(), radius=radius, constraint=constraint,
                       stop_rhs=float(rhs), stop_margin=float(rhs) - params.constraint)
    k = stats.num_blocks
    if params.full_grad:
        retain_coef, forget_coef, branch = retain_coef.expand(k), forget_coef.expand(k), branch * k
    return RuleResult(retain_coef=retain_coef.clone(), forget_coef=forget_coef.clone(),
                      branch=tuple(branch), stop=stop, diagnostics=diagnostics)


def solve_q(stats: BlockStats, constraint: torch.Tensor, radius: torch.Tensor,
            on_infeasible: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Closed-form HAMU-Q per block: Δ_b = α_b·g_f,b + β_b·g_r,b and the branch name taken.

    Branches: direct (Δ = −R·ĝ_r), rectified, colinear (Δ = (B/ff)·g_f), ascent (infeasible,
    minimal-norm ascent taken), infeasible (no step possible), zero (both gradients vanish).
    """
    rr, ff, rf = stats.rr, stats.ff, stats.rf
    B, R = constraint.to(DTYPE), radius.to(DTYPE)
    norm_r = rr.sqrt()
    alpha, beta = torch.zeros_like(rr), torch.zeros_like(rr)
    branch = []
    for b in range(stats.num_blocks):
        name, alpha_b, beta_b = _solve_block(float(rr[b]), float(ff[b]), float(rf[b]),
                                             float(B[b]), float(R[b]), float(norm_r[b]), on_infeasible)
        branch.append(name)
        alpha[b], beta[b] = alpha_b, beta_b
    return alpha, beta, branch


def _solve_block(rr: float, ff: float, rf: float, B: float, R: float, norm_r: float,
                 on_infeasible: str) -> tuple[str, float, float]:
    """(branch, α, β) for one block; scalars only, so the branch logic reads like DESIGN §3."""
    if ff <= TINY:  # no forget gradient: only B = 0 is reachable
        if B > 0:
            return "infeasible", 0.0, 0.0
        return ("direct", 0.0, -R / norm_r) if rr > TINY else ("zero", 0.0, 0.0)
    if B * B > R * R * ff * (1 + FEASIBILITY_RTOL):  # even Δ = R·ĝ_f gains less than B
        return ("ascent", B / ff, 0.0) if on_infeasible == "ascent" else ("infeasible", 0.0, 0.0)
    if rr <= TINY:  # flat retain loss: every feasible Δ costs nothing; take the shortest
        return "colinear", B / ff, 0.0
    if rf <= -B * norm_r / R:  # plain retain descent already gains B
        return "direct", 0.0, -R / norm_r
    perp_sq = max(rr * ff - rf * rf, 0.0) / ff  # ‖g_r⊥‖², g_r⊥ = g_r − (rf/ff)·g_f
    if perp_sq <= COLINEAR_SIN2 * rr:
        return "colinear", B / ff, 0.0
    # Δ = (B/ff)·g_f − σ·g_r⊥/‖g_r⊥‖, σ = √(R² − B²/ff), expanded in (g_f, g_r).
    sigma = math.sqrt(max(R * R - B * B / ff, 0.0))
    norm_perp = math.sqrt(perp_sq)
    return "rectified", B / ff + sigma * rf / (ff * norm_perp), -sigma / norm_perp


def split_constraint(stats: BlockStats, total: float, how: str) -> torch.Tensor:
    """B_b over blocks, summing to B. Degenerate weights (all zero) fall back to an equal split."""
    k = stats.num_blocks
    if how == "equal" or k == 1:
        weights = torch.ones(k, dtype=DTYPE)
    elif how == "grad_norm":
        weights = (stats.rr * stats.ff).sqrt()
    elif how == "exp_dot":
        weights = torch.softmax(-stats.rf, dim=0)  # exp(−rf_b), normalised without overflow
    else:
        raise ValueError(f"constraint_split must be one of equal, grad_norm, exp_dot, got {how!r}")
    if not bool(weights.sum() > 0):
        weights = torch.ones(k, dtype=DTYPE)
    return total * weights / weights.sum()


def stopping_rhs(stats: BlockStats, radius: torch.Tensor) -> float:
    """Σ_b R_b·√(rr·ff − rf²)/‖g_r,b‖ = Σ_b R_b·‖g_f,b‖·sin θ_b (the paper's criterion).

    The most forget gain any Δ inside the radii can make while keeping g_r·Δ ≤ 0 in the
    conflicting case; B above it means retain damage is unavoidable. A block with a flat retain
    loss (g_r ≈ 0) contributes R_b·‖g_f,b‖: nothing constrains it.
    """
    gram = (stats.rr * stats.ff - stats.rf**2).clamp_min(0.0).sqrt()
    flat = stats.rr <= TINY
    per_block = torch.where(flat, radius * stats.ff.sqrt(),
                            radius * gram / stats.rr.sqrt().clamp_min(math.sqrt(TINY)))
    return float(per_block.sum())


def _check_choice(field_name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field_name} must be one of {', '.join(choices)}, got {value!r}")
