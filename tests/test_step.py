"""The single-process unlearning step on a real (tiny) problem: an MLP on scikit-learn's digits.

This is the reference the distributed engine must reproduce exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from hamu_ray.grads import TorchGrads
from hamu_ray.rules import StopReason, get_rule
from hamu_ray.step import unlearning_step

FORGET_CLASS = 3


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    forget = y == FORGET_CLASS
    return model, (X[~forget], y[~forget]), (X[forget], y[forget])


def accuracy(model, X, y) -> float:
    with torch.no_grad():
        return float((model(X).argmax(1) == y).float().mean())


def run_steps(model, retain, forget, rule, *, lr, steps):
    model = copy.deepcopy(model)
    grads = TorchGrads(model, torch.optim.SGD(model.parameters(), lr=lr))
    gen = torch.Generator().manual_seed(0)
    outputs = []
    for _ in range(steps):
        ir = torch.randint(len(retain[0]), (64,), generator=gen)
        jf = torch.randint(len(forget[0]), (32,), generator=gen)
        outputs.append(unlearning_step(
            grads, rule, lr=lr,
            retain_loss=lambda: F.cross_entropy(model(retain[0][ir]), retain[1][ir]),
            forget_loss=lambda: F.cross_entropy(model(forget[0][jf]), forget[1][jf])))
    return model, outputs


def test_thirty_hamu_q_steps_forget_the_class_and_keep_the_rest(trained):
    model, retain, forget = trained
    lr, constraint = 0.1, 0.05
    rule = get_rule("hamu-q", constraint=constraint, radius=0.1)
    start_retain = accuracy(model, *retain)
    with torch.no_grad():
        start_forget_loss = float(F.cross_entropy(model(forget[0]), forget[1]))

    unlearned, outputs = run_steps(model, retain, forget, rule, lr=lr, steps=30)

    assert all(o.stepped and o.result.stop is None for o in outputs)
    gains = [o.result.diagnostics["forget_gain"] for o in outputs]
    assert min(gains) >= constraint * (1 - 1e-9), gains
    with torch.no_grad():
        end_forget_loss = float(F.cross_entropy(unlearned(forget[0]), forget[1]))
    assert end_forget_loss > start_forget_loss + 1.0
    assert accuracy(unlearned, *forget) < 0.5
    assert accuracy(unlearned, *retain) >= start_retain - 0.05
    assert next(model.parameters()) is not next(unlearned.parameters())  # original untouched


def test_the_written_gradient_is_the_rules_combination(trained):
    """One step by hand: SGD moves the parameters by exactly −lr·(a·g_r + c·g_f) per block."""
    model, retain, forget = trained
    lr = 0.05
    rule = get_rule("hamu-q", constraint=0.01, radius=0.2)
    retain_grads = torch.autograd.grad(F.cross_entropy(model(retain[0][:64]), retain[1][:64]),
                                       list(model.parameters()))
    forget_grads = torch.autograd.grad(F.cross_entropy(model(forget[0][:32]), forget[1][:32]),
                                       list(model.parameters()))
    stepped = copy.deepcopy(model)
    grads = TorchGrads(stepped, torch.optim.SGD(stepped.parameters(), lr=lr))
    out = unlearning_step(grads, rule, lr=lr,
                          retain_loss=lambda: F.cross_entropy(stepped(retain[0][:64]), retain[1][:64]),
                          forget_loss=lambda: F.cross_entropy(stepped(forget[0][:32]), forget[1][:32]))
    for p0, p1, r, f, a, c in zip(model.parameters(), stepped.parameters(), retain_grads, forget_grads,
                                  out.result.retain_coef.tolist(), out.result.forget_coef.tolist()):
        torch.testing.assert_close(p1 - p0, -lr * (a * r + c * f), rtol=1e-4, atol=1e-7)


def test_a_stop_leaves_the_parameters_unchanged(trained):
    model, retain, forget = trained
    rule = get_rule("hamu-q", constraint=1e3, radius=0.1)  # far beyond any reachable gain
    unlearned, (out,) = run_steps(model, retain, forget, rule, lr=0.1, steps=1)
    assert not out.stepped and out.result.stop is StopReason.INFEASIBLE
    for p0, p1 in zip(model.parameters(), unlearned.parameters()):
        assert torch.equal(p0, p1)


def test_clipping_equals_stepping_on_pre_clipped_gradients(trained):
    """clip_norm rescales g_r and g_f each to at most that global norm before the rule."""
    model, retain, forget = trained
    lr = 0.1
    rule = get_rule("hamu-q", constraint=0.001, radius=0.05)
    xr, yr, xf, yf = retain[0][:64], retain[1][:64], forget[0][:32], forget[1][:32]
    norms = []
    for x, y in ((xr, yr), (xf, yf)):
        g = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        norms.append(float(torch.sqrt(sum((t * t).sum() for t in g))))
    clip = 0.5 * min(norms)  # both gradients really are clipped, by different factors
    scale_r, scale_f = (clip / n for n in norms)

    clipped, manual = copy.deepcopy(model), copy.deepcopy(model)
    out = unlearning_step(TorchGrads(clipped, torch.optim.SGD(clipped.parameters(), lr=lr)), rule, lr=lr,
                          clip_norm=clip,
                          retain_loss=lambda: F.cross_entropy(clipped(xr), yr),
                          forget_loss=lambda: F.cross_entropy(clipped(xf), yf))
    unlearning_step(TorchGrads(manual, torch.optim.SGD(manual.parameters(), lr=lr)), rule, lr=lr,
                    retain_loss=lambda: scale_r * F.cross_entropy(manual(xr), yr),
                    forget_loss=lambda: scale_f * F.cross_entropy(manual(xf), yf))
    assert out.retain_scale == pytest.approx(scale_r) and out.forget_scale == pytest.approx(scale_f)
    for p1, p2 in zip(clipped.parameters(), manual.parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-7)
