"""Baseline rules in the same coefficient form d_b = a_b·g_r,b + c_b·g_f,b (docs/design.md §2).

FT descends the retain loss, GA ascends the forget loss, GradDiff averages the two. GRU and
PCGrad change the direction only when retain and unlearning conflict (rf > 0: descending the
unlearning direction u = −g_f would raise the retain loss); otherwise GRU is GA and PCGrad is
GradDiff. Objective-level baselines (KL, SCRUB, NPO, SimNPO) change the losses, not the rule.

Not here: losses, reductions across ranks, logging.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hamu_ray.rules.stats import TINY, BlockStats, RuleResult, predicted_effects


@dataclass(frozen=True, kw_only=True)
class NoParams:
    pass


@dataclass(frozen=True, kw_only=True)
class ProjectionParams:
    """full_grad: project on the whole-model gradients (default) or per block."""

    full_grad: bool = True


def ft(stats: BlockStats, lr: float, params: NoParams) -> RuleResult:
    return _fixed(stats, lr, retain=1.0, forget=0.0)


def ga(stats: BlockStats, lr: float, params: NoParams) -> RuleResult:
    return _fixed(stats, lr, retain=0.0, forget=-1.0)


def gdiff(stats: BlockStats, lr: float, params: NoParams) -> RuleResult:
    return _fixed(stats, lr, retain=0.5, forget=-0.5)


def gru(stats: BlockStats, lr: float, params: ProjectionParams) -> RuleResult:
    """d = u, projected onto the normal plane of g_r on conflict: u − (u·g_r/‖g_r‖²)·g_r."""

    def coefs(s: BlockStats) -> tuple[torch.Tensor, torch.Tensor]:
        conflict = (s.rf > 0) & (s.rr > TINY)
        retain = torch.where(conflict, s.rf / s.rr.clamp_min(TINY), 0.0)  # −(u·g_r)/rr, u·g_r = −rf
        return retain, torch.full_like(s.rr, -1.0), conflict

    return _projection(stats, lr, params.full_grad, coefs)


def pcgrad(stats: BlockStats, lr: float, params: ProjectionParams) -> RuleResult:
    """Mean of g_r and u, each projected off the other on conflict (so no conflict = GradDiff)."""

    def coefs(s: BlockStats) -> tuple[torch.Tensor, torch.Tensor]:
        conflict = (s.rf > 0) & (s.rr > TINY) & (s.ff > TINY)
        # g_r' = g_r − (rf/ff)·g_f and u' = −g_f + (rf/rr)·g_r; d = (g_r' + u')/2.
        retain = torch.where(conflict, 1 + s.rf / s.rr.clamp_min(TINY), 1.0) / 2
        forget = torch.where(conflict, -1 - s.rf / s.ff.clamp_min(TINY), -1.0) / 2
        return retain, forget, conflict

    return _projection(stats, lr, params.full_grad, coefs)


def _fixed(stats: BlockStats, lr: float, *, retain: float, forget: float) -> RuleResult:
    a, c = torch.full_like(stats.rr, retain), torch.full_like(stats.rr, forget)  # the stats' device
    return RuleResult(a, c, ("fixed",) * stats.num_blocks, None, predicted_effects(stats, a, c, lr))


def _projection(stats: BlockStats, lr: float, full_grad: bool, coefs) -> RuleResult:
    solved = stats.total() if full_grad else stats
    a, c, conflict = coefs(solved)
    branch = ["projected" if x else "plain" for x in conflict.tolist()]
    k = stats.num_blocks
    if full_grad:
        a, c, branch = a.expand(k).clone(), c.expand(k).clone(), branch * k
    return RuleResult(a, c, tuple(branch), None, predicted_effects(stats, a, c, lr))
