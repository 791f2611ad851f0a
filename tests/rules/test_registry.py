"""The rule table: names, hyper-parameter validation, and the errors users see."""

from __future__ import annotations

import ast
import pathlib

import pytest
import torch

from hamu_ray.rules import RULES, BlockStats, NonFiniteStatsError, get_rule

STATS = BlockStats.from_tensor(torch.tensor([[1.0, 2.0, 0.5], [3.0, 1.0, -1.0]]))


def test_the_contract_names_are_registered():
    assert set(RULES) == {"hamu-q", "hamu-u", "surgery", "gdiff", "gru", "pcgrad", "ga", "ft"}


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_returns_float64_coefficients_per_block(name):
    result = get_rule(name)(STATS, 0.1)
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
    ("hamu-q", {"radius": 0.0}, "radius must be"),
    ("hamu-q", {"radius": "sgd"}, "radius must be"),
    ("hamu-u", {"constraint_split": "norm"}, "constraint_split must be one of equal"),
    ("hamu-q", {"on_infeasible": "skip"}, "on_infeasible must be one of stop, ascent"),
    ("hamu-q", {"full_grad": "yes"}, "full_grad must be true or false"),
    ("hamu-q", {"threshold": 1.0}, "no hyper-parameter.*threshold.*valid: constraint"),
    ("surgery", {"epsilon": float("inf")}, "epsilon must be"),
    ("gdiff", {"alpha": 1.0}, "no hyper-parameter.*alpha.*valid: none"),
])
def test_invalid_hyper_parameters_name_the_field(name, hparams, message):
    with pytest.raises(ValueError, match=message):
        get_rule(name, **hparams)


@pytest.mark.parametrize("lr", [0.0, -1.0, float("nan")])
def test_invalid_lr(lr):
    with pytest.raises(ValueError, match="lr must be"):
        get_rule("hamu-q")(STATS, lr)


def test_non_finite_statistics_stop_with_a_clear_error():
    bad = BlockStats.from_tensor(torch.tensor([[1.0, 2.0, 0.5], [float("nan"), 1.0, 0.0]]))
    with pytest.raises(NonFiniteStatsError, match=r"block\(s\) \[1\] of 2"):
        get_rule("hamu-q")(bad, 0.1)


def test_rules_import_no_framework():
    """rules/ stays pure torch: the math is testable without Ray, DeepSpeed, MLflow or pydantic."""
    banned = {"ray", "deepspeed", "mlflow", "pydantic"}
    for path in pathlib.Path("hamu_ray/rules").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not {n.split(".")[0] for n in names} & banned, path
