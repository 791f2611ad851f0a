"""Properties every rule must keep, on random gradients drawn by hypothesis."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hamu_ray.rules import BlockStats, StopReason, get_rule
from tests.rules.helpers import dot, random_blocks, reach_of, stats_of, step_of

LR = 0.05
seeds = st.integers(0, 2**32 - 1)
hamu_hparams = st.fixed_dictionaries({
    "radius": st.one_of(st.just("lr"), st.floats(1e-3, 2.0)),
    "constraint_split": st.sampled_from(["equal", "grad_norm", "exp_dot", "optimal"]),
    "full_grad": st.booleans(),
    "on_infeasible": st.sampled_from(["stop", "ascent"]),
    "stop_on_criterion": st.booleans(),
})
below_one = st.floats(0.0, 1.0, exclude_max=True)


def _hamu_q_case(seed, hparams, constraint_of):
    """A random instance, and the rule's result at B = constraint_of(stop_rhs, total reach), both
    read at B = 0; the total reach Σ_b R_b·‖g_f,b‖ is computed here from the real tensors."""
    rng = np.random.default_rng(seed)
    retain, forget = random_blocks(rng)
    stats = stats_of(retain, forget)
    probe = get_rule("hamu-q", constraint=0.0, radius=hparams["radius"], full_grad=hparams["full_grad"])
    probed = probe(stats, LR)
    constraint = constraint_of(probed.diagnostics["stop_rhs"], reach_of(probed, forget, hparams["full_grad"]))
    rule = get_rule("hamu-q", constraint=constraint, **hparams)
    return retain, forget, stats, rule(stats, LR), constraint


@settings(max_examples=300, deadline=None)
@given(seeds, hamu_hparams, below_one)
def test_feasible_steps_keep_the_guarantee(seed, hparams, fraction):
    # B below the exact stopping reach is feasible and never trips the criterion, by construction:
    # every example reaches the assertions (stop_on_criterion either way)
    retain, forget, stats, result, constraint = _hamu_q_case(
        seed, hparams, lambda exact, reach: fraction * exact)
    assert result.stop is None and not {"ascent", "infeasible"} & set(result.branch), result.branch
    _assert_guarantee_and_radius(retain, forget, stats, result, constraint, hparams["full_grad"])


@settings(max_examples=200, deadline=None)
@given(seeds, hamu_hparams, below_one)
def test_reachable_totals_are_never_infeasible(seed, hparams, fraction):
    # B anywhere below Σ_b R_b·‖g_f,b‖: capped shares keep every split feasible (criterion off)
    hparams = {**hparams, "stop_on_criterion": False}
    retain, forget, stats, result, constraint = _hamu_q_case(
        seed, hparams, lambda exact, reach: fraction * reach)
    assert result.stop is None and not {"ascent", "infeasible"} & set(result.branch), result.branch
    _assert_guarantee_and_radius(retain, forget, stats, result, constraint, hparams["full_grad"])


def _assert_guarantee_and_radius(retain, forget, stats, result, constraint, full_grad):
    """Realised first-order gain g_f·Δ ≥ B from the real tensors, and ‖Δ_b‖ ≤ R_b."""
    deltas = step_of(result, retain, forget, LR)
    gain = sum(dot(f, d) for f, d in zip(forget, deltas))
    scale = sum(float(r.norm() * f.norm()) for r, f in zip(retain, forget)) * LR + constraint
    assert gain >= constraint - 1e-9 * scale
    # the gain is a sum of terms up to ‖g_f,b‖·‖Δ_b‖: its rounding error scales with their size
    magnitude = sum(float(f.norm() * d.norm()) for f, d in zip(forget, deltas))
    assert result.diagnostics["forget_gain"] == pytest.approx(gain, rel=1e-9, abs=1e-12 * (scale + magnitude))
    # ‖g_r⊥‖ comes from rr·ff − rf², which loses precision as ε/sin²θ on nearly colinear pairs
    solved = stats.total() if full_grad else stats
    sin2 = ((solved.rr * solved.ff - solved.rf**2) / (solved.rr * solved.ff)).clamp_min(1e-12)
    rtol = 1e-9 + 1e-14 / sin2
    radius = result.diagnostics["radius"]
    if full_grad:
        total = float(torch.sqrt(sum((d * d).sum() for d in deltas)))
        assert total <= float(radius[0]) * (1 + float(rtol[0]))
    else:
        for d, r, tol in zip(deltas, radius.tolist(), rtol.tolist()):
            assert float(d.norm()) <= r * (1 + tol)


@settings(max_examples=150, deadline=None)
@given(seeds, hamu_hparams, st.floats(0.0, 1.0, exclude_min=True))
def test_criterion_stops_between_the_exact_and_the_total_reach(seed, hparams, fraction):
    hparams = {**hparams, "stop_on_criterion": True}
    retain, forget, stats, result, constraint = _hamu_q_case(
        seed, hparams, lambda exact, reach: exact + fraction * (reach - exact))
    assume(constraint > result.diagnostics["stop_rhs"])  # not when no block conflicts
    assert result.stop is StopReason.CRITERION and result.diagnostics["stop_margin"] < 0
    assert float(result.retain_coef.abs().sum() + result.forget_coef.abs().sum()) == 0


@settings(max_examples=300, deadline=None)
@given(seeds, hamu_hparams, below_one)
def test_criterion_stops_exactly_when_the_least_retain_change_is_positive(seed, hparams, fraction):
    # "damage is unavoidable at B" ⇔ the optimal split (the least first-order retain change that
    # gains B, criterion off) raises the retain loss; whatever split the stopping rule is run with
    hparams = {**hparams, "stop_on_criterion": True}
    retain, forget, stats, result, constraint = _hamu_q_case(seed, hparams, lambda exact, reach: fraction * reach)
    optimal = get_rule("hamu-q", constraint=constraint, **{**hparams, "constraint_split": "optimal",
                                                            "stop_on_criterion": False})(stats, LR)
    least_change = optimal.diagnostics["retain_change"]
    scale = constraint + LR * sum(float(r.norm() * f.norm()) for r, f in zip(retain, forget))
    assume(abs(constraint - result.diagnostics["stop_rhs"]) > 1e-6 * scale)  # not on the boundary
    assert (result.stop is StopReason.CRITERION) == (least_change > 0), (least_change, result.diagnostics["stop_margin"])


@settings(max_examples=150, deadline=None)
@given(seeds, hamu_hparams, st.floats(1e-6, 2.0))
def test_out_of_reach_stops_or_takes_the_minimal_norm_ascent(seed, hparams, excess):
    retain, forget, stats, result, constraint = _hamu_q_case(
        seed, hparams, lambda exact, reach: (1 + excess) * reach)
    assume(constraint > 0)
    deltas = step_of(result, retain, forget, LR)
    if hparams["on_infeasible"] == "stop":
        assert result.stop is StopReason.INFEASIBLE and set(result.branch) == {"infeasible"}
        assert all(float(d.abs().sum()) == 0 for d in deltas)
        return
    # ascent whatever stop_on_criterion says: Δ = (B/Σ_b ff_b)·g_f over the whole model
    assert result.stop is None and set(result.branch) == {"ascent"}
    total_ff = sum(dot(f, f) for f in forget)
    for d, f in zip(deltas, forget):
        torch.testing.assert_close(d, constraint / total_ff * f, rtol=1e-9, atol=1e-12 * constraint)
    assert sum(dot(f, d) for f, d in zip(forget, deltas)) == pytest.approx(constraint, rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(seeds, hamu_hparams, st.floats(0.0, 3.0))
def test_hamu_u_is_hamu_q_on_the_swapped_negated_pair(seed, hparams, fraction):
    rng = np.random.default_rng(seed)
    retain, forget = random_blocks(rng)
    constraint = fraction * LR * sum(float(r.norm() * f.norm()) for r, f in zip(retain, forget))
    u = get_rule("hamu-u", constraint=constraint, **hparams)(stats_of(retain, forget), LR)
    swapped_r, swapped_f = [-f for f in forget], [-r for r in retain]
    q = get_rule("hamu-q", constraint=constraint, **hparams)(stats_of(swapped_r, swapped_f), LR)
    assert u.stop == q.stop and u.branch == q.branch
    for d_u, d_q in zip(step_of(u, retain, forget, LR), step_of(q, swapped_r, swapped_f, LR)):
        torch.testing.assert_close(d_u, d_q, rtol=1e-9, atol=1e-12)


@settings(max_examples=200, deadline=None)
@given(seeds, st.floats(-1.0, 1.0))
def test_surgery_bounds_the_first_order_retain_increase(seed, epsilon):
    rng = np.random.default_rng(seed)
    retain, forget = random_blocks(rng)
    result = get_rule("surgery", epsilon=epsilon)(stats_of(retain, forget), LR)
    d = [a * r + c * f for r, f, a, c in zip(retain, forget, result.retain_coef.tolist(),
                                              result.forget_coef.tolist())]
    increase = -sum(dot(r, x) for r, x in zip(retain, d))  # g_r·(−d), a unit step
    scale = sum(float(r.norm() * f.norm()) for r, f in zip(retain, forget))
    assert increase <= epsilon + 1e-9 * scale
    if result.diagnostics["surgery_multiplier"] > 0:  # the bound is active: it is tight
        assert increase == pytest.approx(epsilon, abs=1e-9 * scale)


@settings(max_examples=200, deadline=None)
@given(seeds, st.booleans())
def test_projection_rules_only_change_conflicting_pairs(seed, full_grad):
    rng = np.random.default_rng(seed)
    retain, forget = random_blocks(rng)
    stats = stats_of(retain, forget)
    gru = get_rule("gru", full_grad=full_grad)(stats, LR)
    pcgrad = get_rule("pcgrad", full_grad=full_grad)(stats, LR)
    ga, gdiff = get_rule("ga")(stats, LR), get_rule("gdiff")(stats, LR)
    solved = stats.total() if full_grad else stats
    conflict = (solved.rf > 0).expand(stats.num_blocks) if full_grad else solved.rf > 0
    for b in range(stats.num_blocks):
        if not conflict[b]:
            assert (gru.retain_coef[b], gru.forget_coef[b]) == (ga.retain_coef[b], ga.forget_coef[b])
            assert (pcgrad.retain_coef[b], pcgrad.forget_coef[b]) == (
                gdiff.retain_coef[b], gdiff.forget_coef[b])
    # on conflict GRU's direction is orthogonal to g_r (per block, or over the whole model)
    d = [a * r + c * f for r, f, a, c in zip(retain, forget, gru.retain_coef.tolist(),
                                              gru.forget_coef.tolist())]
    dots = [dot(r, x) for r, x in zip(retain, d)]
    scale = sum(float(r.norm() * f.norm()) for r, f in zip(retain, forget))
    if full_grad and bool(conflict[0]):
        assert abs(sum(dots)) <= 1e-9 * scale
    for b in range(stats.num_blocks):
        if not full_grad and conflict[b]:
            assert abs(dots[b]) <= 1e-9 * scale


@settings(max_examples=100, deadline=None)
@given(seeds, st.integers(2, 5))
def test_shard_partial_sums_equal_the_unsharded_statistics(seed, shards):
    rng = np.random.default_rng(seed)
    retain, forget = random_blocks(rng)
    whole = stats_of(retain, forget).to_tensor()
    # split every block into contiguous shards (as ZeRO partitions it) and sum the partial stats
    parts = [stats_of([r.tensor_split(shards)[i] for r in retain],
                      [f.tensor_split(shards)[i] for f in forget]).to_tensor() for i in range(shards)]
    torch.testing.assert_close(sum(parts), whole, rtol=1e-12, atol=1e-12)


def test_full_grad_equals_one_concatenated_block():
    rng = np.random.default_rng(7)
    retain, forget = random_blocks(rng, k=5)
    hparams = dict(constraint=0.02, radius=0.3, stop_on_criterion=False)
    blocks = get_rule("hamu-q", full_grad=True, **hparams)(stats_of(retain, forget), LR)
    one = get_rule("hamu-q", **hparams)(stats_of([torch.cat(retain)], [torch.cat(forget)]), LR)
    assert blocks.branch == one.branch * 5
    torch.testing.assert_close(torch.cat(step_of(blocks, retain, forget, LR)),
                               step_of(one, [torch.cat(retain)], [torch.cat(forget)], LR)[0])


def test_criterion_stops_when_constraint_exceeds_rhs():
    # conflicting pair: the most gain with g_r·Δ ≤ 0 is R·‖g_f‖·sin θ
    retain = [torch.tensor([1.0, 0.0], dtype=torch.float64)]
    forget = [torch.tensor([1.0, 1.0], dtype=torch.float64)]
    R = 0.5
    rhs = R * 2**0.5 * np.sin(np.pi / 4)
    below = get_rule("hamu-q", constraint=0.9 * rhs, radius=R)(stats_of(retain, forget), LR)
    above = get_rule("hamu-q", constraint=1.1 * rhs, radius=R)(stats_of(retain, forget), LR)
    assert below.diagnostics["stop_rhs"] == pytest.approx(rhs)
    assert below.diagnostics["paper_rhs"] == pytest.approx(rhs)  # exact for a conflicting pair
    assert below.stop is None and below.diagnostics["stop_margin"] > 0
    assert above.stop is StopReason.CRITERION and above.diagnostics["stop_margin"] < 0
    assert above.retain_coef.abs().sum() == 0 and above.forget_coef.abs().sum() == 0
    logged = get_rule("hamu-q", constraint=1.1 * rhs, radius=R, stop_on_criterion=False)(
        stats_of(retain, forget), LR)
    assert logged.stop is None and logged.diagnostics["stop_margin"] < 0


def test_constraint_split_weights():
    stats = BlockStats.from_tensor(torch.tensor([[1.0, 4.0, 1.0], [9.0, 1.0, -2.0]]))
    from hamu_ray.rules.hamu import split_constraint

    radius = torch.full((2,), 10.0, dtype=torch.float64)  # caps 20 and 10: none binds
    torch.testing.assert_close(split_constraint(stats, 1.0, "equal", radius),
                               torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(split_constraint(stats, 1.0, "grad_norm", radius),
                               torch.tensor([2 / 5, 3 / 5], dtype=torch.float64))  # ‖g_r‖‖g_f‖ = 2, 3
    e = np.exp([-1.0, 2.0])
    torch.testing.assert_close(split_constraint(stats, 1.0, "exp_dot", radius),
                               torch.tensor(e / e.sum(), dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_statistics_match_float64_sums(dtype):
    # blocks on both sides of the chunk size: the float32 partial sums, summed in float64, must
    # give what float64 throughout gives (to 1e-5 relative; rf relative to ‖g_r‖·‖g_f‖)
    from hamu_ray.rules.stats import CHUNK

    gen = torch.Generator().manual_seed(3)
    sizes = (1, CHUNK - 1, CHUNK, 3 * CHUNK + 5, 1 << 20)
    retain = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
    forget = [(0.3 * r.double() + torch.randn(n, generator=gen, dtype=torch.float64)).to(dtype)
              for n, r in zip(sizes, retain)]
    got = BlockStats.from_grads(retain, forget)
    exact = [(r.double() @ r.double(), f.double() @ f.double(), r.double() @ f.double())
             for r, f in zip(retain, forget)]
    assert got.rr.dtype == torch.float64
    for b, (rr, ff, rf) in enumerate(exact):
        assert abs(got.rr[b] - rr) <= 1e-5 * rr
        assert abs(got.ff[b] - ff) <= 1e-5 * ff
        assert abs(got.rf[b] - rf) <= 1e-5 * (rr * ff).sqrt()
