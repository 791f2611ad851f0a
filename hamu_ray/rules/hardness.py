"""The hardness pre-flight's reading of full-pass statistics (docs/design.md §3, "Stopping criterion").

Given the K×3 statistics of the whole-set gradients g_r and g_f, the configured lr and radius:
- per block: cos θ_b (the hardness), R_b, the most forget gain inside R_b (R_b·‖g_f,b‖), and
  the most it gains without raising its *own* retain loss (R_b·‖g_f,b‖·sin θ_b when rf_b > 0, else all);
- the largest feasible B (Σ_b R_b·‖g_f,b‖: every split, water-filled, reaches it) and the largest B
  without unavoidable retain damage, D* (the stopping test's, coupled over blocks: at least the sum
  of the per-block figures, since one block may pay back another's retain cost);
- a verdict on the configured B, if any.
Everything is first order and per step: a step of radius R_b in block b. The statistics are read as
the job's rule reads them: clipped to clip_norm, one block in full-gradient mode, and HAMU-U's figures
are HAMU-Q's on the effective pair (g_r, g_f) → (−g_f, −g_r).
"""

from __future__ import annotations

import math

import torch

from hamu_ray.rules.hamu import HamuParams, _paper_per_block, damage_free_reach, forget_reach, step_constraint
from hamu_ray.rules.stats import TINY, BlockStats


def summarize(stats: BlockStats, *, lr: float, radius: float | str = "lr", reciprocal: bool = False,
              full_grad: bool = False, clip_norm: float | None = None,
              constraint: float | None = None, constraint_unit: str = "absolute", names: list[str] | None = None,
              batch_rr: torch.Tensor | None = None, batch_ff: torch.Tensor | None = None) -> dict:
    """The pre-flight's numbers as plain Python values (JSON-ready). With the batches' mean
    squared norms per block (batch_rr, batch_ff) also the reach of one step on a typical pair of
    batches (root-mean-square norms): a step's gradients carry the batches' noise on top of the
    whole-set gradient, so a step reaches further than the whole-set figures say.
    `blocks` lists the gradient's blocks as measured; the totals use the rule's view (full_grad,
    clip_norm), so the largest feasible B equals the rule's max_gain and D* its stop_rhs. A
    constraint in a unit other than "absolute" is judged in loss units (loss_units)."""
    names = names or [f"block {i}" for i in range(stats.num_blocks)]
    if len(names) != stats.num_blocks:
        raise ValueError(f"{len(names)} block names for {stats.num_blocks} blocks")
    seen = _as_the_rule_sees(stats, clip_norm)
    eff, radii = _effective(seen, lr, radius, reciprocal)
    reach, free = forget_reach(eff, radii), _reach_without_own_damage(eff, radii)
    solved, solved_radii = _effective(seen.total(), lr, radius, reciprocal) if full_grad else (eff, radii)
    total = stats.total()
    blocks = [{"name": name, "rr": float(rr), "ff": float(ff), "rf": float(rf), "cosine": float(cos),
               "radius": float(r), "reach": float(full), "reach_without_own_damage": float(ok)}
              for name, rr, ff, rf, cos, r, full, ok in zip(names, stats.rr, stats.ff, stats.rf, stats.cosine(),
                                                          radii, reach, free)]
    summary = {
        "lr": lr, "radius": radius, "reciprocal": reciprocal, "full_grad": full_grad, "clip_norm": clip_norm,
        "constraint": constraint, "constraint_unit": constraint_unit,
        "cosine_whole_model": float(total.cosine()[0]) if total.num_blocks else math.nan,
        "conflicting_blocks": int(((eff.rf > 0) & (eff.rr > TINY)).sum()),
        "max_feasible_constraint": float(forget_reach(solved, solved_radii).sum()),
        "max_constraint_without_damage": damage_free_reach(solved, solved_radii),
        "paper_rhs": float(_paper_per_block(solved, solved_radii).sum()),
        "blocks": blocks,
    }
    if batch_rr is not None and batch_ff is not None:
        summary["max_feasible_constraint_per_batch"] = _batch_reach(
            batch_rr, batch_ff, lr=lr, radius=radius, reciprocal=reciprocal, full_grad=full_grad, clip_norm=clip_norm)
        for block, rr, ff in zip(blocks, batch_rr.tolist(), batch_ff.tolist()):
            block.update(batch_rr=rr, batch_ff=ff)
    summary["verdict"] = verdict(summary)
    return summary


def loss_units(constraint: float, unit: str, summary: dict) -> float:
    """A first step's B in loss units (the rule's step_constraint on the pre-flight's whole-set
    reach and D*): the constraint itself, or its fraction of either."""
    params = HamuParams(constraint=constraint, constraint_unit=unit)
    return step_constraint(params, summary["max_feasible_constraint"], summary["max_constraint_without_damage"])


def verdict(summary: dict) -> str:
    """One paragraph a person can act on."""
    free, feasible, given = (summary["max_constraint_without_damage"], summary["max_feasible_constraint"],
                             summary["constraint"])
    gain = "retain-loss drop" if summary["reciprocal"] else "forget gain"
    damage = "forgetting less" if summary["reciprocal"] else "raising the retain loss"
    per_batch = summary.get("max_feasible_constraint_per_batch")
    text = (f"On the whole-set gradients a {gain} B up to {free:.4g} per step is reachable without {damage} "
            f"to first order (radius {_radius_text(summary)}); from there up to {feasible:.4g} only at a cost, "
            f"and beyond {feasible:.4g} not inside the radius. "
            f"{summary['conflicting_blocks']} of {len(summary['blocks'])} blocks conflict "
            f"(cos θ > 0; whole model cos θ = {summary['cosine_whole_model']:.3f}).")
    if per_batch is not None:
        text += (f" One step on a typical pair of batches reaches up to {per_batch:.4g}: the rest of that is "
                 "the batches' noise, which averages out over steps.")
    if given is None:
        return text
    unit = summary.get("constraint_unit", "absolute")
    B = loss_units(given, unit, summary)
    configured = (f"The configured B = {B:.4g}" if unit == "absolute" else
                  f"The configured B = {given:g} of the {'damage-free reach' if unit == 'damage_free' else 'reach'} "
                  f"(first step: {B:.4g})")
    if B <= free:
        return text + f" {configured} is inside the damage-free range."
    if B <= feasible:
        return text + (f" {configured} is feasible but costs {damage}: the stopping "
                       "criterion stops such steps unless stop_on_criterion is off.")
    if per_batch is not None and B <= per_batch:
        return text + (f" {configured} is beyond the whole-set reach but within a batch's: "
                       "steps can meet it only by following batch noise (a larger radius or a smaller B "
                       "is the systematic choice).")
    return text + f" {configured} is out of reach: steps would be infeasible."


def _as_the_rule_sees(stats: BlockStats, clip_norm: float | None) -> BlockStats:
    """g_r and g_f each clipped to clip_norm by their global norm, as the step does before the rule."""
    if clip_norm is None:
        return stats
    scale = [min(1.0, clip_norm / norm) if norm > 0 else 1.0 for norm in (float(stats.rr.sum()) ** 0.5,
                                                                           float(stats.ff.sum()) ** 0.5)]
    return stats.scaled(*scale)


def _effective(stats: BlockStats, lr: float, radius: float | str, reciprocal: bool
               ) -> tuple[BlockStats, torch.Tensor]:
    """The rule's effective statistics (HAMU-U swaps g_r and g_f) and its radii."""
    eff = BlockStats(rr=stats.ff, ff=stats.rr, rf=stats.rf) if reciprocal else stats
    return eff, lr * eff.rr.sqrt() if radius == "lr" else torch.full_like(eff.rr, float(radius))


def _reach_without_own_damage(eff: BlockStats, radii: torch.Tensor) -> torch.Tensor:
    """Per block: R_b·‖g_f,b‖·sin θ_b when the pair conflicts, else R_b·‖g_f,b‖ (the block alone)."""
    conflict = (eff.rf > 0) & (eff.rr > TINY)
    return torch.where(conflict, _paper_per_block(eff, radii), forget_reach(eff, radii))


def _batch_reach(batch_rr: torch.Tensor, batch_ff: torch.Tensor, *, lr: float, radius: float | str,
                 reciprocal: bool, full_grad: bool, clip_norm: float | None) -> float:
    """Σ_b R_b·‖g_f,b‖ on a typical pair of batches (root-mean-square norms), as the rule sees them."""
    batch = _as_the_rule_sees(BlockStats(rr=batch_rr, ff=batch_ff, rf=torch.zeros_like(batch_rr)), clip_norm)
    if full_grad:
        batch = batch.total()
    eff, radii = _effective(batch, lr, radius, reciprocal)
    return float(forget_reach(eff, radii).sum())


def _radius_text(summary: dict) -> str:
    if summary["radius"] == "lr":
        return f"lr·‖g‖ with lr = {summary['lr']:g}"
    return f"R = {summary['radius']:g}"


def row_alignment(retain_sq_norm: float, row_values: torch.Tensor) -> list[float]:
    """cos(g_r, g_f,i) of each forget row from the global (‖g_f,i‖², g_r·g_f,i) pairs, [N, 2]."""
    norm_r = math.sqrt(max(retain_sq_norm, 0.0))
    return [float(rf / max(math.sqrt(max(float(ff), 0.0)) * norm_r, TINY)) for ff, rf in row_values.tolist()]
