"""HAMU: hardness-aware multi-objective unlearning, from the K×3 statistics (docs/design.md §2).

HAMU-Q solves   min_Δ Σ_b g_r,b·Δ_b   s.t.  Σ_b g_f,b·Δ_b ≥ B,  ‖Δ_b‖ ≤ R_b.
A fixed split (equal, grad_norm, exp_dot) first divides B into per-block shares B_b and solves each
block in closed form; the "optimal" split solves the coupled problem through its one multiplier λ.
Either way Δ_b = α_b·g_f,b + β_b·g_r,b, so the rule returns scalars and never sees a gradient;
Δ = −lr·d maps them to optimizer-gradient coefficients d = a·g_r + c·g_f.
HAMU-U is the reciprocal problem (max forget gain s.t. the retain loss drops by B), solved as
HAMU-Q on the effective pair (g_r, g_f) → (−g_f, −g_r).

Order of decisions on every step: (1) is B reachable at all, Σ_b R_b·‖g_f,b‖ ≥ B? If not, the
on_infeasible policy stops or takes the minimal-norm ascent. (2) With stop_on_criterion, stop when B
exceeds the damage-free reach D* (coupled over blocks, exact). (3) Otherwise split and solve.

Device: every tensor follows the statistics' device and dtype (CUDA statistics stay on CUDA); the
host reads back only what the result must hold as Python values (branch names, the stop decision,
scalar diagnostics) plus one read per water-filling round of a fixed split.

Not here: summing statistics across ranks, touching parameters, logging (see hamu_ray.engine.step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from hamu_ray.rules.stats import (SQRT_TINY, TINY, BlockStats, RuleResult, StopReason, check_number,
                                  predicted_effects)

# sin²θ below this counts as colinear: g_r⊥ is then rounding noise, and its direction is meaningless.
COLINEAR_SIN2 = 1e-12
# B above (its reach)·(1 + this) is out of reach: equality is the single feasible point R·ĝ_f.
FEASIBILITY_RTOL = 1e-12
# Bisection steps on φ ∈ [0, π/2] (λ = scale·tan φ): float64 has 53 bits, so 100 halvings reach
# the last ulp of φ whatever the root; a fixed count needs no host read inside the loop.
BISECTION_STEPS = 100

RadiusMode = float | Literal["lr"]
Split = Literal["equal", "grad_norm", "exp_dot", "optimal"]
SPLITS = ("equal", "grad_norm", "exp_dot", "optimal")
CONSTRAINT_UNITS = ("absolute", "reach", "damage_free")


@dataclass(frozen=True, kw_only=True)
class HamuParams:
    """constraint: B ≥ 0, the guaranteed first-order improvement per step (summed over blocks);
    required, since a rule without it guarantees nothing.
    radius: a fixed R > 0 per block, or "lr" for R_b = lr·‖g_r,b‖ of the *effective* retain
    gradient: lr·‖g_r,b‖ for HAMU-Q (the direct branch is then an SGD step on the retain loss) and
    lr·‖g_f,b‖ for HAMU-U. full_grad: the whole model as one block (no split).
    constraint_split: how B is divided over blocks (fixed shares, or the exact "optimal" split).
    on_infeasible: when B > Σ_b R_b·‖g_f,b‖, "stop" takes no step and stops; "ascent" takes the
    minimal-norm ascent Δ = (B/Σ_b ff_b)·g_f, which leaves the radius.
    stop_on_criterion: stop when B exceeds the damage-free reach D* (otherwise only log the margin).
    constraint_unit: what B is measured in. "absolute": loss units (a B tuned on one data set or
    objective does not transfer); "reach": a fraction of the step's largest gain inside the radii
    (Σ_b R_b·‖g_f,b‖, so B ≤ 1 is always reachable); "damage_free": a fraction of the damage-free
    reach D* (B ≤ 1 never needs retain damage to first order). The two fractions shrink as the
    forget gradient does, so B decays as forgetting progresses.
    trust_tolerance: None, a fixed radius; a number > 0, an adaptive one (a trust region, docs/
    design.md §3b): the engine measures every step's retain change and scales R and B by
    trust_scale, halved when the realised change exceeds the first-order prediction by more than
    this (retain-loss units), doubled back towards 1 when the prediction is accurate.
    trust_scale: the trust region's current factor in (0, 1] on R and on an absolute B; the
    engine sets it, 1 otherwise."""

    constraint: float
    radius: RadiusMode = "lr"
    full_grad: bool = False
    constraint_split: Split = "grad_norm"
    on_infeasible: Literal["stop", "ascent"] = "stop"
    stop_on_criterion: bool = True
    constraint_unit: Literal["absolute", "reach", "damage_free"] = "absolute"
    trust_tolerance: float | None = None
    trust_scale: float = 1.0

    def __post_init__(self) -> None:
        check_number("constraint", self.constraint, low=0.0)
        _check_choice("constraint_unit", self.constraint_unit, CONSTRAINT_UNITS)
        if self.constraint_unit != "absolute" and self.constraint > 1:
            reach = "reach" if self.constraint_unit == "reach" else "damage-free reach"
            raise ValueError(f"constraint is a fraction of the {reach} under constraint_unit "
                             f"{self.constraint_unit}: at most 1, got {self.constraint!r}")
        if self.trust_tolerance is not None:
            check_number("trust_tolerance", self.trust_tolerance, low=0.0, strict=True)
        check_number("trust_scale", self.trust_scale, low=0.0, strict=True)
        if self.trust_scale > 1:
            raise ValueError(f"trust_scale must be at most 1, got {self.trust_scale!r}")
        if self.radius != "lr":
            try:
                check_number("radius", self.radius, low=0.0, strict=True)
            except ValueError:
                raise ValueError(f"radius must be a number > 0 or 'lr', got {self.radius!r}") from None
        _check_choice("constraint_split", self.constraint_split, SPLITS)
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
    scale = params.trust_scale  # the trust region shrinks R and B together
    radius = scale * (lr * eff.rr.sqrt() if params.radius == "lr" else torch.full_like(eff.rr, params.radius))
    reach = forget_reach(eff, radius)
    exact_rhs, paper = damage_free_reach(eff, radius), paper_rhs(eff, radius)
    B = step_constraint(params, float(reach.sum()), exact_rhs)

    stop = None
    if B > float(reach.sum()) * (1 + FEASIBILITY_RTOL):  # no step inside the radii gains B
        alpha, beta, branch, stop = _out_of_reach(eff, B, params.on_infeasible)
        # logged per block: the ascent's gains, or B spread evenly (no split of it is reachable)
        constraint = torch.full_like(eff.ff, B / eff.num_blocks) if stop is not None else alpha * eff.ff
    else:
        alpha, beta, branch, constraint = _solve(eff, B, radius, params.constraint_split)
        if "infeasible" in branch:  # a share over its cap: the capped splits never make one
            stop = StopReason.INFEASIBLE
        elif params.stop_on_criterion and B > exact_rhs:  # the retain loss must rise to gain B
            stop = StopReason.CRITERION
        if stop is not None:  # no step is taken on a stop
            alpha, beta = torch.zeros_like(alpha), torch.zeros_like(beta)

    # Δ = α·g_f,eff + β·g_r,eff and d = −Δ/lr, in effective coordinates ...
    retain_coef, forget_coef = -beta / lr, -alpha / lr
    if reciprocal:  # ... mapped back: a·(−g_f) + c·(−g_r) = (−c)·g_r + (−a)·g_f
        retain_coef, forget_coef = -forget_coef, -retain_coef

    diagnostics = predicted_effects(solved, retain_coef, forget_coef, lr)
    diagnostics.update(cosine=stats.cosine(), radius=radius, constraint=constraint,
                       max_gain=float(reach.sum()), stop_rhs=exact_rhs, stop_margin=exact_rhs - B,
                       paper_rhs=paper, constraint_total=B, trust_scale=scale)
    k = stats.num_blocks
    if params.full_grad:
        retain_coef, forget_coef, branch = retain_coef.expand(k), forget_coef.expand(k), branch * k
    return RuleResult(retain_coef=retain_coef.clone(), forget_coef=forget_coef.clone(),
                      branch=tuple(branch), stop=stop, diagnostics=diagnostics)


def step_constraint(params: HamuParams, reach: float, damage_free: float) -> float:
    """This step's B in loss units: the constraint itself (scaled by the trust region), or its
    fraction of the step's reach or damage-free reach (the radii already carry the scale)."""
    if params.constraint_unit == "reach":
        return params.constraint * reach
    if params.constraint_unit == "damage_free":
        return params.constraint * damage_free
    return params.constraint * params.trust_scale


def _out_of_reach(stats: BlockStats, B: float, on_infeasible: str):
    """(α, β, branch, stop) when B > Σ_b R_b·‖g_f,b‖: stop, or the minimal-norm ascent.

    The shortest Δ with Σ_b g_f,b·Δ_b = B over the whole model is (B/Σ_b ff_b)·g_f in every block.
    """
    k, zero = stats.num_blocks, torch.zeros_like(stats.ff)
    total_ff = float(stats.ff.sum())
    if on_infeasible == "ascent" and total_ff > TINY:
        return torch.full_like(stats.ff, B / total_ff), zero, ["ascent"] * k, None
    return zero, zero.clone(), ["infeasible"] * k, StopReason.INFEASIBLE


def _solve(stats: BlockStats, B: float, radius: torch.Tensor, split: str):
    """(α, β, branch, per-block constraint) of a reachable B under the chosen split."""
    if split == "optimal":
        alpha, beta, branch = solve_optimal(stats, B, radius)
        return alpha, beta, branch, alpha * stats.ff + beta * stats.rf  # the gain each block makes
    shares = split_constraint(stats, B, split, radius)
    alpha, beta, branch = solve_q(stats, shares, radius)
    return alpha, beta, branch, shares


def forget_reach(stats: BlockStats, radius: torch.Tensor) -> torch.Tensor:
    """R_b·‖g_f,b‖ per block: the most forget gain block b can make inside its radius."""
    return torch.where(stats.ff > TINY, radius * stats.ff.sqrt(), 0.0)


def damage_free_reach(stats: BlockStats, radius: torch.Tensor) -> float:
    """D* = max Σ_b g_f,b·Δ_b  s.t.  Σ_b g_r,b·Δ_b ≤ 0, ‖Δ_b‖ ≤ R_b: the largest forget gain no
    step inside the radii can exceed without raising the *total* first-order retain loss.

    Coupled over blocks (one block may raise its own retain loss while another pays it back), so
    the per-block sum of R_b·‖g_f,b‖·sin θ_b is only a lower bound. By duality (Δ = −ε·g_r is
    strictly feasible, so there is no gap) D* = min over μ ≥ 0 of the convex
    F(μ) = Σ_b R_b·‖g_f,b − μ·g_r,b‖ (docs/design.md §3). B above D* makes retain damage unavoidable.
    Any μ gives an upper bound F(μ) ≥ D*, so a bisection error can only delay a stop, never cause one.
    """
    dual = _DamageFreeDual(stats, radius)
    return float(dual.value(dual.argmin()))


class _DamageFreeDual:
    """F(μ) = Σ_b R_b·n_b(μ), n_b(μ) = ‖g_f,b − μ·g_r,b‖ = hypot(‖g_f⊥,b‖, ‖g_r,b‖·(μ − s_b)),
    s_b = rf_b/rr_b (the sum of squares keeps n_b accurate near its zero at s_b, where a colinear
    block's term has a kink). A flat retain block (rr ≈ 0) adds the constant R_b·‖g_f,b‖."""

    def __init__(self, stats: BlockStats, radius: torch.Tensor) -> None:
        rr, ff, rf = stats.rr, stats.ff, stats.rf
        self.R = radius.to(rr)
        self.has_r = rr > TINY
        self.norm_r = torch.where(self.has_r, rr.sqrt(), 0.0)
        self.s = torch.where(self.has_r, rf / rr.clamp_min(TINY), 0.0)
        perp_sq = torch.where(self.has_r, ff - rf * rf / rr.clamp_min(TINY), ff)
        self.norm_perp = perp_sq.clamp_min(0.0).sqrt()

    def _x_and_norm(self, mu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm_r * (mu - self.s)  # ‖g_r‖·(μ − s): (μ·g_r − g_f)·ĝ_r
        return x, torch.hypot(self.norm_perp, x)

    def value(self, mu: torch.Tensor) -> torch.Tensor:
        return (self.R * self._x_and_norm(mu)[1]).sum()

    def slope(self, mu: torch.Tensor) -> torch.Tensor:
        """F'(μ) = Σ_b R_b·(μ·rr_b − rf_b)/n_b; at a kink (n_b = 0) that block's term is 0, a
        subgradient, so the sign test below still brackets the minimum of the convex F."""
        x, norm = self._x_and_norm(mu)
        return (self.R * self.norm_r * x / norm.clamp_min(SQRT_TINY)).sum()

    def argmin(self) -> torch.Tensor:
        """μ* in [0, max_b s_b]: beyond every s_b each term increases, and F'(0) ≥ 0 gives μ* = 0.
        Fixed-count bisection on the sign of F' (no host read inside the loop)."""
        lo = self.R.new_zeros(())
        hi = self.s.max().clamp_min(0.0) if self.s.numel() else lo
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            rising = self.slope(mid) >= 0
            lo, hi = torch.where(rising, lo, mid), torch.where(rising, mid, hi)
        return hi


def paper_rhs(stats: BlockStats, radius: torch.Tensor) -> float:
    """The paper's Σ_b R_b·√(rr·ff − rf²)/‖g_r,b‖ = Σ_b R_b·‖g_f,b‖·sin θ_b (logged only).

    Exact only for conflicting blocks: it undercounts what a non-conflicting block reaches.
    """
    return float(_paper_per_block(stats, radius).sum())


def _paper_per_block(stats: BlockStats, radius: torch.Tensor) -> torch.Tensor:
    gram = (stats.rr * stats.ff - stats.rf**2).clamp_min(0.0).sqrt()
    sin_part = radius * gram / stats.rr.sqrt().clamp_min(SQRT_TINY)
    return torch.where(stats.rr <= TINY, forget_reach(stats, radius), sin_part)


# Branch codes of solve_q, in the order docs/design.md §2 lists them; names are read back once per step.
_BRANCHES = ("zero", "direct", "colinear", "rectified", "infeasible")
_ZERO, _DIRECT, _COLINEAR, _RECTIFIED, _INFEASIBLE = range(len(_BRANCHES))


def solve_q(stats: BlockStats, constraint: torch.Tensor, radius: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Closed-form HAMU-Q per block with share B_b: Δ_b = α_b·g_f,b + β_b·g_r,b and its branch.

    Branches: direct (Δ = −R·ĝ_r), rectified, colinear (Δ = (B/ff)·g_f), infeasible (B_b beyond
    R_b·‖g_f,b‖: no step; the capped splits never produce it), zero (both gradients vanish).
    Vectorised over blocks: every candidate is computed and torch.where picks the branch.
    """
    rr, ff, rf = stats.rr, stats.ff, stats.rf
    B, R = constraint.to(rr), radius.to(rr)
    has_r, has_f = rr > TINY, ff > TINY
    norm_r, safe_ff = rr.sqrt().clamp_min(SQRT_TINY), ff.clamp_min(TINY)
    perp_sq = ((rr * ff - rf * rf) / safe_ff).clamp_min(0.0)  # ‖g_r⊥‖², g_r⊥ = g_r − (rf/ff)·g_f
    norm_perp = perp_sq.sqrt().clamp_min(SQRT_TINY)

    # Lowest priority first: each later where overrides the ones before it.
    code = torch.full_like(rr, _RECTIFIED)
    code = torch.where(perp_sq <= COLINEAR_SIN2 * rr, _COLINEAR, code)
    code = torch.where(has_r & (rf * R <= -B * norm_r), _DIRECT, code)  # retain descent gains B_b
    code = torch.where(~has_r, _COLINEAR, code)  # flat retain loss: the shortest feasible Δ
    code = torch.where(~has_f, torch.where(has_r, _DIRECT, _ZERO), code)
    out_of_reach = torch.where(has_f, B > R * ff.sqrt() * (1 + FEASIBILITY_RTOL), B > 0)
    code = torch.where(out_of_reach, _INFEASIBLE, code)

    # Rectified: Δ = (B/ff)·g_f − σ·g_r⊥/‖g_r⊥‖, σ = √(R² − B²/ff), expanded in (g_f, g_r).
    sigma = (R * R - B * B / safe_ff).clamp_min(0.0).sqrt()
    colinear_alpha = B / safe_ff
    rectified_alpha = colinear_alpha + sigma * rf / (safe_ff * norm_perp)
    alpha = torch.where(code == _COLINEAR, colinear_alpha,
                        torch.where(code == _RECTIFIED, rectified_alpha, 0.0))
    beta = torch.where(code == _DIRECT, -R / norm_r,
                       torch.where(code == _RECTIFIED, -sigma / norm_perp, 0.0))
    return alpha, beta, [_BRANCHES[int(c)] for c in code.tolist()]


def split_constraint(stats: BlockStats, total: float, how: str, radius: torch.Tensor) -> torch.Tensor:
    """Shares B_b of a fixed split, summing to B whenever Σ_b R_b·‖g_f,b‖ ≥ B.

    Each block's share is capped at its reach R_b·‖g_f,b‖ (zero without a forget gradient), so no
    share is infeasible while the total is reachable: B goes out by the split's weights over the
    uncapped blocks, shares over their cap are clamped, and the remainder is spread over the rest
    (water-filling; each round caps at least one block, so at most K rounds).
    """
    caps = forget_reach(stats, radius)
    log_w = _log_weights(stats, how)
    shares, free, remaining = torch.zeros_like(caps), caps > 0, float(total)
    for _ in range(stats.num_blocks):
        if remaining <= 0 or not bool(free.any()):
            break
        trial = remaining * _normalise(log_w, free)
        over = free & (trial > caps)
        if not bool(over.any()):
            return torch.where(free, trial, shares)
        shares = torch.where(over, caps, shares)
        remaining -= float(torch.where(over, caps, 0.0).sum())
        free = free & ~over
    return shares


def _log_weights(stats: BlockStats, how: str) -> torch.Tensor:
    """log of the split's weights: logs keep exp(−rf) and ‖g_r‖·‖g_f‖ free of overflow."""
    if how == "equal":
        return torch.zeros_like(stats.rr)
    if how == "grad_norm":  # ‖g_r,b‖·‖g_f,b‖
        return 0.5 * (stats.rr.log() + stats.ff.log())
    if how == "exp_dot":  # exp(−rf_b)
        return -stats.rf
    raise ValueError(f"constraint_split must be one of {', '.join(SPLITS)}, got {how!r}")


def _normalise(log_w: torch.Tensor, free: torch.Tensor) -> torch.Tensor:
    """Weights over the free blocks summing to 1; all-zero weights fall back to an equal split."""
    masked = torch.where(free, log_w, -math.inf)
    fallback = torch.where(free, 0.0, -math.inf)
    return torch.softmax(torch.where(torch.isfinite(masked).any(), masked, fallback), dim=0)


def solve_optimal(stats: BlockStats, total: float, radius: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The exact split (docs/design.md §2): Δ_b = −R_b·u_b/‖u_b‖, u_b = g_r,b − λ*·g_f,b, as (α, β, branch).

    λ* = 0 when the plain retain descent already gains B; otherwise the least λ with G(λ) ≥ B,
    found by bisection and taken at the bracket's upper end so the guarantee holds. The caller has
    checked B ≤ Σ_b R_b·‖g_f,b‖. A colinear block (sin²θ ≈ 0, or a flat retain loss) has u_b ≈ 0
    at λ = t_b = rf/ff, where its gain jumps; it is stepped along ±ĝ_r or ĝ_f instead of u_b, and
    the blocks whose jump sits at λ* take the part of B the others leave (any split of it costs
    the same, λ* per unit of gain).
    """
    p = _OptimalProblem(stats, radius)
    zero = p.cap.new_zeros(())
    if float(p.gains(zero).sum()) >= total:  # one host read: skips the bisection when λ* = 0
        lam_lo = lam_hi = zero
    else:
        lam_lo, lam_hi = p.bracket(total)
    gains = p.gains(lam_hi)
    marginal = p.colinear & (p.t >= 0) & (p.t <= lam_hi) & ((p.t > lam_lo) | (lam_hi == 0))
    # The marginal blocks share what the others leave, at one fraction s of their reach.
    need = total - torch.where(marginal, 0.0, gains).sum()
    marginal_cap = torch.where(marginal, p.cap, 0.0).sum()
    lowest = torch.where(lam_hi > 0, -1.0, 0.0)  # at λ* = 0 (flat retain) a negative s buys nothing
    s = torch.where(marginal_cap > 0, need / marginal_cap.clamp_min(TINY), 0.0).clamp(max=1.0)
    s = torch.maximum(s, lowest)
    return p.coefficients(lam_hi, marginal, s)


class _OptimalProblem:
    """The per-block pieces of the optimal split that do not depend on λ."""

    def __init__(self, stats: BlockStats, radius: torch.Tensor) -> None:
        rr, ff, rf = stats.rr, stats.ff, stats.rf
        self.R = radius.to(rr)
        self.has_r, self.has_f = rr > TINY, ff > TINY
        self.norm_r, self.norm_f = rr.sqrt().clamp_min(SQRT_TINY), ff.sqrt()
        # ‖u_b(λ)‖² = ‖g_r⊥‖² + ff·(λ − t)²: the sum of squares keeps ‖u_b‖ accurate near λ = t.
        self.t = torch.where(self.has_r & self.has_f, rf / ff.clamp_min(TINY), 0.0)
        self.norm_perp = ((rr * ff - rf * rf) / ff.clamp_min(TINY)).clamp_min(0.0).sqrt()
        self.colinear = self.has_f & (~self.has_r | (self.norm_perp**2 <= COLINEAR_SIN2 * rr))
        self.smooth = self.has_f & ~self.colinear
        self.cap = forget_reach(stats, radius)
        self.direct_gain = torch.where(self.has_r, -self.R * rf / self.norm_r, 0.0)  # Δ = −R·ĝ_r

    def _norm_u(self, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norm_f * (lam - self.t)  # ‖g_f‖·(λ − t): −g_f·u_b/‖g_f‖
        return x, torch.hypot(self.norm_perp, x).clamp_min(SQRT_TINY)

    def ascends(self, lam: torch.Tensor) -> torch.Tensor:
        """Colinear blocks past their jump (0 ≤ t ≤ λ): stepped along +ĝ_f."""
        return self.colinear & (self.t >= 0) & (self.t <= lam)

    def gains(self, lam: torch.Tensor) -> torch.Tensor:
        """g_f,b·Δ_b(λ) per block; at a colinear jump the upper value (non-decreasing in λ)."""
        x, norm_u = self._norm_u(lam)
        smooth = self.R * self.norm_f * x / norm_u
        gain = torch.where(self.ascends(lam), self.cap, self.direct_gain)
        return torch.where(self.smooth, smooth, gain)

    def bracket(self, total: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ_lo, λ_hi) with G(λ_lo) < B ≤ G(λ_hi), within an ulp: bisection on λ = scale·tan φ.

        tan maps [0, π/2] onto [0, ∞) (tan of the float π/2 is 1.6e16), so no doubling search;
        scale = the largest ‖g_r,b‖/‖g_f,b‖ puts every jump and bend at a moderate φ.
        """
        ratio = torch.where(self.has_r & self.has_f, self.norm_r / self.norm_f.clamp_min(SQRT_TINY), 0.0)
        scale = ratio.max()
        scale = torch.where(scale > 0, scale, 1.0)
        lo, hi = torch.zeros_like(scale), torch.full_like(scale, math.pi / 2)
        for _ in range(BISECTION_STEPS):
            mid = (lo + hi) / 2
            enough = self.gains(scale * torch.tan(mid)).sum() >= total
            lo, hi = torch.where(enough, lo, mid), torch.where(enough, mid, hi)
        return scale * torch.tan(lo), scale * torch.tan(hi)

    def coefficients(self, lam: torch.Tensor, marginal: torch.Tensor, s: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(α, β, branch) in Δ_b = α_b·g_f,b + β_b·g_r,b."""
        _, norm_u = self._norm_u(lam)
        along_f = self.ascends(lam) | marginal  # colinear blocks stepped along ĝ_f
        # λ* = 0 is the plain retain descent: written as −R·ĝ_r, exactly the closed form's direct
        direct = (self.has_r & ~self.smooth & ~along_f) | (self.smooth & (lam == 0))
        alpha = torch.where(self.smooth, lam * self.R / norm_u,
                            torch.where(marginal, s, 1.0) * self.R / self.norm_f.clamp_min(SQRT_TINY))
        alpha = torch.where((along_f | self.smooth) & ~direct, alpha, 0.0)
        beta = torch.where(direct, -self.R / self.norm_r, torch.where(self.smooth, -self.R / norm_u, 0.0))
        code = torch.where(direct, 1, torch.where(self.smooth, 2, torch.where(along_f, 3, 0)))
        names = ("zero", "direct", "optimal", "colinear")
        return alpha, beta, [names[int(c)] for c in code.tolist()]


def _check_choice(field_name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{field_name} must be one of {', '.join(choices)}, got {value!r}")
