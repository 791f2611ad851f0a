"""Objectives: closed-form values, the sign each enters the step with, and implicit surgery."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hamu_ray import objectives as obj
from hamu_ray.engine.config import parse_config
from hamu_ray.schema import ConfigError
from hamu_ray.engine.grads import TorchGrads
from hamu_ray.rules.surgery import ImplicitSurgeryParams, dual_update
from hamu_ray.engine.step import ImplicitSurgery, descent_step, implicit_surgery_step
from hamu_ray.rules import NonFiniteStatsError
from hamu_ray.tasks.classifier import label_scores

LR = 0.05


def tiny_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(6, 4)
    with torch.no_grad():
        model.weight.copy_(0.3 * torch.randn(4, 6, generator=gen))  # CE ~ log 4: no saturation
        model.bias.copy_(torch.randn(4, generator=gen))
    reference = torch.nn.Linear(6, 4).requires_grad_(False)
    reference.load_state_dict(model.state_dict())
    batch = {"x": torch.randn(16, 6, generator=gen), "y": torch.randint(4, (16,), generator=gen)}
    return model, reference, batch


def scorer(model):
    """The classifier task's scores of `model` on a batch."""
    return lambda batch: label_scores(model(batch["x"]), batch["y"])


def mean_ce(model, batch) -> float:
    with torch.no_grad():
        return F.cross_entropy(model(batch["x"]), batch["y"]).item()


def test_closed_form_values():
    model, reference, batch = tiny_problem()
    logits, ref = model(batch["x"]), reference(batch["x"])
    s, s_ref = label_scores(logits, batch["y"]), label_scores(ref, batch["y"])
    # at θ = θ_ref the NPO ratio is 1: (2/β)·log 2 whatever the data
    assert obj.npo(s, s_ref, beta=0.5).item() == pytest.approx(4 * math.log(2), rel=1e-6)
    ce = F.cross_entropy(logits, batch["y"], reduction="none")
    assert obj.cross_entropy(s, None).item() == pytest.approx(ce.mean().item(), rel=1e-6)
    expected = (2 / 2.5) * torch.log1p(torch.exp(-2.5 * ce + 0.3)).mean()
    assert obj.simnpo(s, None, beta=2.5, gamma=0.3).item() == pytest.approx(expected.item(), rel=1e-6)
    assert obj.kl_to_reference(s, s_ref).item() == pytest.approx(0.0, abs=1e-7)
    other = logits + torch.randn_like(logits)
    p_ref, log_p = F.softmax(ref, -1), F.log_softmax(other, -1)
    by_hand = (p_ref * (torch.log(p_ref) - log_p)).sum(-1).mean()
    assert obj.kl_to_reference(label_scores(other, batch["y"]), s_ref).item() == pytest.approx(by_hand.item(), rel=1e-5)


def sgd_along(model, loss_value: torch.Tensor, direction: float) -> None:
    """θ ← θ + direction·lr·∇loss (direction +1 raises the loss, −1 lowers it)."""
    model.zero_grad()
    loss_value.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(p.grad, alpha=direction * LR)


@pytest.mark.parametrize("forget", ["ce", "npo", "simnpo"])
def test_raising_the_forget_loss_forgets(forget):
    """g_f points where forgetting is: Δ = +lr·g_f raises the forget CE, for objectives that are
    raised (CE) and for those that enter negated (NPO, SimNPO)."""
    model, reference, batch = tiny_problem()
    method = obj.Method("gdiff", "ce", forget, "test")
    params = {"beta": 0.5} if forget != "ce" else {}  # β 2.5 saturates at CE ≈ 2: tiny but right
    _, forget_loss = obj.loss_fns(method, params, scorer(model), scorer(reference))
    before = mean_ce(model, batch)
    sgd_along(model, forget_loss(batch), +1)
    assert mean_ce(model, batch) > before + 1e-4


def test_scrub_forget_term_moves_away_from_the_teacher():
    model, reference, batch = tiny_problem()
    with torch.no_grad():  # at the teacher itself the KL gradient is zero: start just off it
        model.weight.add_(0.1 * torch.randn(model.weight.shape, generator=torch.Generator().manual_seed(3)))
    _, forget_loss = obj.loss_fns(obj.METHODS["scrub"], {}, scorer(model), scorer(reference))
    before = forget_loss(batch).item()
    sgd_along(model, forget_loss(batch), +1)
    assert forget_loss(batch).item() > before


@pytest.mark.parametrize("method", ["gdiff", "kl", "scrub"])
def test_lowering_the_retain_loss_keeps_utility(method):
    model, reference, batch = tiny_problem(seed=1)
    with torch.no_grad():
        model.weight.add_(0.3 * torch.randn_like(model.weight))
    retain_loss, _ = obj.loss_fns(obj.METHODS[method], {}, scorer(model), scorer(reference))
    before = retain_loss(batch).item()
    sgd_along(model, retain_loss(batch), -1)
    assert retain_loss(batch).item() < before


def test_methods_reference_known_objectives_and_rules():
    from hamu_ray.rules import RULES
    for name, method in obj.METHODS.items():
        assert method.retain in obj.OBJECTIVES and method.forget in obj.OBJECTIVES, name
        assert method.implicit or method.rule in RULES, name
    assert obj.needs_reference(obj.METHODS["npo"]) and not obj.needs_reference(obj.METHODS["simnpo"])


def config_with(method: dict) -> dict:
    return {"data": {"forget": "f.parquet", "retain": "r.parquet"}, "model": {"sizes": [2, 2]},
            "method": method, "train": {"lr": 0.1}, "output_dir": "out"}


@pytest.mark.parametrize("method, needle", [
    ({"name": "nope"}, "unknown method 'nope'"),
    ({"name": "npo", "objective": {"temperature": 2}}, "unknown objective parameter(s) temperature"),
    ({"name": "surgery-implicit", "rule": "hamu-q"}, "takes no rule"),
    ({"name": "surgery-implicit", "hparams": {"beta": 1}}, "valid: epsilon, dual_lr"),
    ({"name": "surgery-implicit", "hparams": {"dual_lr": -1}}, "dual_lr must be"),
    ({"name": "npo", "rule": "nope"}, "unknown rule 'nope'"),
])
def test_method_errors_name_the_field(method, needle):
    with pytest.raises(ConfigError) as err:
        parse_config(config_with(method), source="p.yaml")
    assert "p.yaml: method" in str(err.value) and needle in str(err.value)


def test_npo_can_run_under_a_hamu_rule():
    cfg = parse_config(config_with({"name": "npo", "rule": "hamu-q", "objective": {"beta": 0.2},
                                    "hparams": {"constraint": 0.01}}))
    assert cfg.method.rule_name == "hamu-q" and cfg.method.spec.forget == "npo"


def test_a_training_job_needs_no_forget_set_but_only_ft_may_skip_it():
    raw = config_with({"name": "ft"})
    raw["data"]["forget"] = None
    assert parse_config(raw).data.forget is None
    raw["method"] = {"name": "gdiff"}
    with pytest.raises(ConfigError, match="needs a forget set"):
        parse_config(raw)


def test_dual_update_by_hand():
    params = ImplicitSurgeryParams(epsilon=0.1, dual_lr=0.5)
    # retain rose by 0.02 at lr 0.1: 0.2 per unit step > ε = 0.1 → w grows by β·0.1
    assert dual_update(1.0, 1.00, 1.02, 0.1, params) == pytest.approx(1.05)
    # retain fell: w shrinks, never below 0
    assert dual_update(1.0, 1.00, 0.99, 0.1, params) == pytest.approx(0.9)
    assert dual_update(0.01, 1.00, 0.5, 0.1, params) == 0.0


@pytest.mark.parametrize("fast", [False, True])
def test_implicit_surgery_step_is_one_descent_on_the_weighted_loss(fast):
    model, reference, batch = tiny_problem(seed=2)
    forget = {"x": batch["x"][:8], "y": batch["y"][:8]}
    retain = {"x": batch["x"][8:], "y": batch["y"][8:]}
    params = ImplicitSurgeryParams(epsilon=0.0, dual_lr=0.3, initial_weight=2.0, fast=fast)
    state = ImplicitSurgery(params)
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=LR))
    retain_loss, forget_loss = obj.loss_fns(obj.METHODS["surgery-implicit"], {}, scorer(model), None)

    manual = torch.nn.Linear(6, 4)
    manual.load_state_dict(model.state_dict())
    weight = 2.0
    for step in range(3):
        out = implicit_surgery_step(grads, state, lr=LR, retain_loss=lambda: retain_loss(retain),
                                    forget_loss=lambda: forget_loss(forget))
        # by hand: θ ← θ − lr·∇(w·CE_r − CE_f), then the dual update
        before = mean_ce(manual, retain)
        if fast and step > 0:
            weight = dual_update(weight, previous_before, before, LR, params)
        assert out.weight == pytest.approx(weight)
        sgd_along(manual, weight * F.cross_entropy(manual(retain["x"]), retain["y"])
                  - F.cross_entropy(manual(forget["x"]), forget["y"]), -1)
        if not fast:
            weight = dual_update(weight, before, mean_ce(manual, retain), LR, params)
            assert out.next_weight == pytest.approx(weight)
        previous_before = before
        for p, q in zip(model.parameters(), manual.parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert mean_ce(model, forget) > mean_ce(reference, forget)  # it forgets


@pytest.mark.parametrize("fast", [False, True])
def test_a_diverged_implicit_surgery_run_stops_with_one_clear_error(fast):
    # max(0, NaN) is 0: without the check a NaN loss passed silently into the dual weight
    model, _, batch = tiny_problem()
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=LR))
    state = ImplicitSurgery(ImplicitSurgeryParams(fast=fast))
    before = [p.detach().clone() for p in model.parameters()]
    nan_forget = lambda: F.cross_entropy(model(batch["x"]), batch["y"]) * float("nan")  # noqa: E731
    with pytest.raises(NonFiniteStatsError, match=r"forget_loss = nan.*diverged"):
        implicit_surgery_step(grads, state, lr=LR, retain_loss=lambda: F.cross_entropy(model(batch["x"]), batch["y"]),
                              forget_loss=nan_forget)
    if fast:  # read before the backward: nothing stepped
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_a_diverged_descent_stops_with_one_clear_error():
    model, _, batch = tiny_problem()
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=LR))
    assert descent_step(grads, lambda: F.cross_entropy(model(batch["x"]), batch["y"])) > 0
    with pytest.raises(NonFiniteStatsError, match=r"loss = -?inf"):
        descent_step(grads, lambda: -F.cross_entropy(model(batch["x"]), batch["y"]) / 0.0)
