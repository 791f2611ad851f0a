"""Losses, written once over per-example log-likelihoods, and the methods that pair them with a rule.

A task (hamu_ray.tasks) turns a batch into `Scores`: for each example the summed log-probability
of its targets and how many targets it has (a classifier: the label, 1; a causal LM: the
answer tokens, |a|), plus the targets' logits for the divergences. Every objective below serves
both tasks from those.

Sign convention (docs/design.md §1): the step's *retain loss* is minimised; its *forget loss* is
the one whose gradient g_f unlearning raises. Objectives that are minimised to forget (NPO,
SimNPO, IdK) enter negated (`Objective.forget_sign = -1`), so "forget quality improves" always
means g_f·Δ > 0.

Normalisation: CE is the mean over examples of each example's mean target NLL (not the mean over
all tokens of a batch). With equal per-rank batch sizes the mean over ranks of the per-rank
losses is then the loss of the global batch, so a data-parallel step equals the single-process
step on the concatenated batch; a token mean would weight ranks by their token counts.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


@dataclass(frozen=True)
class Scores:
    """A batch as the objectives see it."""
    logprob: Tensor  # [B] Σ log p(target) over each example's targets (fp32)
    count: Tensor  # [B] number of targets per example (> 0)
    logits: Tensor  # [B, T, V] logits at the target positions (a classifier: T = 1)
    mask: Tensor  # [B, T] True where a position is a target


def mean_nll(s: Scores) -> Tensor:
    """−mean_i log p(a_i|q_i)/|a_i|: cross-entropy, per example length-normalised."""
    return (-s.logprob / s.count).mean()


def cross_entropy(s: Scores, ref: Scores | None) -> Tensor:
    return mean_nll(s)


def npo(s: Scores, ref: Scores, *, beta: float = 0.1) -> Tensor:
    """Negative preference optimisation (Zhang et al. 2024), minimised to forget:
    (2/β)·E softplus(β·(log π_θ(a|q) − log π_ref(a|q))), sequence log-probs summed over targets."""
    return (2.0 / beta) * F.softplus(beta * (s.logprob - ref.logprob)).mean()


def simnpo(s: Scores, ref: Scores | None, *, beta: float = 2.5, gamma: float = 0.0) -> Tensor:
    """SimNPO (Fan et al. 2024), reference-free and length-normalised, minimised to forget:
    (2/β)·E softplus(β·log π_θ(a|q)/|a| + γ)."""
    return (2.0 / beta) * F.softplus(beta * s.logprob / s.count + gamma).mean()


def kl_to_reference(s: Scores, ref: Scores, *, temperature: float = 1.0) -> Tensor:
    """KL(p_ref ‖ p_θ) per target position at a softmax temperature, scaled by T² as in
    distillation; averaged over each example's targets, then over examples."""
    log_p = F.log_softmax(s.logits.float() / temperature, dim=-1)
    log_ref = F.log_softmax(ref.logits.float() / temperature, dim=-1)
    per_position = (log_ref.exp() * (log_ref - log_p)).sum(-1) * s.mask
    return (per_position.sum(-1) / s.count).mean() * temperature**2


def scrub_retain(s: Scores, ref: Scores, *, kl_weight: float = 1.0, ce_weight: float = 1.0,
                 temperature: float = 1.0) -> Tensor:
    """SCRUB's min-step: stay close to the teacher (the original) on retain, and fit the targets."""
    return kl_weight * kl_to_reference(s, ref, temperature=temperature) + ce_weight * mean_nll(s)


@dataclass(frozen=True)
class Objective:
    fn: Callable[..., Tensor]
    needs_reference: bool
    forget_sign: int  # +1: raised to forget (CE, KL); -1: minimised to forget (NPO, SimNPO)
    params: tuple[str, ...] = ()  # keyword hyper-parameters it takes from `method.objective`
    refusal_answers: bool = False  # the task replaces the batch's answers by refusals (IdK)


OBJECTIVES: dict[str, Objective] = {
    "ce": Objective(cross_entropy, needs_reference=False, forget_sign=+1),
    "npo": Objective(npo, needs_reference=True, forget_sign=-1, params=("beta",)),
    "simnpo": Objective(simnpo, needs_reference=False, forget_sign=-1, params=("beta", "gamma")),
    "kl": Objective(kl_to_reference, needs_reference=True, forget_sign=+1, params=("temperature",)),
    "scrub_retain": Objective(scrub_retain, needs_reference=True, forget_sign=+1,
                              params=("kl_weight", "ce_weight", "temperature")),
    # IdK: the forget answers replaced by refusals, learnt like retain data (minimised to forget)
    "idk": Objective(cross_entropy, needs_reference=False, forget_sign=-1, refusal_answers=True),
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
    "idk": Method("gdiff", "ce", "idk", "IdK: learn refusals on forget + CE on retain "
                  "(question-answer data only)"),
}


def check_objective_params(method: Method, params: dict) -> None:
    known = set(OBJECTIVES[method.retain].params) | set(OBJECTIVES[method.forget].params)
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown objective parameter(s) {', '.join(unknown)} for this method; "
                         f"it takes {', '.join(sorted(known)) or 'none'}")


def hyper_parameters(method: Method) -> dict[str, dict]:
    """A method's hyper-parameters with their defaults (dataclasses.MISSING: required): its
    rule's (method.hparams) and its objectives' (method.objective)."""
    from hamu_ray.rules import RULES
    from hamu_ray.rules.surgery import ImplicitSurgeryParams

    params = ImplicitSurgeryParams if method.implicit else RULES[method.rule].params
    objective = {}
    for name in (method.retain, method.forget):
        signature = inspect.signature(OBJECTIVES[name].fn).parameters
        objective |= {p: signature[p].default for p in OBJECTIVES[name].params}
    return {"hparams": {f.name: f.default for f in dataclasses.fields(params)}, "objective": objective}


def needs_reference(method: Method) -> bool:
    return OBJECTIVES[method.retain].needs_reference or OBJECTIVES[method.forget].needs_reference


def loss_fns(method: Method, params: dict, scores: Callable[[dict], Scores],
             reference: Callable[[dict], Scores] | None):
    """(retain_loss(batch), forget_loss(batch)) in the step's sign convention. `scores(batch)`
    runs the trained model, `reference(batch)` the frozen original (no gradient)."""

    def bind(name: str, sign: int):
        objective = OBJECTIVES[name]
        kwargs = {k: v for k, v in params.items() if k in objective.params}

        def loss(batch: dict) -> Tensor:
            ref = reference(batch) if objective.needs_reference else None
            return sign * objective.fn(scores(batch), ref, **kwargs)
        return loss

    return bind(method.retain, +1), bind(method.forget, OBJECTIVES[method.forget].forget_sign)


def uses_refusals(method: Method) -> bool:
    return OBJECTIVES[method.forget].refusal_answers
