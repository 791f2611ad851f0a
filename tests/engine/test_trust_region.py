"""A guarantee that is measured, and the adaptive radius that follows the measurement.

Single process (TorchGrads): the step and the trust region are the engine's own code; the
references are plain forwards of the same model before and after, and losses whose exact change
is known in closed form (a linear retain loss: first order is exact; a quadratic one: the error
is ½·k·‖Δ‖², nothing else).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from hamu_ray import receipt
from hamu_ray.engine.grads import TorchGrads
from hamu_ray.engine.step import TrustRegion, unlearning_step
from hamu_ray.engine.worker import step_record
from hamu_ray.rules import BlockStats, get_rule, trust
from hamu_ray.rules.hamu import damage_free_reach, forget_reach


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    forget = y == 3
    return model, (x[~forget][:128], y[~forget][:128]), (x[forget][:32], y[forget][:32])


def measured_steps(problem, rule, steps, *, lr=0.1, tolerance=None):
    """`steps` measured steps as the worker runs them (with a trust region when `tolerance`),
    logged as the worker logs them; also the model after them."""
    model, (xr, yr), (xf, yf) = copy.deepcopy(problem[0]), *problem[1:]
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=lr))
    region = TrustRegion(rule, tolerance) if tolerance is not None else None
    log = []
    for step in range(1, steps + 1):
        current = region.rule() if region else rule
        out = unlearning_step(grads, current, lr=lr, measure=True,
                              retain_loss=lambda: F.cross_entropy(model(xr), yr),
                              forget_loss=lambda: F.cross_entropy(model(xf), yf))
        record = step_record(step, out, current)
        if region and out.stepped:
            record["trust/next_scale"] = region.update(out)
            if region.exhausted:
                record["stop"] = trust.STOP
        log.append(record)
        if record["stop"] != "none":
            break
    return log, model


def test_a_measured_step_reports_what_its_own_batches_lost_and_gained(digits):
    model, (xr, yr), (xf, yf) = digits
    before = [F.cross_entropy(model(xr), yr).item(), F.cross_entropy(model(xf), yf).item()]
    log, after_model = measured_steps(digits, get_rule("hamu-q", constraint=0.05, radius=0.5), 1, lr=0.5)
    after = [F.cross_entropy(after_model(xr), yr).item(), F.cross_entropy(after_model(xf), yf).item()]
    assert log[0]["realised/retain_change"] == pytest.approx(after[0] - before[0], abs=1e-6)
    assert log[0]["realised/forget_gain"] == pytest.approx(after[1] - before[1], abs=1e-6)
    # a large step on a curved loss: what first order promised and what happened differ
    assert log[0]["realised/retain_change"] > log[0]["guarantee/retain_change"] + 0.01


class LinearRetain(torch.nn.Module):
    """θ ∈ R^n; retain loss a·θ (linear: its first-order model is exact), and a quadratic
    retain loss ½·k·‖θ‖² + a·θ when curvature k > 0; forget loss b·θ (raised by unlearning)."""

    def __init__(self, n: int = 8, curvature: float = 0.0, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.theta = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
        self.a = torch.randn(n, generator=gen, dtype=torch.float64)
        self.b = 0.8 * self.a + 0.6 * torch.randn(n, generator=gen, dtype=torch.float64)  # conflicting
        self.k = curvature

    def retain(self) -> torch.Tensor:
        return self.a @ self.theta + 0.5 * self.k * self.theta @ self.theta

    def forget(self) -> torch.Tensor:
        return self.b @ self.theta


def adaptive_run(model: LinearRetain, *, tolerance: float, steps: int, constraint: float = 0.5,
                 radius: float = 1.0):
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=1.0))
    region = TrustRegion(get_rule("hamu-q", constraint=constraint, radius=radius, stop_on_criterion=False),
                         tolerance)
    outs, scales = [], []
    for _ in range(steps):
        scales.append(region.scale)
        out = unlearning_step(grads, region.rule(), lr=1.0, measure=True,
                              retain_loss=model.retain, forget_loss=model.forget)
        outs.append(out)
        region.update(out)
        if region.exhausted:
            break
    return outs, scales, region


def test_where_first_order_is_exact_the_radius_never_shrinks():
    outs, scales, _ = adaptive_run(LinearRetain(curvature=0.0), tolerance=1e-9, steps=10)
    assert scales == [1.0] * 10
    for out in outs:  # the measurement is the prediction, to rounding, and B is met exactly
        assert out.realised_retain_change == pytest.approx(out.true_retain_change, abs=1e-12)
        assert out.realised_forget_gain == pytest.approx(0.5, abs=1e-12)


def test_on_a_curved_retain_loss_the_radius_shrinks_until_the_retain_change_is_predicted():
    # error of a step = ½·k·‖Δ‖² with ‖Δ‖ = scale (the radius binds): 0.5 at scale 1, under the
    # tolerance 0.05 from scale ≤ 0.25 (0.03125), above an eighth of it there, so no regrowth
    k, tolerance = 1.0, 0.05
    outs, scales, region = adaptive_run(LinearRetain(curvature=k), tolerance=tolerance, steps=8)
    errors = [o.realised_retain_change - o.true_retain_change for o in outs]
    norms = [s for s in scales]
    assert errors == pytest.approx([0.5 * k * n**2 for n in norms], rel=1e-9)
    assert scales[:3] == [1.0, 0.5, 0.25] and scales[2:] == [0.25] * 6
    assert all(e <= tolerance for e in errors[2:])
    # without it every step keeps the full error, 10× the tolerance
    fixed = adaptive_run(LinearRetain(curvature=k), tolerance=float("inf"), steps=3)[0]
    assert [o.realised_retain_change - o.true_retain_change for o in fixed] == pytest.approx([0.5] * 3)


def test_the_radius_grows_back_when_the_model_is_accurate_again():
    assert trust.next_scale(0.25, -0.1, -0.1 + 0.006, tolerance=0.05) == 0.5  # error ≤ tol/8: grow
    assert trust.next_scale(1.0, -0.1, -0.1, tolerance=0.05) == 1.0  # never above 1
    assert trust.next_scale(0.5, -0.1, -0.1 + 0.007, tolerance=0.05) == 0.5  # between: keep
    assert trust.next_scale(0.5, -0.1, -0.1 + 0.05, tolerance=0.05) == 0.5
    assert trust.next_scale(0.5, -0.1, -0.1 + 0.06, tolerance=0.05) == 0.25  # over: halve
    assert trust.next_scale(0.5, 0.0, float("nan"), tolerance=0.05) == 0.25


def test_a_loss_too_curved_for_any_radius_stops_the_run():
    outs, scales, region = adaptive_run(LinearRetain(curvature=1e4), tolerance=1e-3, steps=20)
    assert region.exhausted and scales[-1] == trust.MIN_SCALE and len(outs) == 7
    assert scales == [2.0**-i for i in range(7)]


def test_the_scale_shrinks_the_radius_and_an_absolute_b_alike():
    rng = np.random.default_rng(0)
    stats = BlockStats.from_tensor(torch.tensor(np.abs(rng.normal(size=(5, 3))) + [[1, 1, 0]]))
    scaled = get_rule("hamu-q", constraint=0.3, radius=0.8, trust_scale=0.25)(stats, 0.1)
    plain = get_rule("hamu-q", constraint=0.3 * 0.25, radius=0.8 * 0.25)(stats, 0.1)
    assert torch.equal(scaled.retain_coef, plain.retain_coef) and torch.equal(scaled.forget_coef, plain.forget_coef)
    assert scaled.diagnostics["constraint_total"] == pytest.approx(0.075)


@pytest.mark.parametrize("unit", ["reach", "damage_free"])
def test_a_scale_free_b_is_a_fraction_of_the_steps_own_reach(unit):
    rng = np.random.default_rng(1)
    for trial in range(20):
        raw = rng.normal(size=(6, 3))
        rr, ff = np.abs(raw[:, 0]) + 0.1, np.abs(raw[:, 1]) + 0.1
        rf = np.clip(raw[:, 2], -1, 1) * np.sqrt(rr * ff)
        stats = BlockStats.from_tensor(torch.tensor(np.stack([rr, ff, rf], 1)))
        radius = torch.full((6,), 0.7, dtype=torch.float64)
        reach = {"reach": float(forget_reach(stats, radius).sum()), "damage_free": damage_free_reach(stats, radius)}
        result = get_rule("hamu-q", constraint=0.6, radius=0.7, constraint_unit=unit,
                          constraint_split="optimal")(stats, 0.1)
        assert result.stop is None
        assert result.diagnostics["constraint_total"] == pytest.approx(0.6 * reach[unit], rel=1e-12)
        assert result.diagnostics["forget_gain"] >= 0.6 * reach[unit] * (1 - 1e-9)
        if unit == "damage_free":  # below D* the optimal split never raises the retain loss
            assert result.diagnostics["retain_change"] <= 1e-9 * reach[unit]
    with pytest.raises(ValueError, match="constraint is a fraction of the reach under constraint_unit reach: at most 1"):
        get_rule("hamu-q", constraint=2.0, constraint_unit="reach")


def test_the_receipt_counts_the_measured_guarantee_and_can_find_it_broken(digits):
    log, _ = measured_steps(digits, get_rule("hamu-q", constraint=0.05, radius=0.5), 3, lr=0.5)
    record = receipt.guarantee_record(log, "hamu-q")
    realised = record["realised"]
    assert record["held"] == 3 and realised["steps"] == 3
    assert realised["held"] == sum(r["realised/forget_gain"] >= 0.05 for r in log)
    assert realised["retain_change_realised"] == pytest.approx(sum(r["realised/retain_change"] for r in log))
    assert realised["worst_retain_error"] == pytest.approx(
        max(r["realised/retain_change"] - r["guarantee/retain_change"] for r in log))
    broken = [{**r, "realised/forget_gain": 0.01} for r in log]
    assert receipt.guarantee_record(broken, "hamu-q")["realised"]["held"] == 0
    text = receipt.engine_verdict({"method": "hamu-q", "steps": 3, "stop": "none",
                                   "guarantee": receipt.guarantee_record(broken, "hamu-q")})
    assert "held on 3 of 3 steps taken. Measured on each step's own batches after it, it held on 0 of 3;" in text


def test_a_trust_region_run_logs_its_scale_and_stops_by_name(digits):
    rule = get_rule("hamu-q", constraint=0.05, radius=0.5, trust_tolerance=1e-6)
    log, _ = measured_steps(digits, rule, 20, lr=0.5, tolerance=1e-6)
    assert [r["trust/scale"] for r in log] == [2.0**-i for i in range(len(log))]
    assert log[-1]["stop"] == trust.STOP and len(log) == 7
    assert [r["guarantee/B"] for r in log] == pytest.approx([0.05 * 2.0**-i for i in range(7)])
    record = receipt.guarantee_record(log, "hamu-q")
    assert record["steps"] == 7 and record["B_span"] == pytest.approx([0.05 / 64, 0.05])


# ---- the matched stop: evaluations close in on the target ----------------------------------

def simulated_stop(prob, target: float, every: int, schedule: bool) -> tuple[int, int]:
    """(step at which the monitor stops, evaluations made) for a forget probability prob(step)."""
    from hamu_ray.engine.monitor import next_evaluation

    history, step = [(0, prob(0))], 0
    while True:
        step += 1
        extra = next_evaluation(history, target, every) if schedule else None
        if step % every == 0 or step == extra:
            history.append((step, prob(step)))
            if history[-1][1] <= target:
                return step, len(history)


@pytest.mark.parametrize("rate", [0.05, 0.13, 0.21, 0.3, 0.45])
def test_the_matched_stop_lands_within_a_step_or_two_of_the_target_not_an_interval(rate):
    import math

    prob = lambda step: 0.5 * math.exp(-rate * step)  # noqa: E731
    target, every = 0.01, 10
    first_below = math.ceil(math.log(0.5 / target) / rate)
    stop, evaluations = simulated_stop(prob, target, every, schedule=True)
    assert first_below <= stop <= first_below + 1
    assert evaluations <= first_below / every + 8  # a few extra evaluations, not one per step
    plain_stop = simulated_stop(prob, target, every, schedule=False)[0]
    assert plain_stop == every * math.ceil(first_below / every)  # what it was: the next multiple


def test_no_extra_evaluation_without_a_target_or_when_the_probability_does_not_fall():
    from hamu_ray.engine.monitor import next_evaluation

    assert next_evaluation([(0, 0.5), (10, 0.2)], None, 10) is None
    assert next_evaluation([(0, 0.2), (10, 0.3)], 0.01, 10) is None
    assert next_evaluation([(10, 0.05), (20, 0.02)], 0.01, 10) == 23  # 7.6 steps away: half of it
    assert next_evaluation([(0, 0.5), (10, 0.25)], 0.01, 10) == 20  # far: the regular interval
