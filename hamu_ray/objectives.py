"""Losses for classifiers, and the methods that pair them with a rule.

Sign convention (docs/design.md §1): the step's *retain loss* is minimised; its *forget loss* is
the one whose gradient g_f unlearning raises. Objectives that are minimised to forget (NPO, SimNPO) enter
negated (`Objective.forget_sign = -1`), so "forget quality improves" always means g_f·Δ > 0.

Reference-model objectives (KL, NPO, SCRUB) receive the frozen original model's logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def per_example_ce(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), labels, reduction="none")


def cross_entropy(logits: Tensor, ref_logits: Tensor | None, labels: Tensor) -> Tensor:
    return per_example_ce(logits, labels).mean()


def npo(logits: Tensor, ref_logits: Tensor, labels: Tensor, *, beta: float = 0.1) -> Tensor:
    """Negative preference optimisation: (2/β)·E softplus(β·log(π_θ/π_ref)), minimised to forget.
    For a classifier log π(y|x) = −CE, so log(π_θ/π_ref) = CE_ref − CE_θ."""
    log_ratio = per_example_ce(ref_logits, labels) - per_example_ce(logits, labels)
    return (2.0 / beta) * F.softplus(beta * log_ratio).mean()


def simnpo(logits: Tensor, ref_logits: Tensor | None, labels: Tensor, *, beta: float = 2.5,
           gamma: float = 0.0) -> Tensor:
    """SimNPO (reference-free, length 1 for a label): (2/β)·E softplus(β·log π_θ + γ), minimised."""
    return (2.0 / beta) * F.softplus(-beta * per_example_ce(logits, labels) + gamma).mean()


def kl_to_reference(logits: Tensor, ref_logits: Tensor, labels: Tensor, *,
                    temperature: float = 1.0) -> Tensor:
    """KL(p_ref ‖ p_θ) at a softmax temperature, scaled by T² as in distillation."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    log_ref = F.log_softmax(ref_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p, log_ref, log_target=True, reduction="batchmean") * temperature**2


def scrub_retain(logits: Tensor, ref_logits: Tensor, labels: Tensor, *, kl_weight: float = 1.0,
                 ce_weight: float = 1.0, temperature: float = 1.0) -> Tensor:
    """SCRUB's min-step: stay close to the teacher (the original) on retain, and fit the labels."""
    return (kl_weight * kl_to_reference(logits, ref_logits, labels, temperature=temperature)
            + ce_weight * cross_entropy(logits, None, labels))


@dataclass(frozen=True)
class Objective:
    fn: Callable[..., Tensor]
    needs_reference: bool
    forget_sign: int  # +1: raised to forget (CE, KL); -1: minimised to forget (NPO, SimNPO)
    params: tuple[str, ...] = ()  # keyword hyper-parameters it takes from `method.objective`


OBJECTIVES: dict[str, Objective] = {
    "ce": Objective(cross_entropy, needs_reference=False, forget_sign=+1),
    "npo": Objective(npo, needs_reference=True, forget_sign=-1, params=("beta",)),
    "simnpo": Objective(simnpo, needs_reference=False, forget_sign=-1, params=("beta", "gamma")),
    "kl": Objective(kl_to_reference, needs_reference=True, forget_sign=+1, params=("temperature",)),
    "scrub_retain": Objective(scrub_retain, needs_reference=True, forget_sign=+1,
                              params=("kl_weight", "ce_weight", "temperature")),
}


@dataclass(frozen=True)
class Method:
    rule: str | None  # hamu_ray.rules name; None for the one-backprop implicit surgery
    retain: str  # objective minimised on retain batches
    forget: str  # objective of the forget batches (its forget_sign says which way)
    summary: str
    implicit: bool = False  # one backward on L_u + w·L_r with a dual weight (docs/design.md §2)


METHODS: dict[str, Method] = {
    "hamu-q": Method("hamu-q", "ce", "ce", "HAMU: guaranteed forget gain B, least retain cost within R"),
    "hamu-u": Method("hamu-u", "ce", "ce", "HAMU reciprocal: retain drop ≥ B, most forget gain"),
    "surgery": Method("surgery", "ce", "ce", "explicit gradient surgery (EUPMU), retain rise ≤ ε"),
    "surgery-implicit": Method(None, "ce", "ce", "implicit surgery: one backprop, dual weight",
                               implicit=True),
    "ft": Method("ft", "ce", "ce", "fine-tune on retain only"),
    "ga": Method("ga", "ce", "ce", "gradient ascent on forget only"),
    "gdiff": Method("gdiff", "ce", "ce", "gradient difference (retain descent + forget ascent)"),
    "kl": Method("gdiff", "kl", "ce", "forget ascent + KL to the original on retain"),
    "scrub": Method("gdiff", "scrub_retain", "kl", "SCRUB: away from the teacher on forget, "
                    "close to it (and the labels) on retain"),
    "gru": Method("gru", "ce", "ce", "gradient projection onto the retain-safe side on conflict"),
    "pcgrad": Method("pcgrad", "ce", "ce", "symmetric gradient projection on conflict"),
    "npo": Method("gdiff", "ce", "npo", "NPO on forget + CE on retain"),
    "simnpo": Method("gdiff", "ce", "simnpo", "SimNPO on forget + CE on retain"),
}


def check_objective_params(method: Method, params: dict) -> None:
    known = set(OBJECTIVES[method.retain].params) | set(OBJECTIVES[method.forget].params)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown objective parameter(s) {', '.join(unknown)} for this method; "
                         f"it takes {', '.join(sorted(known)) or 'none'}")


def needs_reference(method: Method) -> bool:
    return OBJECTIVES[method.retain].needs_reference or OBJECTIVES[method.forget].needs_reference


def loss_fns(method: Method, params: dict, logits_of: Callable[[Tensor], Tensor],
             reference: Callable[[Tensor], Tensor] | None):
    """(retain_loss(batch), forget_loss(batch)) in the step's sign convention."""

    def bind(name: str, sign: int):
        objective = OBJECTIVES[name]
        kwargs = {k: v for k, v in params.items() if k in objective.params}

        def loss(batch: dict) -> Tensor:
            ref = reference(batch["x"]) if objective.needs_reference else None
            return sign * objective.fn(logits_of(batch["x"]), ref, batch["y"], **kwargs)
        return loss

    return bind(method.retain, +1), bind(method.forget, OBJECTIVES[method.forget].forget_sign)
