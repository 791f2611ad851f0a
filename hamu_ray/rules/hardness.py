"""The hardness pre-flight's reading of full-pass statistics (docs/design.md §3, "Stopping criterion").

Given the K×3 statistics of the whole-set gradients g_r and g_f, the configured lr and radius:
- per block: cos θ_b (the hardness), R_b, the most forget gain inside R_b (R_b·‖g_f,b‖), and
  the most that keeps the retain loss from rising (R_b·‖g_f,b‖·sin θ_b when rf_b > 0, else all);
- their sums: the largest feasible B (every split, water-filled, reaches it) and the largest B
  without unavoidable retain damage (the exact stopping test's right-hand side);
- a verdict on the configured B, if any.
Everything is first order and per step: a step of radius R_b in block b. HAMU-U's figures are
HAMU-Q's on the effective pair (g_r, g_f) → (−g_f, −g_r), as in the rule itself.
"""

from __future__ import annotations

import math

import torch

from hamu_ray.rules.hamu import _paper_per_block, forget_reach
from hamu_ray.rules.stats import TINY, BlockStats


def summarize(stats: BlockStats, *, lr: float, radius: float | str = "lr", reciprocal: bool = False,
              constraint: float | None = None, names: list[str] | None = None,
              batch_rr: torch.Tensor | None = None, batch_ff: torch.Tensor | None = None) -> dict:
    """The pre-flight's numbers as plain Python values (JSON-ready). With the batches' mean
    squared norms per block (batch_rr, batch_ff) also the reach of one step on a typical pair of
    batches (root-mean-square norms): a step's gradients carry the batches' noise on top of the
    whole-set gradient, so a step reaches further than the whole-set figures say."""
    eff = BlockStats(rr=stats.ff, ff=stats.rr, rf=stats.rf) if reciprocal else stats
    radii = lr * eff.rr.sqrt() if radius == "lr" else torch.full_like(eff.rr, float(radius))
    reach = forget_reach(eff, radii)
    conflict = (eff.rf > 0) & (eff.rr > TINY)
    free = torch.where(conflict, _paper_per_block(eff, radii), reach)
    names = names or [f"block {i}" for i in range(stats.num_blocks)]
    if len(names) != stats.num_blocks:
        raise ValueError(f"{len(names)} block names for {stats.num_blocks} blocks")
    total = stats.total()
    blocks = [{"name": name, "rr": float(rr), "ff": float(ff), "rf": float(rf), "cosine": float(cos),
               "radius": float(r), "reach": float(full), "reach_without_damage": float(ok)}
              for name, rr, ff, rf, cos, r, full, ok in zip(names, stats.rr, stats.ff, stats.rf, stats.cosine(),
                                                          radii, reach, free)]
    summary = {
        "lr": lr, "radius": radius, "reciprocal": reciprocal, "constraint": constraint,
        "cosine_whole_model": float(total.cosine()[0]) if total.num_blocks else math.nan,
        "conflicting_blocks": int(conflict.sum()),
        "max_feasible_constraint": float(reach.sum()),
        "max_constraint_without_damage": float(free.sum()),
        "paper_rhs": float(_paper_per_block(eff, radii).sum()),
        "blocks": blocks,
    }
    if batch_rr is not None and batch_ff is not None:
        b_rr, b_ff = (batch_ff, batch_rr) if reciprocal else (batch_rr, batch_ff)
        b_radii = lr * b_rr.sqrt() if radius == "lr" else torch.full_like(b_rr, float(radius))
        summary["max_feasible_constraint_per_batch"] = float((b_radii * b_ff.clamp_min(0.0).sqrt()).sum())
        for block, rr, ff in zip(blocks, batch_rr.tolist(), batch_ff.tolist()):
            block.update(batch_rr=rr, batch_ff=ff)
    summary["verdict"] = verdict(summary)
    return summary


def verdict(summary: dict) -> str:
    """One paragraph a person can act on."""
    free, feasible, B = (summary["max_constraint_without_damage"], summary["max_feasible_constraint"],
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
    if B is None:
        return text
    if B <= free:
        return text + f" The configured B = {B:.4g} is inside the damage-free range."
    if B <= feasible:
        return text + (f" The configured B = {B:.4g} is feasible but costs {damage}: the stopping "
                       "criterion stops such steps unless stop_on_criterion is off.")
    if per_batch is not None and B <= per_batch:
        return text + (f" The configured B = {B:.4g} is beyond the whole-set reach but within a batch's: "
                       "steps can meet it only by following batch noise (a larger radius or a smaller B "
                       "is the systematic choice).")
    return text + f" The configured B = {B:.4g} is out of reach: steps would be infeasible."


def _radius_text(summary: dict) -> str:
    if summary["radius"] == "lr":
        return f"lr·‖g‖ with lr = {summary['lr']:g}"
    return f"R = {summary['radius']:g}"


def row_alignment(retain_sq_norm: float, row_values: torch.Tensor) -> list[float]:
    """cos(g_r, g_f,i) of each forget row from the global (‖g_f,i‖², g_r·g_f,i) pairs, [N, 2]."""
    norm_r = math.sqrt(max(retain_sq_norm, 0.0))
    return [float(rf / max(math.sqrt(max(float(ff), 0.0)) * norm_r, TINY)) for ff, rf in row_values.tolist()]
