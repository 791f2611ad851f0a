"""The single-process unlearning step on a real (tiny) problem: an MLP on scikit-learn's digits.

This is the reference the distributed engine must reproduce exactly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from hamu_ray.engine.grads import TorchGrads
from hamu_ray.rules import StopReason, get_rule
from hamu_ray.rules.surgery import ImplicitSurgeryParams
from hamu_ray.engine.step import ImplicitSurgery, implicit_surgery_step, unlearning_step
from tests.digits_fixtures import FORGET_CLASS, digits_mlp



@pytest.fixture(scope="module")
def trained():
    return digits_mlp(64, train_steps=150)


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
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
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
    for name, value in model.state_dict().items():  # the original's weights are untouched
        assert torch.equal(value, snapshot[name]), name


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


def flat_grad(model, loss_fn) -> torch.Tensor:
    model.zero_grad()
    loss_fn(model).backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def realised_first_order_change(model, before, loss_fn, *, eps=1e-4) -> float:
    """g·Δ of the step before → model, measured on the loss itself: a central difference of
    t ↦ L(before + t·Δ) at t = 0 in float64 (independent of the rule's own predicted numbers)."""
    base = copy.deepcopy(before).double()
    delta = [p1.detach().double() - p0.detach() for p0, p1 in zip(base.parameters(), model.double().parameters())]
    model.float()

    def loss_at(t: float) -> float:
        probe = copy.deepcopy(base)
        with torch.no_grad():
            for p, d in zip(probe.parameters(), delta):
                p.add_(t * d)
            return float(loss_fn(probe))
    return (loss_at(eps) - loss_at(-eps)) / (2 * eps)


@pytest.mark.parametrize("clip", [None, 0.5])
def test_the_realised_forget_gain_meets_the_constraint(trained, clip):
    """The guarantee, measured: the forget loss's first-order rise along the step actually taken
    is at least B (and equals the logged true gain); with clip_norm the rule works in clipped
    units, so the true gain is the clipped one divided by s_f, never below B."""
    model, retain, forget = trained
    lr, radius = 0.1, 0.1
    xr, yr, xf, yf = retain[0][:64], retain[1][:64], forget[0][:32], forget[1][:32]
    retain_fn = lambda m: F.cross_entropy(m(xr.to(next(m.parameters()).dtype)), yr)  # noqa: E731
    forget_fn = lambda m: F.cross_entropy(m(xf.to(next(m.parameters()).dtype)), yf)  # noqa: E731
    forget_norm = float(flat_grad(copy.deepcopy(model), forget_fn).norm())
    clip_norm = None if clip is None else clip * forget_norm
    constraint = 0.3 * radius * (clip_norm or forget_norm)  # well inside the reach R·‖s_f·g_f‖
    stepped = copy.deepcopy(model)
    rule = get_rule("hamu-q", constraint=constraint, radius=radius, stop_on_criterion=False)
    out = unlearning_step(TorchGrads(stepped, torch.optim.SGD(stepped.parameters(), lr=lr)),
                          rule, lr=lr, clip_norm=clip_norm,
                          retain_loss=lambda: retain_fn(stepped), forget_loss=lambda: forget_fn(stepped))
    assert out.stepped
    gain = realised_first_order_change(stepped, model, forget_fn)
    retain_change = realised_first_order_change(stepped, model, retain_fn)
    assert gain >= constraint * (1 - 1e-3)
    assert out.true_forget_gain == pytest.approx(gain, rel=1e-3)
    assert out.true_retain_change == pytest.approx(retain_change, rel=1e-3, abs=1e-6)
    clipped_gain = out.result.diagnostics["forget_gain"]
    if clip is None:
        assert out.forget_scale == 1.0 and clipped_gain == pytest.approx(gain, rel=1e-3)
    else:
        assert out.forget_scale == pytest.approx(clip, rel=1e-4)
        assert clipped_gain == pytest.approx(out.forget_scale * gain, rel=1e-3)
        assert clipped_gain >= constraint * (1 - 1e-9) and gain > clipped_gain


# every way a tensor's values reach Python or host memory: each is a device-to-host sync on a GPU
READS = frozenset({"cpu", "numpy", "__array__", "item", "tolist", "__float__", "__int__", "__bool__",
                   "__index__", "__format__"})


class DeviceReads(TorchFunctionMode):
    """The reads (READS) of device tensors, in order. On a CPU-only machine "device" tensors are
    those that exist before the mode starts (the model, its data) and everything computed from
    them; host tensors are a read's result, tensors made from Python numbers alone, and whatever
    is computed from host tensors only. So a rule reading its host copy of the statistics is no
    sync, and float(loss) is one. (`.to("cpu")` is not seen here: on CPU it is `.to(device)`;
    tests/test_gpu.py counts real CUDA syncs.)"""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []
        self.host: dict[int, torch.Tensor] = {}  # by id, kept alive so that ids are not reused

    def is_host(self, t: torch.Tensor) -> bool:
        return id(t) in self.host

    def mark(self, out, host: bool) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if host:
                    self.host[id(t)] = t
                else:
                    self.host.pop(id(t), None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        name = getattr(func, "__name__", "")
        read = name in READS
        if read and not self.is_host(inputs[0]):
            self.reads.append(name)
        out = func(*args, **kwargs)
        # a read's result is on the host; so is what is made from host tensors or Python numbers
        self.mark(out, read or (all(map(self.is_host, inputs)) if inputs else "device" not in kwargs))
        return out


def test_the_read_counter_sees_every_kind_of_read_of_device_values():
    x = torch.tensor([1.0, 2.0])  # made before the mode: a device tensor
    with DeviceReads() as seen:
        total = x.sum()
        float(total), int(total), bool(total > 0), total.item(), x.tolist(), x.numpy(), f"{total:.1f}"
        host = x.cpu()
        float(host.sum()), host.tolist(), bool(torch.tensor(1.0) > 0)  # host values: no syncs
    assert seen.reads == ["__float__", "__int__", "__bool__", "item", "tolist", "numpy", "__format__", "cpu"]


@pytest.mark.parametrize("name,hparams", [("hamu-q", {"constraint": 0.01, "radius": 0.1}),
                                          ("hamu-u", {"constraint": 0.001, "radius": "lr"}),
                                          ("surgery", {"epsilon": 0.01}), ("gru", {}), ("gdiff", {})])
def test_the_step_reads_the_device_once(trained, name, hparams):
    """Statistics and both losses reach the host in one copy (step.to_host); the rule, the
    clipping and the combination read only that host copy."""
    model, retain, forget = trained
    stepped = copy.deepcopy(model)
    with DeviceReads() as seen:
        unlearning_step(TorchGrads(stepped, torch.optim.SGD(stepped.parameters(), lr=0.1)),
                        get_rule(name, **hparams), lr=0.1, clip_norm=1.0,
                        retain_loss=lambda: F.cross_entropy(stepped(retain[0][:64]), retain[1][:64]),
                        forget_loss=lambda: F.cross_entropy(stepped(forget[0][:32]), forget[1][:32]))
    assert seen.reads == ["cpu"]


@pytest.mark.parametrize("fast", [True, False])
def test_an_implicit_surgery_step_reads_the_device_once(trained, fast):
    model, retain, forget = trained
    stepped = copy.deepcopy(model)
    grads = TorchGrads(stepped, torch.optim.SGD(stepped.parameters(), lr=0.1))
    state = ImplicitSurgery(ImplicitSurgeryParams(fast=fast))
    for _ in range(2):  # the fast variant's dual update starts at its second step
        with DeviceReads() as seen:
            implicit_surgery_step(
                grads, state, lr=0.1,
                retain_loss=lambda: F.cross_entropy(stepped(retain[0][:64]), retain[1][:64]),
                forget_loss=lambda: F.cross_entropy(stepped(forget[0][:32]), forget[1][:32]))
        assert seen.reads == ["tolist"]  # step._host_floats
