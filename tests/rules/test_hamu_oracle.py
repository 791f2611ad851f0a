"""HAMU-Q's closed form against an independent numerical solver (scipy SLSQP), block by block.

The oracle solves min g_r·Δ s.t. g_f·Δ ≥ B_b, ‖Δ‖ ≤ R_b on a normalised copy of each block
(unit gradients, unit radius) so that tiny and huge norms get the same solver accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from hamu_ray.rules import StopReason, get_rule
from tests.rules.helpers import dot, random_blocks, stats_of, step_of

LR = 0.1


def oracle_min_retain(g_r: np.ndarray, g_f: np.ndarray, B: float, R: float, seed: int = 0):
    """(best objective or None if infeasible, max reachable forget gain) by SLSQP from 3 starts."""
    s_r, s_f = np.linalg.norm(g_r), np.linalg.norm(g_f)
    u_r = g_r / s_r if s_r > 0 else g_r
    u_f = g_f / s_f if s_f > 0 else g_f
    best_gain = _unit_max_gain(u_f, seed)
    max_gain = best_gain * s_f * R
    b = B / (R * s_f) if s_f > 0 else (0.0 if B == 0 else np.inf)
    if b > best_gain + 1e-9:
        return None, max_gain
    best = np.inf
    for x0 in _starts(len(g_r), seed + 1):
        res = minimize(lambda d: u_r @ d, x0, jac=lambda d: u_r, method="SLSQP",
                       constraints=[_ball(), {"type": "ineq", "fun": lambda d: u_f @ d - b,
                                              "jac": lambda d: u_f}],
                       options={"ftol": 1e-14, "maxiter": 500})
        feasible = np.linalg.norm(res.x) <= 1 + 1e-7 and u_f @ res.x >= b - 1e-7
        if feasible:
            best = min(best, u_r @ res.x)
    assert np.isfinite(best), "the oracle found no feasible point on a feasible instance"
    return best * s_r * R, max_gain


def _ball():
    return {"type": "ineq", "fun": lambda d: 1 - d @ d, "jac": lambda d: -2 * d}


def _starts(n: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(3):
        v = rng.normal(size=n)
        yield 0.5 * v / np.linalg.norm(v)


def check_against_oracle(retain, forget, rule, lr=LR):
    """Assert the rule's step is feasible and optimal (or infeasible) exactly as the oracle says.

    Feasibility is a property of the total since the shares are capped at each block's reach: the
    step is infeasible iff B exceeds the sum of the oracle's per-block maximal gains. Each block's
    share is then checked against the oracle; a share at its block's cap has the single feasible
    point R·ĝ_f, which the solver cannot approach from inside, so it is checked directly.
    """
    result = rule(stats_of(retain, forget), lr)
    total = rule.params.constraint
    constraint = result.diagnostics["constraint"].tolist()
    radius = result.diagnostics["radius"].tolist()
    max_gains = [oracle_max_gain(f.numpy(), R, seed=i) for i, (f, R) in enumerate(zip(forget, radius))]
    if total > 0 and abs(sum(max_gains) - total) <= 1e-6 * total:
        pytest.skip("feasibility boundary")  # within solver accuracy of the boundary
    oracle_infeasible = total > sum(max_gains)
    assert (result.stop is StopReason.INFEASIBLE) == oracle_infeasible, (result.branch, max_gains)
    if oracle_infeasible:
        assert all(float(d.abs().sum()) == 0 for d in step_of(result, retain, forget, lr))
        return result
    for i, (delta, r, f, B, R, max_gain, branch) in enumerate(zip(
            step_of(result, retain, forget, lr), retain, forget, constraint, radius, max_gains, result.branch)):
        scale = R * float(r.norm()) + 1e-300
        assert B <= max_gain * (1 + 1e-6) + 1e-300, (branch, B, max_gain)  # a capped share
        assert dot(f, delta) >= B - 1e-9 * max(B, R * float(f.norm())), branch
        assert float(delta.norm()) <= R * (1 + 1e-9), branch
        if B >= max_gain * (1 - 1e-6) and B > 0:  # at the cap: Δ = R·ĝ_f
            torch.testing.assert_close(delta, R * f / f.norm(), rtol=1e-5, atol=1e-6 * R)
            continue
        value, _ = oracle_min_retain(r.numpy(), f.numpy(), B, R, seed=i)
        assert value is not None, (branch, B, max_gain)
        assert dot(r, delta) <= value + 1e-6 * scale, (branch, dot(r, delta), value)
    assert sum(constraint) >= total * (1 - 1e-12)  # the shares cover B
    return result


def oracle_max_gain(g_f: np.ndarray, R: float, seed: int = 0) -> float:
    """max g_f·Δ over ‖Δ‖ ≤ R, found by SLSQP (not from a closed form)."""
    s_f = np.linalg.norm(g_f)
    return _unit_max_gain(g_f / s_f, seed) * s_f * R if s_f > 0 else 0.0


def _unit_max_gain(u_f: np.ndarray, seed: int) -> float:
    """The largest u_f·d on the unit ball, found numerically (not from the closed form)."""
    best_gain = -np.inf
    for x0 in _starts(len(u_f), seed):
        res = minimize(lambda d: -u_f @ d, x0, jac=lambda d: -u_f, method="SLSQP",
                       constraints=[_ball()], options={"ftol": 1e-14, "maxiter": 500})
        if np.linalg.norm(res.x) <= 1 + 1e-9:
            best_gain = max(best_gain, u_f @ res.x)
    return best_gain


@pytest.mark.parametrize("seed", range(300))
def test_random_instances_match_the_oracle(seed):
    rng = np.random.default_rng(seed)
    retain, forget = random_blocks(rng)
    split = ["equal", "grad_norm", "exp_dot"][seed % 3]
    radius = "lr" if seed % 2 else float(10 ** rng.uniform(-2, 0))
    # B spans easy, hard and infeasible: a fraction of the largest reachable gain Σ R_b·‖g_f,b‖
    probe = get_rule("hamu-q", constraint=0.0, radius=radius)(stats_of(retain, forget), LR)
    reach = float((probe.diagnostics["radius"] * torch.stack([f.norm() for f in forget])).sum())
    constraint = float(rng.choice([0.0, rng.uniform(0, 0.5), rng.uniform(0.5, 1.5)])) * reach
    rule = get_rule("hamu-q", constraint=constraint, radius=radius, constraint_split=split,
                    stop_on_criterion=False)
    check_against_oracle(retain, forget, rule)


def _pair(g_r, g_f):
    return [torch.tensor(g_r, dtype=torch.float64)], [torch.tensor(g_f, dtype=torch.float64)]


EDGE_CASES = {
    "orthogonal": ([1.0, 0, 0], [0, 2.0, 0], 0.05),
    "colinear": ([1.0, 2.0, -1.0], [2.0, 4.0, -2.0], 0.05),
    "anti_parallel": ([1.0, 2.0, -1.0], [-0.5, -1.0, 0.5], 0.05),
    "anti_parallel_small_gain": ([1.0, 2.0, -1.0], [-0.5, -1.0, 0.5], 0.001),
    "zero_forget_B0": ([1.0, -1.0, 3.0], [0.0, 0.0, 0.0], 0.0),
    "zero_forget_B": ([1.0, -1.0, 3.0], [0.0, 0.0, 0.0], 0.01),
    "B_zero": ([1.0, 0.5, 0], [0.3, 1.0, 2.0], 0.0),
    "infeasible_radius": ([1.0, 0.5, 0], [0.3, 1.0, 2.0], 3.0),
    "tiny_norms": ([1e-9, 2e-9, 0], [3e-9, -1e-9, 1e-9], 1e-19),
    "huge_norms": ([1e8, 2e8, 0], [3e8, -1e8, 1e8], 1e15),
    "zero_retain": ([0.0, 0.0, 0.0], [1.0, 2.0, 0.0], 0.05),
}


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("radius", ["lr", 0.5])
def test_edge_cases_match_the_oracle(case, radius):
    g_r, g_f, B = EDGE_CASES[case]
    retain, forget = _pair(g_r, g_f)
    if radius == "lr" and case == "zero_retain":
        radius = 0.5  # the lr radius of a zero retain gradient is zero: nothing but Δ = 0 fits
    scale = float(np.linalg.norm(g_r) * np.linalg.norm(g_f)) or 1.0
    rule = get_rule("hamu-q", constraint=B * (scale if radius == "lr" else 1.0), radius=radius,
                    stop_on_criterion=False)
    check_against_oracle(retain, forget, rule)


def test_branches_are_the_documented_ones():
    lr = 0.1
    cases = {
        "direct": EDGE_CASES["anti_parallel_small_gain"],
        "colinear": EDGE_CASES["colinear"],
        "rectified": EDGE_CASES["orthogonal"],
        "infeasible": EDGE_CASES["infeasible_radius"],
    }
    for expected, (g_r, g_f, B) in cases.items():
        retain, forget = _pair(g_r, g_f)
        result = get_rule("hamu-q", constraint=B, radius=1.0, stop_on_criterion=False)(
            stats_of(retain, forget), lr)
        assert result.branch == (expected,), (expected, result.branch)


@pytest.mark.parametrize("stop_on_criterion", [False, True])
def test_ascent_policy_takes_the_minimal_norm_ascent(stop_on_criterion):
    # feasibility is decided before the criterion, so ascent is reachable with the default too
    retain, forget = _pair(*EDGE_CASES["infeasible_radius"][:2])
    B = 1.0
    result = get_rule("hamu-q", constraint=B, radius=0.1, on_infeasible="ascent",
                      stop_on_criterion=stop_on_criterion)(stats_of(retain, forget), LR)
    assert result.stop is None and result.branch == ("ascent",)
    (delta,) = step_of(result, retain, forget, LR)
    f = forget[0]
    torch.testing.assert_close(delta, B / dot(f, f) * f)  # Δ = (B/ff)·g_f

