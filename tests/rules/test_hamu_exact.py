"""HAMU's decisions on the total: the exact stopping reach, feasibility first, capped shares.

The stopping reach D* = max Σ_b g_f,b·Δ_b s.t. Σ_b g_r,b·Δ_b ≤ 0, ‖Δ_b‖ ≤ R_b is checked against
brute force: a dense sampling of the circle/sphere for one 2-D/3-D pair (a linear objective peaks on
the boundary of the ball, and the flat face's boundary lies on the sphere), and SLSQP on the *whole*
coupled problem (every block's Δ in one vector, one retain constraint) for random multi-block
instances. A sum of per-block maxima (each block keeping its own retain loss) is only a lower bound.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from hamu_ray.rules import BlockStats, StopReason, get_rule
from hamu_ray.rules.hamu import split_constraint
from tests.rules.helpers import dot, random_blocks, reach_of, stats_of, step_of

LR = 0.1


def _pair(g_r, g_f):
    return [torch.tensor(g_r, dtype=torch.float64)], [torch.tensor(g_f, dtype=torch.float64)]


def _sphere(dim: int, n: int) -> np.ndarray:
    """n unit vectors covering the circle (dim 2) or the sphere (dim 3, Fibonacci lattice)."""
    if dim == 2:
        angle = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return np.stack([np.cos(angle), np.sin(angle)], axis=1)
    i = np.arange(n) + 0.5
    z, phi = 1 - 2 * i / n, np.pi * (1 + 5**0.5) * i
    rho = np.sqrt(1 - z * z)
    return np.stack([rho * np.cos(phi), rho * np.sin(phi), z], axis=1)


def sampled_reach(g_r: np.ndarray, g_f: np.ndarray, R: float, n: int = 400_000) -> float:
    """Max of g_f·Δ over samples of the feasible boundary: the sphere's part with g_r·Δ ≤ 0 and
    the rim {g_r·Δ = 0, ‖Δ‖ = R} (the flat face's maximum lies on it)."""
    points = R * _sphere(len(g_r), n)
    points = points[points @ g_r <= 0]
    if np.any(g_r):
        plane = np.linalg.svd(g_r[None, :])[2][1:]  # orthonormal basis of the plane g_r·Δ = 0
        angle = np.linspace(0, 2 * np.pi, n, endpoint=False)
        coords = np.stack([np.cos(angle), np.sin(angle)], axis=1)[:, :len(plane)]
        rim = R * coords @ plane / np.linalg.norm(coords, axis=1, keepdims=True)
        points = np.concatenate([points, rim])
    return float((points @ g_f).max())


def slsqp_reach(g_r: np.ndarray, g_f: np.ndarray, R: float, seed: int) -> float:
    """max g_f·Δ s.t. ‖Δ‖ ≤ R, g_r·Δ ≤ 0, on the unit-normalised problem, best of 3 starts."""
    s_r, s_f = np.linalg.norm(g_r), np.linalg.norm(g_f)
    u_r, u_f = g_r / s_r, g_f / s_f
    cons = [{"type": "ineq", "fun": lambda d: 1 - d @ d, "jac": lambda d: -2 * d},
            {"type": "ineq", "fun": lambda d: -u_r @ d, "jac": lambda d: -u_r}]
    best, rng = -np.inf, np.random.default_rng(seed)
    for _ in range(3):
        x0 = rng.normal(size=len(g_r))
        x0 *= 0.5 / np.linalg.norm(x0)
        x = minimize(lambda d: -u_f @ d, x0, jac=lambda d: -u_f, method="SLSQP", constraints=cons,
                     options={"ftol": 1e-14, "maxiter": 500}).x
        if x @ x <= 1 + 1e-9 and u_r @ x <= 1e-9:
            best = max(best, u_f @ x)
    return best * s_f * R


PAIRS = {  # (g_r, g_f): the reach inside R = 0.7 without raising the retain loss
    "anti_parallel": ([1.0, 2.0], [-0.5, -1.0]),
    "orthogonal": ([1.0, 0.0, 0.0], [0.0, 2.0, 0.0]),
    "colinear": ([1.0, 2.0, -1.0], [2.0, 4.0, -2.0]),
    "conflicting": ([1.0, 0.0], [1.0, 1.0]),
    "conflicting_3d": ([1.0, -2.0, 0.5], [0.3, -1.0, 2.0]),
    "non_conflicting": ([1.0, 0.0], [-1.0, 0.01]),
    "non_conflicting_3d": ([1.0, -2.0, 0.5], [-0.3, 1.0, 2.0]),
    "flat_retain": ([0.0, 0.0], [1.0, 2.0]),
}


@pytest.mark.parametrize("case", PAIRS)
def test_stopping_reach_matches_a_dense_search(case):
    g_r, g_f = (np.array(v) for v in PAIRS[case])
    R = 0.7
    result = get_rule("hamu-q", constraint=0.0, radius=R)(stats_of(*_pair(g_r, g_f)), LR)
    exact = result.diagnostics["stop_rhs"]
    # sampled points are feasible, so the sample max is below the exact one, and close to it
    sampled = sampled_reach(g_r, g_f, R)
    assert sampled <= exact * (1 + 1e-12) + 1e-12
    assert sampled >= exact - 5e-5 * R * np.linalg.norm(g_f)  # sphere spacing ~6e-3 rad


def coupled_slsqp_reach(retain, forget, radii, seed: int) -> float:
    """max Σ_b g_f,b·Δ_b s.t. Σ_b g_r,b·Δ_b ≤ 0, ‖Δ_b‖ ≤ R_b by SLSQP over all blocks at once, in
    unit-ball coordinates y_b = Δ_b/R_b, scaled to O(1); best feasible result of 3 starts."""
    sizes = [r.numel() for r in retain]
    cuts = np.cumsum(sizes)[:-1]
    a_r = np.concatenate([R * r.numpy() for r, R in zip(retain, radii)])
    a_f = np.concatenate([R * f.numpy() for f, R in zip(forget, radii)])
    s_r, s_f = np.linalg.norm(a_r), np.linalg.norm(a_f)
    u_r, u_f = a_r / s_r, a_f / s_f
    masks = [np.repeat(np.arange(len(sizes)) == i, sizes) for i in range(len(sizes))]
    ball = [{"type": "ineq", "fun": lambda y, m=m: 1 - (y * y) @ m, "jac": lambda y, m=m: -2 * y * m}
            for m in masks]
    cons = ball + [{"type": "ineq", "fun": lambda y: -u_r @ y, "jac": lambda y: -u_r}]
    best, rng = -np.inf, np.random.default_rng(seed)
    for _ in range(3):
        x0 = np.concatenate([0.5 * v / np.linalg.norm(v) for v in np.split(rng.normal(size=sum(sizes)), cuts)])
        y = minimize(lambda y: -u_f @ y, x0, jac=lambda y: -u_f, method="SLSQP", constraints=cons,
                     options={"ftol": 1e-15, "maxiter": 1000}).x
        if all(part @ part <= 1 + 1e-9 for part in np.split(y, cuts)) and u_r @ y <= 1e-9:
            best = max(best, u_f @ y)
    return best * s_f


def per_block_reach(retain, forget, radii) -> float:
    """Σ_b of each block's reach when it alone must not raise its retain loss: the old, lower bound."""
    total = 0.0
    for r, f, R in zip(retain, forget, radii):
        rr, ff, rf = dot(r, r), dot(f, f), dot(r, f)
        total += R * (np.sqrt(max(rr * ff - rf * rf, 0.0) / rr) if rf > 0 and rr > 0 else np.sqrt(ff))
    return total


@pytest.mark.parametrize("seed", range(10))
def test_stopping_reach_matches_slsqp_on_the_coupled_problem(seed):
    rng = np.random.default_rng(seed)
    retain, forget = random_blocks(rng, k=int(rng.integers(2, 6)))
    radius = "lr" if seed % 2 else 0.3
    result = get_rule("hamu-q", constraint=0.0, radius=radius)(stats_of(retain, forget), LR)
    R = result.diagnostics["radius"].tolist()
    oracle = coupled_slsqp_reach(retain, forget, R, seed)
    assert result.diagnostics["stop_rhs"] == pytest.approx(oracle, rel=1e-6)
    # the paper's value and the per-block sum are logged/known lower bounds, never above it
    assert result.diagnostics["paper_rhs"] <= result.diagnostics["stop_rhs"] * (1 + 1e-12)
    assert per_block_reach(retain, forget, R) <= result.diagnostics["stop_rhs"] * (1 + 1e-12)


def test_one_block_pays_back_another_blocks_retain_cost():
    # block 0: g_r = g_f = (1, 0); block 1: g_r = (1, 0), g_f = (0, 1); R = 1. Each block alone
    # gains 1.0 damage-free (block 1 along g_f), but Δ_1 = (−a, b), Δ_0 = (a, 0) keeps the total
    # retain change at 0 and gains a + b: √2 at a = b = 1/√2 (issue 23's counterexample).
    retain = [torch.tensor([1.0, 0.0], dtype=torch.float64)] * 2
    forget = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)]
    stats = stats_of(retain, forget)
    assert per_block_reach(retain, forget, [1.0, 1.0]) == pytest.approx(1.0)
    result = get_rule("hamu-q", constraint=1.2, radius=1.0, constraint_split="optimal")(stats, 1.0)
    assert result.diagnostics["stop_rhs"] == pytest.approx(2**0.5, rel=1e-12)
    assert result.stop is None  # on main this stopped (CRITERION, rhs 1.0)
    deltas = step_of(result, retain, forget, 1.0)
    assert sum(dot(f, d) for f, d in zip(forget, deltas)) >= 1.2 - 1e-12
    assert sum(dot(r, d) for r, d in zip(retain, deltas)) < 0  # −0.214: no retain damage
    beyond = get_rule("hamu-q", constraint=1.5, radius=1.0, constraint_split="optimal")(stats, 1.0)
    assert beyond.stop is StopReason.CRITERION


def test_many_conflicting_blocks_reach_beyond_the_per_block_sum():
    # 64 conflicting blocks: between the per-block sum and D* the optimal step is damage-free
    rng = np.random.default_rng(7)
    retain, forget = [], []
    for _ in range(64):
        g_r = rng.normal(size=16)
        retain.append(torch.tensor(g_r))
        forget.append(torch.tensor(rng.uniform(0.2, 2) * g_r + rng.normal(size=16)))
    stats = stats_of(retain, forget)
    probe = get_rule("hamu-q", constraint=0.0, radius=1.0)(stats, LR)
    exact, lower = probe.diagnostics["stop_rhs"], per_block_reach(retain, forget, [1.0] * 64)
    assert exact > 1.05 * lower
    B = (lower + exact) / 2
    result = get_rule("hamu-q", constraint=B, radius=1.0, constraint_split="optimal")(stats, LR)
    assert result.stop is None and result.diagnostics["retain_change"] <= 1e-9 * B
    assert result.diagnostics["forget_gain"] >= B * (1 - 1e-12)


def test_a_non_conflicting_step_that_gains_b_does_not_stop():
    # sin θ ≈ 0.01 makes the paper's rhs 0.01 < B, yet the retain descent gains 1.0 ≥ B
    retain, forget = _pair([1.0, 0.0], [-1.0, 0.01])
    result = get_rule("hamu-q", constraint=0.5, radius=1.0)(stats_of(retain, forget), LR)
    assert result.stop is None and result.branch == ("direct",)
    (delta,) = step_of(result, retain, forget, LR)
    assert dot(forget[0], delta) >= 0.5 and dot(retain[0], delta) < 0
    assert result.diagnostics["paper_rhs"] < 0.5 < result.diagnostics["stop_rhs"]
    assert result.diagnostics["stop_margin"] == pytest.approx(result.diagnostics["stop_rhs"] - 0.5)


@pytest.mark.parametrize("rule", ["hamu-q", "hamu-u"])
@pytest.mark.parametrize("full_grad", [False, True])
def test_ascent_is_taken_with_the_default_stop_on_criterion(rule, full_grad):
    rng = np.random.default_rng(3)
    retain, forget = random_blocks(rng, k=4)
    stats = stats_of(retain, forget)
    # effective forget gradient: HAMU-U's guarantee is a retain drop, along −g_r
    g = forget if rule == "hamu-q" else [-r for r in retain]
    probe = get_rule(rule, constraint=0.0, radius=0.01, full_grad=full_grad)(stats, LR)
    B = 3 * reach_of(probe, g, full_grad)
    result = get_rule(rule, constraint=B, radius=0.01, full_grad=full_grad, on_infeasible="ascent")(stats, LR)
    assert result.stop is None and set(result.branch) == {"ascent"}
    # the minimal-norm ascent over the whole model: Δ = (B/Σ_b ‖g_b‖²)·g
    total = sum(dot(x, x) for x in g)
    for delta, x in zip(step_of(result, retain, forget, LR), g):
        torch.testing.assert_close(delta, B / total * x)
    stop = get_rule(rule, constraint=B, radius=0.01, full_grad=full_grad)(stats, LR)
    assert stop.stop is StopReason.INFEASIBLE and set(stop.branch) == {"infeasible"}
    assert probe.diagnostics["max_gain"] == pytest.approx(reach_of(probe, g, full_grad))


def _two_blocks():
    """Stats [[1, 4, 1], [9, 1, −2]] from real vectors: caps R·‖g_f‖ = 2R and R."""
    retain = [torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([3.0, 0.0], dtype=torch.float64)]
    forget = [torch.tensor([1.0, 3**0.5], dtype=torch.float64),
              torch.tensor([-2 / 3, (5 / 9) ** 0.5], dtype=torch.float64)]
    return retain, forget


@pytest.mark.parametrize("split, expected", [
    ("grad_norm", [1.5, 1.0]),  # weights 2:3 ask 1.0, 1.5 of B = 2.5; block 1 caps at 1.0
    ("equal", [1.5, 1.0]),  # 1.25 each; block 1 caps at 1.0
    ("exp_dot", [1.5, 1.0]),  # exp(−rf) favours block 1 (rf = −2); it caps at 1.0
])
def test_a_share_over_its_cap_is_refilled_elsewhere(split, expected):
    retain, forget = _two_blocks()
    stats = stats_of(retain, forget)
    torch.testing.assert_close(stats.to_tensor(), torch.tensor([[1.0, 4, 1], [9, 1, -2]], dtype=torch.float64))
    result = get_rule("hamu-q", constraint=2.5, radius=1.0, constraint_split=split,
                      stop_on_criterion=False)(stats, LR)
    assert result.stop is None, result.branch
    gain = sum(dot(f, d) for f, d in zip(forget, step_of(result, retain, forget, LR)))
    assert gain >= 2.5 * (1 - 1e-12)
    radius = torch.ones(2, dtype=torch.float64)
    torch.testing.assert_close(split_constraint(stats, 2.5, split, radius),
                               torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("split", ["equal", "grad_norm", "exp_dot"])
def test_a_block_without_forget_gradient_gets_no_share(split):
    retain = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.5, -1.0], dtype=torch.float64)]
    forget = [torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)]
    stats = stats_of(retain, forget)
    result = get_rule("hamu-q", constraint=0.1, radius=1.0, constraint_split=split)(stats, LR)
    assert result.stop is None and result.branch[0] == "direct"
    assert sum(dot(f, d) for f, d in zip(forget, step_of(result, retain, forget, LR))) >= 0.1 * (1 - 1e-12)
    shares = split_constraint(stats, 0.1, split, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(shares, torch.tensor([0.0, 0.1], dtype=torch.float64))


def test_water_filling_takes_several_rounds_and_all_zero_weights_fall_back_to_equal():
    # grad_norm weights ‖g_r‖·‖g_f‖ are zero for the flat-retain blocks 1 and 2; once block 0 caps,
    # the rest is spread equally over them
    stats = BlockStats.from_tensor(torch.tensor([[1.0, 1.0, 0.5], [0.0, 4.0, 0.0], [0.0, 1.0, 0.0]]))
    radius = torch.ones(3, dtype=torch.float64)  # caps 1, 2, 1
    shares = split_constraint(stats, 3.5, "grad_norm", radius)
    torch.testing.assert_close(shares, torch.tensor([1.0, 1.5, 1.0], dtype=torch.float64))
    out_of_reach = split_constraint(stats, 9.0, "grad_norm", radius)  # Σ caps = 4 < 9: all capped
    torch.testing.assert_close(out_of_reach, torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64))
