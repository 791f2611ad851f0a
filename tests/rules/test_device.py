"""Every tensor a rule creates follows the statistics' device and dtype.

No GPU is needed to check this honestly: with the default device set to "meta", a tensor created
without an explicit device lands on meta, and mixing it with the CPU statistics raises (or leaves a
meta tensor in the result). So a rule that passes here also runs on CUDA statistics.
"""

from __future__ import annotations

import pytest
import torch

from hamu_ray.rules import RULES, BlockStats, get_rule
from hamu_ray.rules.hamu import SPLITS

HAMU_CASES = [dict(constraint=b, constraint_split=split, full_grad=full, on_infeasible=policy, radius=radius)
              for split in SPLITS for full in (False, True) for policy in ("stop", "ascent")
              for radius in ("lr", 0.3) for b in (0.0, 0.05, 100.0)]  # easy, binding, out of reach
CASES = [(name, hparams) for name in RULES if name.startswith("hamu") for hparams in HAMU_CASES]
CASES += [(name, {}) for name in RULES if not name.startswith("hamu")]
CASES += [("surgery", {"epsilon": 0.5}), ("gru", {"full_grad": False}), ("pcgrad", {"full_grad": False})]


@pytest.fixture
def meta_default_device():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)  # restore: later tests build tensors without a device


def _stats() -> BlockStats:
    # conflicting, non-conflicting, flat-retain and zero-forget blocks, built on an explicit device
    rows = [[1.0, 4.0, 1.0], [9.0, 1.0, -2.0], [0.0, 2.0, 0.0], [3.0, 0.0, 0.0], [2.0, 2.0, 1.99]]
    return BlockStats.from_tensor(torch.tensor(rows, dtype=torch.float64, device="cpu"))


@pytest.mark.parametrize("name, hparams", CASES)
def test_rules_create_tensors_on_the_statistics_device(meta_default_device, name, hparams):
    result = get_rule(name, **hparams)(_stats(), 0.1)
    tensors = [result.retain_coef, result.forget_coef]
    tensors += [v for v in result.diagnostics.values() if isinstance(v, torch.Tensor)]
    for t in tensors:
        assert t.device.type == "cpu" and t.dtype == torch.float64, (name, t.device, t.dtype)
    assert torch.isfinite(result.retain_coef).all() and torch.isfinite(result.forget_coef).all()


def test_the_meta_default_really_catches_a_device_less_tensor(meta_default_device):
    # the premise of the test above: a device-less constructor lands on meta and mixing raises
    stats = _stats()
    assert torch.ones(3).device.type == "meta"
    with pytest.raises((RuntimeError, NotImplementedError)):
        float((stats.rr * torch.ones(5, dtype=torch.float64)).sum())
