"""Per-block gradient statistics and the result every rule returns.

Sign convention (the one place it is written down; every rule follows it):
  g_r  gradient of the retain loss, which the step should keep low.
  g_f  gradient of the forget loss, which unlearning should *raise* (e.g. cross-entropy on the
       forget set). Objectives that are minimised to forget (NPO, SimNPO, ...) hand in their
       negated gradient, so "forget quality improves" always means g_f·Δ > 0.
  A rule returns coefficients (a_b, c_b) per block; the optimizer gradient of block b is
  d_b = a_b·g_r,b + c_b·g_f,b and plain SGD at learning rate lr applies Δ = −lr·d.
  The unlearning direction (the gradient of the loss that is *descended* to forget) is u = −g_f.
  Retain and unlearning *conflict* when descending u raises the retain loss: g_r·(−u) = rf > 0.

This module does not reduce anything across processes, does not touch parameters, and imports
neither Ray nor DeepSpeed: the caller sums the local statistics and hands them in.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from hamu_ray.errors import UserError

DTYPE = torch.float64


class StopReason(str, enum.Enum):
    """Why a rule asks the loop to stop (a typed value, logged as a metric code)."""

    INFEASIBLE = "infeasible"  # no step of radius R can gain the constraint B
    CRITERION = "criterion"  # B exceeds the stopping rhs: retain damage is unavoidable

    @property
    def code(self) -> int:
        return list(StopReason).index(self) + 1


RULE_STOPS = frozenset(reason.value for reason in StopReason)  # a step log's stop cell when no step was taken


def took_step(record: dict) -> bool:
    """Whether a row of a run's step log (as the engine's worker writes it) is an optimizer step
    taken: every row numbered ≥ 1 but one whose rule stopped instead of stepping (a StopReason).
    Step 0 is the monitor's starting point; a step after which the monitor or the trust region
    stopped the run was taken. The one definition for the receipt and the pipeline's table."""
    return record.get("step", 0) >= 1 and record["stop"] not in RULE_STOPS


class NonFiniteStatsError(UserError, FloatingPointError):
    """A NaN or Inf reached the gradient statistics (a diverged loss or gradient). `step`: the
    loop's step at which it appeared, once the loop knows it (None inside a step)."""

    def __init__(self, message: str, step: int | None = None):
        super().__init__(message)
        self.step = step

    def at_step(self, step: int) -> "NonFiniteStatsError":
        """The same error, naming the step (raised by the loop, which counts the steps)."""
        return NonFiniteStatsError(f"step {step}: {self.args[0]}", step)

    def __reduce__(self):  # the step survives pickling (a Ray worker's error reaches the driver)
        return type(self), (self.args[0], self.step)


@dataclass(frozen=True)
class BlockStats:
    """rr = ‖g_r,b‖², ff = ‖g_f,b‖², rf = g_r,b·g_f,b for K blocks, float64 tensors of shape [K]."""

    rr: torch.Tensor
    ff: torch.Tensor
    rf: torch.Tensor

    @classmethod
    def from_grads(
        cls, retain_grads: Sequence[torch.Tensor], forget_grads: Sequence[torch.Tensor]
    ) -> "BlockStats":
        """Statistics of two equally long sequences of gradient tensors, one pair per block.

        On a sharded gradient these are partial sums; their sum over ranks is the global value.
        """
        if len(retain_grads) != len(forget_grads):
            raise ValueError(
                f"retain_grads has {len(retain_grads)} blocks but forget_grads has {len(forget_grads)}"
            )
        rows = [_dot3(r, f) for r, f in zip(retain_grads, forget_grads)]
        return cls.from_tensor(torch.stack(rows) if rows else torch.zeros(0, 3, dtype=DTYPE))

    @classmethod
    def from_tensor(cls, stats: torch.Tensor) -> "BlockStats":
        """From a [K, 3] tensor with columns (rr, ff, rf): what an all_reduce(SUM) returns."""
        if stats.ndim != 2 or stats.shape[1] != 3:
            raise ValueError(f"expected a [K, 3] tensor of (rr, ff, rf), got shape {tuple(stats.shape)}")
        stats = stats.to(DTYPE)
        return cls(rr=stats[:, 0].clone(), ff=stats[:, 1].clone(), rf=stats[:, 2].clone())

    def to_tensor(self) -> torch.Tensor:
        """[K, 3] float64 (rr, ff, rf): the payload of the single hardness all-reduce."""
        return torch.stack([self.rr, self.ff, self.rf], dim=1)

    @property
    def num_blocks(self) -> int:
        return int(self.rr.numel())

    def total(self) -> "BlockStats":
        """The whole model as one block (full-gradient mode): sums are exact over blocks."""
        return BlockStats(rr=self.rr.sum(0, keepdim=True), ff=self.ff.sum(0, keepdim=True),
                          rf=self.rf.sum(0, keepdim=True))

    def scaled(self, retain_scale: float, forget_scale: float) -> "BlockStats":
        """The statistics of (s_r·g_r, s_f·g_f): how clipping both gradients changes them."""
        return BlockStats(rr=self.rr * retain_scale**2, ff=self.ff * forget_scale**2,
                          rf=self.rf * (retain_scale * forget_scale))

    def cosine(self) -> torch.Tensor:
        """Per-block cos(g_r, g_f): the hardness (1 = fully aligned, the hardest to forget)."""
        return self.rf / torch.sqrt(self.rr * self.ff).clamp_min(TINY)

    def check_finite(self) -> None:
        bad = ~torch.isfinite(self.to_tensor()).all(dim=1)
        if bad.any():
            blocks = bad.nonzero().flatten().tolist()
            raise NonFiniteStatsError(
                f"gradient statistics are NaN/Inf in block(s) {blocks[:10]} of {self.num_blocks}: "
                "the retain or forget loss diverged; lower the learning rate or check the data"
            )


CHUNK = 4096  # elements per low-precision partial dot product (see _dot3)


def _dot3(retain: torch.Tensor, forget: torch.Tensor) -> torch.Tensor:
    """(‖r‖², ‖f‖², r·f) in float64 from one pass over the gradients' own memory.

    Partial dot products over CHUNK elements in float32, summed in float64: ≲1e-6 relative error
    (against float64 throughout), without a float64 copy of every gradient, which cost more
    than the backward pass on a CPU. Float64 gradients stay float64.
    """
    if retain.shape != forget.shape:
        raise ValueError(f"block shapes differ: retain {tuple(retain.shape)} vs forget {tuple(forget.shape)}")
    work = DTYPE if retain.dtype == DTYPE else torch.float32
    r = retain.detach().reshape(-1).to(work)
    f = forget.detach().reshape(-1).to(work)
    whole = r.numel() - r.numel() % CHUNK
    tail_r, tail_f = r[whole:].to(DTYPE), f[whole:].to(DTYPE)
    out = torch.stack([tail_r @ tail_r, tail_f @ tail_f, tail_r @ tail_f])
    if whole:
        rows_r, rows_f = r[:whole].view(-1, CHUNK), f[:whole].view(-1, CHUNK)
        partial = torch.stack([_row_dots(rows_r, rows_r), _row_dots(rows_f, rows_f), _row_dots(rows_r, rows_f)])
        out += partial.sum(dim=1, dtype=DTYPE)
    return out


def _row_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two [m, n] tensors. On a CPU a batched matrix product [1, n]·[n, 1]
    (one read of each, 2–3× faster than multiply-then-sum; the right operand as a transposed
    view, which takes a GEMM kernel 5× faster than an unsqueezed one); elsewhere
    multiply-then-sum, which TF32 matmul settings cannot touch."""
    if a.device.type == "cpu":
        return torch.bmm(a.unsqueeze(1), b.unsqueeze(1).transpose(1, 2)).view(-1)
    return (a * b).sum(dim=1)


def check_number(name: str, value: object, *, low: float | None = None, strict: bool = False) -> None:
    """ValueError unless value is a finite real number (≥ low, or > low when strict).

    Booleans are refused: YAML's `true` would otherwise pass as 1 (bool is an int in Python).
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if strict else value >= low
    if not ok:
        bound = "" if low is None else f" {'>' if strict else '≥'} {low:g}"
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")


# Squared norms at or below this are zero (norms below 1e-15): far under any real gradient,
# far above float64 underflow, so tiny-but-real gradients keep their exact solution.
TINY = 1e-30
SQRT_TINY = 1e-15  # the matching norm: guards divisions by ‖g‖


@dataclass(frozen=True)
class RuleResult:
    """Coefficients per block plus what the step needs to log.

    retain_coef, forget_coef: float64 [K]; d_b = retain_coef[b]·g_r,b + forget_coef[b]·g_f,b.
    branch: the branch name taken per block. stop: a StopReason, or None to keep going.
    diagnostics: scalars and [K] tensors; always holds cosine, forget_gain (predicted first-order
    g_f·Δ summed over blocks), retain_change (g_r·Δ summed) and step_norm ([K], ‖Δ_b‖).
    """

    retain_coef: torch.Tensor
    forget_coef: torch.Tensor
    branch: tuple[str, ...]
    stop: StopReason | None = None
    diagnostics: dict[str, torch.Tensor | float] = field(default_factory=dict)


def predicted_effects(stats: BlockStats, retain_coef: torch.Tensor, forget_coef: torch.Tensor,
                      lr: float) -> dict[str, torch.Tensor | float]:
    """First-order effects of Δ = −lr·(a·g_r + c·g_f), computed from the statistics alone."""
    a, c = retain_coef, forget_coef
    forget_gain = -lr * (a * stats.rf + c * stats.ff)  # g_f·Δ per block
    retain_change = -lr * (a * stats.rr + c * stats.rf)  # g_r·Δ per block
    norm_sq = lr**2 * (a * a * stats.rr + 2 * a * c * stats.rf + c * c * stats.ff)
    return {
        "cosine": stats.cosine(),
        "forget_gain": float(forget_gain.sum()),
        "retain_change": float(retain_change.sum()),
        "forget_gain_per_block": forget_gain,
        "step_norm": torch.sqrt(norm_sq.clamp_min(0.0)),
    }
