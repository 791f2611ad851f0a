"""The rule table: names, hyper-parameter validation, and the errors users see."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from hamu_ray.rules import RULES, BlockStats, NonFiniteStatsError, get_rule
from hamu_ray.rules.surgery import ImplicitSurgeryParams

STATS = BlockStats.from_tensor(torch.tensor([[1.0, 2.0, 0.5], [3.0, 1.0, -1.0]]))
# the least a rule needs: HAMU's constraint has no default (without one it guarantees nothing)
REQUIRED = {"hamu-q": {"constraint": 0.01}, "hamu-u": {"constraint": 0.01}}


def test_the_contract_names_are_registered():
    assert set(RULES) == {"hamu-q", "hamu-u", "surgery", "gdiff", "gru", "pcgrad", "ga", "ft"}


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_returns_float64_coefficients_per_block(name):
    result = get_rule(name, **REQUIRED.get(name, {}))(STATS, 0.1)
    assert result.retain_coef.dtype == result.forget_coef.dtype == torch.float64
    assert result.retain_coef.shape == result.forget_coef.shape == (2,)
    assert len(result.branch) == 2
    for key in ("cosine", "forget_gain", "retain_change", "step_norm"):
        assert key in result.diagnostics


def test_unknown_rule_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown rule 'hamu'.*hamu-q, hamu-u"):
        get_rule("hamu")


@pytest.mark.parametrize("name, hparams, message", [
    ("hamu-q", {"constraint": -0.1}, "constraint must be"),
    ("hamu-q", {"constraint": float("nan")}, "constraint must be"),
    ("hamu-q", {"constraint": 0.1, "radius": 0.0}, "radius must be"),
    ("hamu-q", {"constraint": 0.1, "radius": "sgd"}, "radius must be"),
    ("hamu-u", {"constraint": 0.1, "constraint_split": "norm"},
     "constraint_split must be one of equal, grad_norm, exp_dot, optimal"),
    ("hamu-q", {"constraint": 0.1, "on_infeasible": "skip"}, "on_infeasible must be one of stop, ascent"),
    ("hamu-q", {"full_grad": "yes"}, "full_grad must be true or false"),
    ("hamu-q", {"threshold": 1.0}, "no hyper-parameter.*threshold.*valid: constraint"),
    ("surgery", {"epsilon": float("inf")}, "epsilon must be"),
    # a missing required field is a ValueError naming it, not the dataclass's TypeError
    ("hamu-q", {}, "rule 'hamu-q' needs hyper-parameter.*constraint"),
    ("hamu-u", {"radius": 0.5}, "rule 'hamu-u' needs hyper-parameter.*constraint"),
    # booleans are ints in Python: YAML's `true` must not pass as 1
    ("hamu-q", {"constraint": True}, "constraint must be a finite number"),
    ("hamu-q", {"constraint": 0.1, "radius": True}, "radius must be"),
    ("surgery", {"epsilon": False}, "epsilon must be a finite number"),
    ("gdiff", {"alpha": 1.0}, "no hyper-parameter.*alpha.*valid: none"),
])
def test_invalid_hyper_parameters_name_the_field(name, hparams, message):
    with pytest.raises(ValueError, match=message):
        get_rule(name, **hparams)


@pytest.mark.parametrize("field", ["dual_lr", "initial_weight", "epsilon"])
def test_implicit_surgery_refuses_booleans(field):
    with pytest.raises(ValueError, match=f"{field} must be a finite number"):
        ImplicitSurgeryParams(**{field: True})


def test_the_optimal_split_is_a_choice():
    assert get_rule("hamu-q", constraint=0.1, constraint_split="optimal").params.constraint_split == "optimal"


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan")])
def test_invalid_lr(lr):
    with pytest.raises(ValueError, match="lr must be"):
        get_rule("hamu-q", constraint=0.01)(STATS, lr)


def test_non_finite_statistics_stop_with_a_clear_error():
    bad = BlockStats.from_tensor(torch.tensor([[1.0, 2.0, 0.5], [float("nan"), 1.0, 0.0]]))
    with pytest.raises(NonFiniteStatsError, match=r"block\(s\) \[1\] of 2"):
        get_rule("hamu-q", constraint=0.01)(bad, 0.1)


def test_rules_import_no_framework():
    """rules/ stays pure torch: the math is testable without Ray, DeepSpeed, MLflow or pydantic."""
    banned = {"ray", "deepspeed", "mlflow", "pydantic"}
    import hamu_ray.rules

    sources = sorted(pathlib.Path(hamu_ray.rules.__file__).parent.glob("*.py"))
    assert len(sources) >= 4, sources  # the package's own files, wherever the tests run from
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & banned, path
