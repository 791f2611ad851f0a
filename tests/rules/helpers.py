"""Shared test helpers: random gradient blocks and the step a rule's coefficients imply."""

from __future__ import annotations

import numpy as np
import torch

from hamu_ray.rules import BlockStats, RuleResult


def random_blocks(rng: np.random.Generator, *, k: int | None = None, scale: float = 1.0):
    """K pairs (g_r, g_f) of float64 tensors with a random mix of alignments."""
    k = k if k is not None else int(rng.integers(1, 9))
    retain, forget = [], []
    for _ in range(k):
        n = int(rng.integers(2, 65))
        g_r = rng.normal(size=n)
        mix = rng.choice(["random", "aligned", "opposed", "near_colinear"])
        noise = rng.normal(size=n)
        if mix == "random":
            g_f = noise
        elif mix == "aligned":
            g_f = rng.uniform(0.2, 3) * g_r + rng.uniform(0.1, 1) * noise
        elif mix == "opposed":
            g_f = -rng.uniform(0.2, 3) * g_r + rng.uniform(0.1, 1) * noise
        else:
            g_f = rng.uniform(-2, 2) * g_r + 1e-3 * noise
        norm_scale = scale * 10 ** rng.uniform(-1, 1)
        retain.append(torch.tensor(g_r * norm_scale))
        forget.append(torch.tensor(g_f * norm_scale * 10 ** rng.uniform(-0.5, 0.5)))
    return retain, forget


def step_of(result: RuleResult, retain, forget, lr: float):
    """Δ_b = −lr·(a_b·g_r,b + c_b·g_f,b) for every block, from the real tensors."""
    return [-lr * (a * r + c * f) for r, f, a, c in
            zip(retain, forget, result.retain_coef.tolist(), result.forget_coef.tolist())]


def stats_of(retain, forget) -> BlockStats:
    return BlockStats.from_grads(retain, forget)


def dot(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.dot(x.reshape(-1).double(), y.reshape(-1).double()))


def reach_of(result: RuleResult, gains, full_grad: bool = False) -> float:
    """Σ_b R_b·‖g_b‖ from the real tensors: the most first-order gain along `gains` inside the
    radii the rule used (the whole model as one ball in full-gradient mode)."""
    radius = result.diagnostics["radius"].tolist()
    if full_grad:
        return radius[0] * float(torch.sqrt(sum((g.double() ** 2).sum() for g in gains)))
    return sum(R * float(g.double().norm()) for R, g in zip(radius, gains))
