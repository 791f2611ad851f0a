"""One unlearning step: two backwards, local statistics, one reduction, the rule, write back, step.
Also the one-backprop implicit-surgery step, which needs only the retain losses reduced.

Backend-neutral: gradients are reached through a GradAccess (hamu_ray.engine.grads), losses through
callables, and the only collective added to plain training is `reduce_stats` on a [K, 3] float64
tensor (skipped when every rank already holds the full gradient). The same function is the
single-process reference and the distributed step.

Clipping (optional `clip_norm`): g_r and g_f are each clipped to that global L2 norm *before*
the rule, g ← g·min(1, clip_norm/‖g‖). The norms come from the reduced statistics, so clipping
only rescales the statistics the rule sees and the coefficients it returns; no gradient is touched.
B, the feasibility test, the stopping test and the lr radius are then in clipped units: the rule
guarantees s_f·(g_f·Δ) ≥ B, i.e. a true first-order gain g_f·Δ ≥ B/s_f ≥ B. Both are logged.

Devices: the statistics are computed where the gradients live and moved to the host once per
step, together with the two losses; the rules run on those host copies and return host
coefficients, so the step makes exactly one device-to-host copy (none inside a rule), and one
more after the step when it measures its realised effects (`measure`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import torch

from hamu_ray.engine.grads import GradAccess
from hamu_ray.rules import BlockStats, NonFiniteStatsError, Rule, RuleResult, trust
from hamu_ray.rules.stats import predicted_effects
from hamu_ray.rules.surgery import ImplicitSurgeryParams, dual_update

LossFn = Callable[[], torch.Tensor]
StatsReduce = Callable[[torch.Tensor], torch.Tensor]
Lap = Callable[[str], None]  # called at the end of each phase with its name (the benchmark's clock)


def _no_lap(name: str) -> None:
    pass


@dataclass(frozen=True)
class StepOutput:
    retain_loss: float  # this process's retain-batch loss
    forget_loss: float  # this process's forget-batch loss (the one unlearning raises)
    stats: BlockStats  # global statistics of the gradients the rule saw (after clipping)
    result: RuleResult  # coefficients as the rule returned them (for the clipped gradients)
    true_forget_gain: float  # first-order g_f·Δ of the unclipped g_f (= clipped gain / s_f)
    true_retain_change: float  # first-order g_r·Δ of the unclipped g_r
    retain_scale: float  # clipping factors applied to g_r and g_f (1.0: not clipped)
    forget_scale: float
    reduced_values: int  # floats this step's statistics reduction sent (K×3, or 0)
    stepped: bool  # False when the rule asked to stop: parameters are unchanged
    # measured on the same batches after the step (mean over ranks), with `measure`; else None
    realised_forget_gain: float | None = None
    realised_retain_change: float | None = None


class SumAcrossRanks:
    """all_reduce(SUM) of the statistics: the one collective HAMU adds to data-parallel training.

    `device`: the collective's (the engine's: NCCL reduces only CUDA tensors). Statistics computed
    elsewhere (gradients offloaded to CPU memory) are moved there, K×3 floats, and the sum stays
    there: `to_host` copies it to the host together with the losses, which live there too."""

    def __init__(self, group=None, device: torch.device | str | None = None):
        self.group, self.device = group, device

    def __call__(self, stats: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if self.device is not None:
            stats = stats.to(self.device)
        dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
        return stats


class MeanAcrossRanks:
    """all_reduce mean of a few scalars (the retain losses implicit surgery's dual weight needs),
    so that every rank keeps the same weight. The tensor stays on the loss's device (the
    backend's: gloo on CPU, NCCL on CUDA)."""

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values / dist.get_world_size()


def unlearning_step(grads: GradAccess, rule: Rule, *, lr: float, retain_loss: LossFn,
                    forget_loss: LossFn, reduce_stats: StatsReduce | None = None,
                    clip_norm: float | None = None, measure: bool = False,
                    reduce_mean: StatsReduce | None = None, lap: Lap = _no_lap) -> StepOutput:
    """g_r then g_f on this process's micro-batches, d_b = a_b·g_r,b + c_b·g_f,b, optimizer step.

    `lr` must be the optimizer's learning rate: the rule's guarantee is for Δ = −lr·d (plain SGD).
    With `measure`, both losses are evaluated again on the same batches after the step (two
    forwards, no backward), averaged over ranks with `reduce_mean` (MeanAcrossRanks; None in one
    process), and the realised changes are returned beside the first-order ones: a second
    device-to-host copy, after the step.
    """
    # retain pass: keep this rank's piece of g_r
    grads.zero_grads()
    loss_r = retain_loss()
    grads.backward(loss_r)
    lap("retain forward+backward")
    retain = grads.take_local_grads()
    lap("keep g_r")

    # forget pass: g_f stays in (or is copied out of) the gradient buffers
    grads.zero_grads()
    loss_f = forget_loss()
    grads.backward(loss_f)
    lap("forget forward+backward")
    forget = grads.local_grads()

    # hardness: local partial sums, one reduction of K×3 floats, the rule on the global values
    stats = BlockStats.from_grads(retain, forget).to_tensor()
    lap("statistics")
    reduced_values = 0
    if not grads.holds_full_gradient:
        if reduce_stats is None:
            raise ValueError("this gradient backend holds shards: pass reduce_stats=SumAcrossRanks()")
        stats = reduce_stats(stats)
        reduced_values = stats.numel()
    stats, (retain_value, forget_value) = to_host(stats, loss_r, loss_f)
    lap("reduce + host copy")
    retain_scale, forget_scale = clip_scales(stats, clip_norm)
    seen = stats.scaled(retain_scale, forget_scale)
    result = rule(seen, lr)
    true = predicted_effects(stats, result.retain_coef * retain_scale, result.forget_coef * forget_scale, lr)
    out = StepOutput(retain_value, forget_value, seen, result,
                     true["forget_gain"], true["retain_change"], retain_scale, forget_scale,
                     reduced_values, stepped=result.stop is None)
    lap("rule")
    if result.stop is not None:
        grads.zero_grads()
        return out

    # combine in place: the forget buffer becomes d_b, then the optimizer steps on it
    retain_coef = (result.retain_coef * retain_scale).tolist()
    forget_coef = (result.forget_coef * forget_scale).tolist()
    for g_r, g_f, a, c in zip(retain, forget, retain_coef, forget_coef):
        g_f.mul_(c).add_(g_r, alpha=a)
    grads.write_local_grads(forget)
    lap("combine + write back")
    grads.step()
    lap("optimizer step")
    if measure:
        gain, change = realised_changes(loss_r, loss_f, retain_loss, forget_loss, reduce_mean)
        out = dataclasses.replace(out, realised_forget_gain=gain, realised_retain_change=change)
        lap("losses after the step")
    return out


class TrustRegion:
    """Loop state of HAMU's adaptive radius (hamu_ray.rules.trust): the scale on R and B, updated
    from each step's measured retain change (the step must run with `measure`)."""

    def __init__(self, rule: Rule, tolerance: float, scale: float = 1.0):
        self.base, self.tolerance, self.scale = rule, tolerance, scale

    def rule(self) -> Rule:
        """The rule with R and B at the current scale."""
        return dataclasses.replace(self.base, params=dataclasses.replace(self.base.params, trust_scale=self.scale))

    def update(self, out: StepOutput) -> float:
        if out.realised_retain_change is None:
            raise ValueError("the trust region needs the step's measured retain change (measure=True)")
        self.scale = trust.next_scale(self.scale, out.true_retain_change, out.realised_retain_change,
                                      self.tolerance)
        return self.scale

    @property
    def exhausted(self) -> bool:
        """The scale fell below the smallest one worth a step: the run stops (trust.STOP)."""
        return self.scale < trust.MIN_SCALE


def realised_changes(loss_r: torch.Tensor, loss_f: torch.Tensor, retain_loss: LossFn,
                     forget_loss: LossFn, reduce_mean: StatsReduce | None) -> tuple[float, float]:
    """(forget gain, retain change) the step made on its own batches: the losses at the new
    point minus those before it, averaged over ranks (the gradients were), one host copy."""
    with torch.no_grad():
        after_r, after_f = retain_loss(), forget_loss()
    values = torch.stack([v.detach().reshape(()).to(loss_r.device, torch.float64)
                          for v in (loss_r, loss_f, after_r, after_f)])
    if reduce_mean is not None:
        values = reduce_mean(values)
    before_r, before_f, after_r, after_f = values.tolist()
    check_finite_losses(retain_loss_after_step=after_r, forget_loss_after_step=after_f)
    return after_f - before_f, after_r - before_r


def to_host(stats: torch.Tensor, *losses: torch.Tensor) -> tuple[BlockStats, list[float]]:
    """The [K, 3] statistics and the losses in one device-to-host copy (the step's only sync)."""
    values = torch.cat([stats.reshape(-1).to(torch.float64),
                        torch.stack([loss.detach().to(stats.device, torch.float64) for loss in losses])])
    host = values.cpu()
    k = stats.shape[0]
    return BlockStats.from_tensor(host[:3 * k].view(k, 3)), host[3 * k:].tolist()


def descent_step(grads: GradAccess, loss: LossFn, lap: Lap = _no_lap) -> float:
    """Plain training (the original model, the retrain oracle): one backward, one step."""
    grads.zero_grads()
    value = loss()
    grads.backward(value)
    lap("forward+backward")
    grads.step()
    lap("optimizer step")
    loss_value = value.item()
    check_finite_losses(loss=loss_value)
    return loss_value


def check_finite_losses(**losses: float) -> None:
    """Stop a diverged run with one clear error: a NaN/Inf loss would otherwise pass silently
    (max(0, NaN) is 0 in the dual update; DeepSpeed skips non-finite steps with only a warning)."""
    bad = [f"{name} = {value}" for name, value in losses.items() if not math.isfinite(value)]
    if bad:
        raise NonFiniteStatsError(f"non-finite loss ({', '.join(bad)}): the run diverged; lower the "
                                  "learning rate or check the data")


def clip_scales(stats: BlockStats, clip_norm: float | None) -> tuple[float, float]:
    """min(1, clip_norm/‖g‖) for g_r and g_f, from the global squared norms in the statistics."""
    if clip_norm is None:
        return 1.0, 1.0
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ValueError(f"clip_norm must be a number > 0, got {clip_norm!r}")
    retain_norm = math.sqrt(float(stats.rr.sum()))
    forget_norm = math.sqrt(float(stats.ff.sum()))
    return (min(1.0, clip_norm / retain_norm) if retain_norm > 0 else 1.0,
            min(1.0, clip_norm / forget_norm) if forget_norm > 0 else 1.0)


class ImplicitSurgery:
    """Loop state of implicit surgery: the dual weight w, and in the fast variant the previous
    step's retain loss (its "before"), whose "after" is the next step's retain loss."""

    def __init__(self, params: ImplicitSurgeryParams):
        self.params = params
        self.weight = float(params.initial_weight)
        self.pending_before: float | None = None


@dataclass(frozen=True)
class ImplicitStepOutput:
    retain_loss: float  # this process's batch losses
    forget_loss: float
    weight: float  # the dual weight this step used
    retain_before: float  # mean over ranks of the retain loss before the step
    retain_after: float | None  # ... after it, on the same batches (None in the fast variant)
    next_weight: float


def implicit_surgery_step(grads: GradAccess, state: ImplicitSurgery, *, lr: float,
                          retain_loss: LossFn, forget_loss: LossFn,
                          reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
                          lap: Lap = _no_lap) -> ImplicitStepOutput:
    """One backward on L_u + w·L_r with L_u = −forget loss, an optimizer step, then the dual update
    of w from the measured retain-loss change.

    Besides the backward, each step reduces its retain losses across ranks (a mean of 1–2
    floats) so that every rank updates w alike; the exact variant also runs one forward (no
    backward) on the retain batch after the step. One device-to-host copy per step: in the fast
    variant before the backward (w depends on this step's loss), in the exact one at the end.
    """
    mean = reduce_mean or (lambda values: values)
    grads.zero_grads()
    loss_r, loss_f = retain_loss(), forget_loss()
    before = mean(loss_r.detach().reshape(1).to(torch.float64))
    if state.params.fast:
        before_value, retain_value, forget_value = _host_floats(before, loss_r, loss_f)
        check_finite_losses(retain_loss=retain_value, forget_loss=forget_value)
        if state.pending_before is not None:
            state.weight = dual_update(state.weight, state.pending_before, before_value, lr, state.params)
    weight = state.weight
    grads.backward(weight * loss_r - loss_f)
    lap("forward+backward")
    grads.step()
    lap("optimizer step")
    after_value = None
    if state.params.fast:
        state.pending_before = before_value
    else:
        with torch.no_grad():
            after = mean(retain_loss().detach().reshape(1).to(torch.float64))
        before_value, after_value, retain_value, forget_value = _host_floats(before, after, loss_r, loss_f)
        check_finite_losses(retain_loss=retain_value, forget_loss=forget_value,
                            retain_loss_after_step=after_value)
        state.weight = dual_update(weight, before_value, after_value, lr, state.params)
        lap("retain forward after the step")
    return ImplicitStepOutput(retain_value, forget_value, weight, before_value, after_value, state.weight)


def _host_floats(*values: torch.Tensor) -> list[float]:
    """Scalars (same device) as Python floats in one device-to-host copy."""
    return torch.cat([v.detach().reshape(-1).to(torch.float64) for v in values]).tolist()
