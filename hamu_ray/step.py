"""One unlearning step: two backwards, local statistics, one reduction, the rule, write back, step.

Backend-neutral: gradients are reached through a GradAccess (hamu_ray.grads), losses through
callables, and the only collective is `reduce_stats` on a [K, 3] float64 tensor. The same function
is the single-process reference (identity reduction) and the distributed step (all_reduce SUM).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hamu_ray.grads import GradAccess
from hamu_ray.rules import BlockStats, Rule, RuleResult

LossFn = Callable[[], torch.Tensor]
StatsReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class StepOutput:
    retain_loss: float  # this process's retain-batch loss
    forget_loss: float  # this process's forget-batch loss (the one unlearning raises)
    stats: BlockStats  # global statistics after the reduction
    result: RuleResult
    stepped: bool  # False when the rule asked to stop: parameters are unchanged


def no_reduction(stats: torch.Tensor) -> torch.Tensor:
    return stats


def unlearning_step(grads: GradAccess, rule: Rule, *, lr: float, retain_loss: LossFn,
                    forget_loss: LossFn, reduce_stats: StatsReduce = no_reduction) -> StepOutput:
    """g_r then g_f on this process's micro-batches, d_b = a_b·g_r,b + c_b·g_f,b, optimizer step.

    `lr` must be the optimizer's learning rate: the rule's guarantee is for Δ = −lr·d (plain SGD).
    """
    # retain pass: keep this rank's piece of g_r
    grads.zero_grads()
    loss_r = retain_loss()
    grads.backward(loss_r)
    retain = [g.detach().clone() for g in grads.local_grads()]

    # forget pass: g_f stays in the gradient buffers
    grads.zero_grads()
    loss_f = forget_loss()
    grads.backward(loss_f)
    forget = grads.local_grads()

    # hardness: local partial sums, one reduction of K×3 floats, the rule on the global values
    local = BlockStats.from_grads(retain, forget).to_tensor()
    stats = BlockStats.from_tensor(reduce_stats(local))
    result = rule(stats, lr)
    if result.stop is not None:
        grads.zero_grads()
        return StepOutput(loss_r.item(), loss_f.item(), stats, result, stepped=False)

    # combine in place: the forget buffer becomes d_b, then the optimizer steps on it
    for g_r, g_f, a, c in zip(retain, forget, result.retain_coef.tolist(), result.forget_coef.tolist()):
        g_f.mul_(c).add_(g_r, alpha=a)
    grads.step()
    return StepOutput(loss_r.item(), loss_f.item(), stats, result, stepped=True)
