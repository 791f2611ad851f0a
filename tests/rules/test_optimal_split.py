"""The optimal constraint split (docs/design.md §2) against SLSQP on the whole K-block problem.

The oracle solves min Σ_b g_r,b·Δ_b s.t. Σ_b g_f,b·Δ_b ≥ B, ‖Δ_b‖ ≤ R_b in the full dimension, on a
normalised copy: Δ_b = R_b·y_b (unit balls), objective divided by Σ_b R_b‖g_r,b‖ and constraint by
Σ_b R_b‖g_f,b‖, so blocks of very different scales get the same solver accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from hamu_ray.rules import StopReason, get_rule
from tests.rules.helpers import dot, random_blocks, stats_of, step_of

LR = 0.1
FIXED_SPLITS = ("equal", "grad_norm", "exp_dot")


def oracle_min_retain(retain, forget, radius, B, starts: int = 3) -> float:
    """The least total first-order retain change Σ_b g_r,b·Δ_b, by SLSQP from several starts."""
    g_r = [r.numpy() for r in retain]
    g_f = [f.numpy() for f in forget]
    edges = np.cumsum([0] + [len(x) for x in g_r])
    s_r = sum(R * np.linalg.norm(x) for R, x in zip(radius, g_r)) or 1.0
    s_f = sum(R * np.linalg.norm(x) for R, x in zip(radius, g_f))
    c_r = np.concatenate([R * x for R, x in zip(radius, g_r)]) / s_r
    c_f = np.concatenate([R * x for R, x in zip(radius, g_f)]) / s_f
    b = B / s_f
    blocks = [slice(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])]

    def ball(sl):
        def jac(y):
            out = np.zeros_like(y)
            out[sl] = -2 * y[sl]
            return out
        return {"type": "ineq", "fun": lambda y: 1 - y[sl] @ y[sl], "jac": jac}

    cons = [ball(sl) for sl in blocks] + [{"type": "ineq", "fun": lambda y: c_f @ y - b, "jac": lambda y: c_f}]
    best, rng = np.inf, np.random.default_rng(0)
    for _ in range(starts):
        y0 = rng.normal(size=edges[-1])
        y = minimize(lambda y: c_r @ y, 0.3 * y0 / np.linalg.norm(y0), jac=lambda y: c_r, method="SLSQP",
                     constraints=cons, options={"ftol": 1e-15, "maxiter": 1000}).x
        if all(y[sl] @ y[sl] <= 1 + 1e-7 for sl in blocks) and c_f @ y >= b - 1e-7:
            best = min(best, c_r @ y)
    assert np.isfinite(best), "the oracle found no feasible point on a feasible instance"
    return best * s_r


def _instance(seed: int, *, k: int | None = None):
    rng = np.random.default_rng(seed)
    retain, forget = random_blocks(rng, k=k)
    radius = "lr" if seed % 2 else float(10 ** rng.uniform(-2, 0))
    stats = stats_of(retain, forget)
    reach = get_rule("hamu-q", constraint=0.0, radius=radius)(stats, LR).diagnostics["max_gain"]
    return retain, forget, stats, radius, float(rng.uniform(0, 1)) * reach


def _effects(result, retain, forget):
    deltas = step_of(result, retain, forget, LR)
    return (sum(dot(f, d) for f, d in zip(forget, deltas)), sum(dot(r, d) for r, d in zip(retain, deltas)),
            [float(d.norm()) for d in deltas])


def _scale(retain, radius_list):
    return sum(R * float(r.norm()) for R, r in zip(radius_list, retain))


@pytest.mark.parametrize("seed", range(40))
def test_the_optimal_split_matches_slsqp_on_the_whole_problem(seed):
    retain, forget, stats, radius, B = _instance(seed)
    result = get_rule("hamu-q", constraint=B, radius=radius, constraint_split="optimal",
                      stop_on_criterion=False)(stats, LR)
    R = result.diagnostics["radius"].tolist()
    gain, retain_change, norms = _effects(result, retain, forget)
    assert result.stop is None
    assert gain >= B - 1e-9 * (B + sum(R_b * float(f.norm()) for R_b, f in zip(R, forget)))
    assert all(n <= R_b * (1 + 1e-9) for n, R_b in zip(norms, R))
    assert retain_change <= oracle_min_retain(retain, forget, R, B) + 1e-7 * _scale(retain, R)


@pytest.mark.parametrize("seed", range(100))
def test_the_optimal_split_is_at_least_as_good_as_every_fixed_split(seed):
    retain, forget, stats, radius, B = _instance(seed)
    common = dict(constraint=B, radius=radius, stop_on_criterion=False)
    optimal = get_rule("hamu-q", constraint_split="optimal", **common)(stats, LR)
    _, best, _ = _effects(optimal, retain, forget)
    tol = 1e-9 * _scale(retain, optimal.diagnostics["radius"].tolist())
    for split in FIXED_SPLITS:
        fixed = get_rule("hamu-q", constraint_split=split, **common)(stats, LR)
        assert fixed.stop is None, (split, fixed.branch)
        _, retain_change, _ = _effects(fixed, retain, forget)
        assert best <= retain_change + tol, split


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0, exclude_max=True),
       st.one_of(st.just("lr"), st.floats(1e-3, 2.0)), st.booleans())
def test_the_optimal_split_is_never_infeasible_while_the_total_is_reachable(seed, fraction, radius, hamu_u):
    rng = np.random.default_rng(seed)
    retain, forget = random_blocks(rng)
    stats = stats_of(retain, forget)
    name = "hamu-u" if hamu_u else "hamu-q"
    reach = get_rule(name, constraint=0.0, radius=radius)(stats, LR).diagnostics["max_gain"]
    B = fraction * reach
    result = get_rule(name, constraint=B, radius=radius, constraint_split="optimal",
                      stop_on_criterion=False)(stats, LR)
    assert result.stop is None and set(result.branch) <= {"direct", "optimal", "colinear", "zero"}
    deltas = step_of(result, retain, forget, LR)
    # the guarantee and the radius in effective coordinates (HAMU-U: the retain drop, ‖Δ_b‖ ≤ R_b)
    effective = forget if not hamu_u else [-r for r in retain]
    gain = sum(dot(g, d) for g, d in zip(effective, deltas))
    R = result.diagnostics["radius"].tolist()
    assert gain >= B - 1e-9 * (B + reach)
    assert float(result.diagnostics["constraint"].sum()) == pytest.approx(gain, rel=1e-9, abs=1e-9 * reach)
    for d, R_b in zip(deltas, R):
        assert float(d.norm()) <= R_b * (1 + 1e-9) + 1e-300


@pytest.mark.parametrize("seed", range(60))
def test_with_one_block_it_is_the_closed_form(seed):
    retain, forget, stats, radius, _ = _instance(seed)
    rng = np.random.default_rng(seed + 1000)
    probe = get_rule("hamu-q", constraint=0.0, radius=radius, full_grad=True)(stats, LR)
    B = float(rng.uniform(0, 1)) * probe.diagnostics["max_gain"]
    common = dict(constraint=B, radius=radius, full_grad=True, stop_on_criterion=False)
    optimal = get_rule("hamu-q", constraint_split="optimal", **common)(stats, LR)
    closed = get_rule("hamu-q", **common)(stats, LR)
    a, b = torch.cat(step_of(optimal, retain, forget, LR)), torch.cat(step_of(closed, retain, forget, LR))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * float(b.norm()))


ONE_BLOCK = {  # (g_r, g_f): the closed form's colinear/direct/flat/zero branches
    "orthogonal": ([1.0, 0, 0], [0, 2.0, 0]),
    "colinear": ([1.0, 2.0, -1.0], [2.0, 4.0, -2.0]),
    "anti_parallel": ([1.0, 2.0, -1.0], [-0.5, -1.0, 0.5]),
    "zero_retain": ([0.0, 0.0, 0.0], [1.0, 2.0, 0.0]),
    "zero_forget": ([1.0, -1.0, 3.0], [0.0, 0.0, 0.0]),
}


@pytest.mark.parametrize("case", ONE_BLOCK)
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.99, 1.0])
def test_one_block_edge_cases_are_the_closed_form(case, fraction):
    retain, forget = ([torch.tensor(v, dtype=torch.float64)] for v in ONE_BLOCK[case])
    stats = stats_of(retain, forget)
    B = fraction * 0.5 * float(forget[0].norm())
    common = dict(constraint=B, radius=0.5, stop_on_criterion=False)
    optimal = get_rule("hamu-q", constraint_split="optimal", **common)(stats, LR)
    closed = get_rule("hamu-q", **common)(stats, LR)
    assert optimal.stop == closed.stop
    # at B = R·‖g_f‖ both forms are √-conditioned (σ = √(R² − B²/ff) there; the gain is 1 − O(1/λ²)
    # as λ → ∞): a rounding of 1e-16 in the gain moves the step by ~1e-8·R
    atol = 1e-12 if fraction < 1 else 2e-8
    torch.testing.assert_close(step_of(optimal, retain, forget, LR)[0], step_of(closed, retain, forget, LR)[0],
                               rtol=1e-9, atol=atol)


def test_colinear_blocks_share_the_marginal_gain():
    # two aligned colinear blocks (u_b = 0 at λ = t_b = rf/ff) and one orthogonal pair: the cheaper
    # colinear block (t = 0.5) ascends fully, the dearer one (t = 2) takes only what is left
    retain = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([2.0, 0.0], dtype=torch.float64),
              torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)]
    forget = [torch.tensor([2.0, 4.0], dtype=torch.float64), torch.tensor([1.0, 0.0], dtype=torch.float64),
              torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)]
    stats = stats_of(retain, forget)
    R = 0.5
    reach = R * sum(float(f.norm()) for f in forget)

    def rule(B):
        return get_rule("hamu-q", constraint=B, radius=R, constraint_split="optimal",
                        stop_on_criterion=False)(stats, LR)

    for B, marginal in ((0.2 * reach, 0), (0.6 * reach, 0), (0.9 * reach, 1)):  # λ* = 0.5, 0.5, 2
        result = rule(B)
        gain, retain_change, norms = _effects(result, retain, forget)
        assert result.branch[marginal] == "colinear"
        assert gain >= B * (1 - 1e-12) and max(norms) <= R * (1 + 1e-12)
        assert retain_change <= oracle_min_retain(retain, forget, [R] * 3, B, starts=5) + 1e-7
    # B at the total reach is still feasible: its single point is R·ĝ_f in every block
    result = rule(reach)
    assert result.stop is None
    for d, f in zip(step_of(result, retain, forget, LR), forget):
        torch.testing.assert_close(d, R * f / f.norm(), rtol=0, atol=1e-7)


def test_out_of_reach_is_decided_before_the_split():
    retain, forget, stats, radius, _ = _instance(5)
    reach = get_rule("hamu-q", constraint=0.0, radius=radius)(stats, LR).diagnostics["max_gain"]
    result = get_rule("hamu-q", constraint=1.01 * reach, radius=radius, constraint_split="optimal")(stats, LR)
    assert result.stop is StopReason.INFEASIBLE and set(result.branch) == {"infeasible"}
