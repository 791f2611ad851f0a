"""Evaluating classifiers after unlearning and comparing them with the retrain oracle.

The oracle is the model trained on the retain set only: an unlearned model is good when it is
indistinguishable from it on the forget set and as accurate elsewhere. Everything here returns
metrics only; the forget set's rows are never logged or printed (they are the sensitive data).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from os import PathLike
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from hamu_ray.tasks.classifier import per_example_ce

SETS = ("forget", "retain", "test")
ACCURACY_GAPS = ("forget_acc", "retain_acc", "test_acc")  # averaged into avg_gap
GAPS = (*ACCURACY_GAPS, "test_acc_retained", "mia_auc")

TABLE_COLUMNS: tuple[str, ...] = (
    "model", "forget_acc", "retain_acc", "test_acc", "test_acc_retained", "forget_loss",
    "forget_entropy", "mia_auc", "forget_quality", "avg_gap", "steps", "stop", "wall_s")
TEXT_COLUMNS = ("model", "stop")  # left-aligned; every other column is a number


@dataclass(frozen=True)
class Predictions:
    losses: np.ndarray  # float64 [n], per-example cross-entropy
    correct: np.ndarray  # bool [n], argmax == label
    entropy: np.ndarray  # float64 [n], predictive entropy of the softmax (nats)
    labels: np.ndarray  # int64 [n]


# ---- per-example predictions -----------------------------------------------------------------

def predict(model: torch.nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, *,
            batch_size: int = 4096) -> Predictions:
    """Per-example loss, correctness and entropy, in eval mode (no dropout) and without gradients."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    inputs = torch.as_tensor(x, dtype=torch.float32)
    labels = torch.as_tensor(y, dtype=torch.int64)
    if len(inputs) != len(labels):
        raise ValueError(f"x has {len(inputs)} rows but y has {len(labels)}")
    device = next(model.parameters(), torch.empty(0)).device
    # per module, so that a model whose submodules were in mixed modes gets exactly those back
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            parts = [_predict_batch(model, inputs[i:i + batch_size].to(device),
                                    labels[i:i + batch_size].to(device))
                     for i in range(0, len(inputs), batch_size)]
    finally:
        for module, training in modes.items():
            module.training = training
    if parts:
        losses, correct, entropy = (torch.cat(column).cpu() for column in zip(*parts))
    else:  # an empty set gives empty arrays; accuracy() then says so
        losses, correct, entropy = torch.empty(0), torch.empty(0, dtype=torch.bool), torch.empty(0)
    return Predictions(losses=losses.numpy().astype(np.float64),
                       correct=correct.numpy().astype(bool),
                       entropy=entropy.numpy().astype(np.float64),
                       labels=labels.numpy().astype(np.int64))


def _predict_batch(model: torch.nn.Module, x: torch.Tensor,
                   y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    logits = model(x).float()
    # entr(p) = -p·log p with entr(0) = 0, so saturated softmaxes give 0 rather than NaN
    entropy = torch.special.entr(torch.softmax(logits, dim=-1)).sum(dim=-1)
    return per_example_ce(logits, y), logits.argmax(dim=-1) == y, entropy


# ---- metrics ---------------------------------------------------------------------------------

def accuracy(p: Predictions, *, exclude_classes: Sequence[int] = ()) -> float:
    keep = ~np.isin(p.labels, np.asarray(exclude_classes, dtype=np.int64))
    if not keep.any():
        raise ValueError(f"no examples left to score once classes {list(exclude_classes)} are excluded")
    return float(p.correct[keep].mean())


def mia_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """Loss-based membership inference: members are expected to have the lower loss.

    1.0: every member has a lower loss than every non-member; 0.5: indistinguishable.
    """
    members, nonmembers = np.asarray(member_losses), np.asarray(nonmember_losses)
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError("membership inference needs both members and non-members")
    is_member = np.concatenate([np.ones(members.size), np.zeros(nonmembers.size)])
    return float(roc_auc_score(is_member, -np.concatenate([members, nonmembers])))


def forget_quality(unlearned_forget_losses: np.ndarray, oracle_forget_losses: np.ndarray) -> float:
    """Two-sample KS p-value: high when the forget losses could come from the retrained model."""
    return float(ks_2samp(unlearned_forget_losses, oracle_forget_losses).pvalue)


def evaluate(model: torch.nn.Module, sets: dict[str, tuple[np.ndarray, np.ndarray]], *,
             forget_classes: Sequence[int] = ()) -> tuple[dict[str, float], dict[str, Predictions]]:
    """Accuracy and loss per set, and how much the model still reveals about the forget set."""
    missing = [name for name in SETS if name not in sets]
    if missing:
        raise KeyError(f"evaluate needs the sets {', '.join(SETS)}; missing {', '.join(missing)}")
    predictions = {name: predict(model, *sets[name]) for name in SETS}
    metrics: dict[str, float] = {}
    for name, p in predictions.items():
        metrics[f"{name}_acc"] = accuracy(p)
        metrics[f"{name}_loss"] = float(p.losses.mean())
    # the test accuracy that unlearning should preserve: forgotten classes are meant to be wrong
    metrics["test_acc_retained"] = accuracy(predictions["test"], exclude_classes=forget_classes)
    metrics["forget_entropy"] = float(predictions["forget"].entropy.mean())
    # test examples were never trained on: they are the non-members the forget set should resemble
    metrics["mia_auc"] = mia_auc(predictions["forget"].losses, predictions["test"].losses)
    return metrics, predictions


def compare_to_oracle(metrics: dict[str, float], forget_losses: np.ndarray,
                      oracle_metrics: dict[str, float], oracle_forget_losses: np.ndarray) -> dict[str, float]:
    ks = ks_2samp(forget_losses, oracle_forget_losses)
    # the KS statistic ranks models where the p-value underflows to 0 (thousands of examples)
    comparison = {"forget_quality": float(ks.pvalue), "forget_ks_stat": float(ks.statistic)}
    for name in GAPS:
        comparison[f"gap_{name}"] = abs(metrics[name] - oracle_metrics[name])
    comparison["avg_gap"] = float(np.mean([comparison[f"gap_{name}"] for name in ACCURACY_GAPS]))
    return comparison


# ---- the comparison table --------------------------------------------------------------------

def comparison_rows(results: dict[str, dict], columns: Sequence[str] = TABLE_COLUMNS) -> list[dict]:
    """One row per model, in the order given, with exactly `columns` (None where missing)."""
    return [{"model": name, **{column: result.get(column) for column in columns[1:]}}
            for name, result in results.items()]


def write_csv(rows: Sequence[dict], path: str | PathLike[str],
              columns: Sequence[str] = TABLE_COLUMNS) -> None:
    """Full-precision values for machines; None becomes an empty cell."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({column: "" if row.get(column) is None else row[column]
                             for column in columns})


def format_cell(column: str, value: Any) -> str:
    """How a value reads in the human tables (markdown and terminal)."""
    if value is None:
        return "–"
    if column in TEXT_COLUMNS:
        return str(value)
    if column.endswith(("_acc", "_acc_retained", "_gap")) or column.startswith(("gap_", "forget_acc_")):
        return f"{100 * value:.1f}"  # percent
    if column == "forget_quality":
        return f"{value:.3g}"  # a p-value: 1e-30 and 0.5 both need to stay readable
    if column == "steps":
        return f"{value:.0f}"
    if column == "wall_s":
        return f"{value:.1f}"
    return f"{value:.3f}"  # losses, entropy, AUC


def _cells(rows: Sequence[dict], columns: Sequence[str], cell: Callable[[str, Any], str]) -> list[list[str]]:
    return [[cell(column, row.get(column)) for column in columns] for row in rows]


def to_markdown(rows: Sequence[dict], columns: Sequence[str] = TABLE_COLUMNS,
                cell: Callable[[str, Any], str] = format_cell, text_columns: Sequence[str] = TEXT_COLUMNS) -> str:
    """A GitHub table; accuracies and gaps in percent."""
    align = ["---" if column in text_columns else "---:" for column in columns]
    lines = [list(columns), align, *[[c.replace("|", r"\|") for c in cells]
                                     for cells in _cells(rows, columns, cell)]]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def to_text(rows: Sequence[dict], columns: Sequence[str] = TABLE_COLUMNS,
            cell: Callable[[str, Any], str] = format_cell, text_columns: Sequence[str] = TEXT_COLUMNS) -> str:
    """The same table in fixed-width columns for a terminal."""
    lines = [list(columns), *_cells(rows, columns, cell)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]

    def render(line: list[str]) -> str:
        return "  ".join(c.ljust(width) if column in text_columns else c.rjust(width)
                         for column, c, width in zip(columns, line, widths))

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(lines[0]), rule, *[render(line) for line in lines[1:]]])
