"""Evaluation metrics on hand-built cases whose answers are known by hand."""

from __future__ import annotations

import csv
import math
from itertools import combinations

import numpy as np
import pytest
import torch

from hamu_ray.pipeline import evaluate as ev
from hamu_ray.pipeline.evaluate import Predictions


def linear(weight: list[list[float]]) -> torch.nn.Linear:
    """x ↦ W x with no bias: the logits are known exactly from the inputs."""
    w = torch.tensor(weight, dtype=torch.float32)
    model = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        model.weight.copy_(w)
    return model


# ---- predict ---------------------------------------------------------------------------------

# Identity logits = x, two classes: the margin m = x[y] − x[1−y] fixes everything.
X2 = np.array([[2, 0], [0, 3], [1, -1], [0.5, 0], [-4, 4]], dtype=np.float32)
Y2 = np.array([0, 1, 1, 0, 0])
MARGINS = np.array([2.0, 3.0, -2.0, 0.5, -8.0])


def test_predict_losses_correctness_and_entropy_in_closed_form():
    p = ev.predict(linear([[1, 0], [0, 1]]), X2, Y2)
    np.testing.assert_allclose(p.losses, np.log1p(np.exp(-MARGINS)), rtol=1e-6)
    np.testing.assert_array_equal(p.correct, MARGINS > 0)
    q = 1 / (1 + np.exp(-MARGINS))  # probability of the label
    np.testing.assert_allclose(p.entropy, -(q * np.log(q) + (1 - q) * np.log(1 - q)), rtol=1e-5)
    np.testing.assert_array_equal(p.labels, Y2)
    assert (p.losses.dtype, p.correct.dtype, p.entropy.dtype, p.labels.dtype) == (
        np.float64, np.bool_, np.float64, np.int64)


def test_predict_entropy_extremes():
    x = np.array([[0, 0, 0], [50, 0, 0]], dtype=np.float32)
    p = ev.predict(linear(np.eye(3).tolist()), x, np.array([0, 0]))
    assert p.entropy[0] == pytest.approx(math.log(3), rel=1e-6)  # uniform softmax
    assert 0 <= p.entropy[1] < 1e-12  # all mass on one class (and no NaN from 0·log 0)


def test_predict_accepts_tensors_and_batches_give_the_same_result():
    model = linear([[1, 0], [0, 1]])
    whole = ev.predict(model, X2, Y2)
    batched = ev.predict(model, torch.from_numpy(X2), torch.from_numpy(Y2), batch_size=2)  # 2+2+1
    for field in ("losses", "correct", "entropy", "labels"):
        np.testing.assert_allclose(getattr(batched, field), getattr(whole, field), rtol=1e-7)


def test_predict_runs_in_eval_mode_and_restores_each_modules_mode():
    model = torch.nn.Sequential(linear([[1, 0], [0, 1]]), torch.nn.Dropout(p=0.9))
    model.train()
    first, second = ev.predict(model, X2, Y2), ev.predict(model, X2, Y2)
    np.testing.assert_allclose(first.losses, np.log1p(np.exp(-MARGINS)), rtol=1e-6)  # no dropout
    np.testing.assert_array_equal(first.losses, second.losses)
    assert model.training and model[1].training
    model[0].eval()  # mixed modes come back as they were, not all set to the parent's
    ev.predict(model, X2, Y2)
    assert [model.training, model[0].training, model[1].training] == [True, False, True]
    model.eval()
    ev.predict(model, X2, Y2)
    assert not any(m.training for m in model.modules())


def test_predict_rejects_mismatched_rows():
    with pytest.raises(ValueError, match="5 rows but y has 4"):
        ev.predict(linear([[1, 0], [0, 1]]), X2, Y2[:4])


# ---- accuracy, membership inference, forget quality ------------------------------------------

def test_accuracy_with_excluded_classes():
    p = Predictions(losses=np.zeros(5), entropy=np.zeros(5), labels=np.array([0, 0, 1, 2, 2]),
                    correct=np.array([True, False, True, True, False]))
    assert ev.accuracy(p) == pytest.approx(3 / 5)
    assert ev.accuracy(p, exclude_classes=[2]) == pytest.approx(2 / 3)  # rows 0, 1, 2
    assert ev.accuracy(p, exclude_classes=[0, 1]) == pytest.approx(1 / 2)  # rows 3, 4
    with pytest.raises(ValueError, match="no examples left"):
        ev.accuracy(p, exclude_classes=[0, 1, 2])
    with pytest.raises(ValueError):
        ev.accuracy(Predictions(*(np.zeros(0),) * 4))


def test_mia_auc_extremes_and_chance():
    assert ev.mia_auc([0.1, 0.2, 0.3], [1.0, 2.0]) == 1.0  # members all lower: all identified
    assert ev.mia_auc([1.0, 2.0], [0.1, 0.2, 0.3]) == 0.0
    assert ev.mia_auc([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 0.5  # 3 wins + 3 ties·½ of 9 pairs


def test_mia_auc_counts_ties_as_half():
    # pairs (member, non-member): (1,2) win, (1,3) win, (2,2) tie ½, (2,3) win → 3.5 / 4
    assert ev.mia_auc(np.array([1.0, 2.0]), np.array([2.0, 3.0])) == pytest.approx(0.875)


def test_mia_auc_needs_both_groups():
    with pytest.raises(ValueError, match="members"):
        ev.mia_auc([], [1.0])


def ks_permutation_p_value(a: list[float], b: list[float]) -> float:
    """Exact two-sample KS p-value by definition: the share of all ways to split the pooled
    values into groups of len(a) and len(b) whose largest ECDF gap is at least the observed one."""
    def gap(u: np.ndarray, v: np.ndarray) -> float:
        grid = np.concatenate([u, v])
        return max(abs((u <= t).mean() - (v <= t).mean()) for t in grid)

    pool = np.array(a + b)
    observed = gap(np.array(a), np.array(b))
    splits = [gap(pool[list(i)], np.delete(pool, list(i))) for i in combinations(range(len(pool)), len(a))]
    return float(np.mean([d >= observed - 1e-12 for d in splits]))


def test_forget_quality_identical_and_separated():
    losses = np.array([0.3, 1.2, 0.7, 2.5])
    assert ev.forget_quality(losses, losses.copy()) == 1.0
    assert ev.forget_quality(np.zeros(50), np.ones(50)) < 1e-10


def test_ks_statistic_still_ranks_when_p_underflows():
    oracle = np.linspace(0, 1, 6000)
    near, far = ev.compare_to_oracle(*_metrics_for(oracle + 0.5), oracle), ev.compare_to_oracle(
        *_metrics_for(oracle + 0.9), oracle)
    assert near["forget_quality"] == far["forget_quality"] == 0.0  # both underflow
    assert near["forget_ks_stat"] == pytest.approx(0.5, abs=1e-3)
    assert far["forget_ks_stat"] == pytest.approx(0.9, abs=1e-3)


def _metrics_for(forget_losses):
    metrics = {name: 0.5 for name in ("forget_acc", "retain_acc", "test_acc", "test_acc_retained", "mia_auc")}
    return metrics, forget_losses, metrics


def test_forget_quality_known_p_values():
    # fully separated 3 vs 3: only 2 of the C(6,3) = 20 splits reach D = 1
    assert ev.forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx(2 / 20)
    # interleaved: D = 1/3 is the smallest gap any split of six distinct values can have
    assert ev.forget_quality([1, 2, 3], [1.5, 2.5, 3.5]) == pytest.approx(1.0)
    # D = 2/3 here; 12 of the 20 splits reach it
    assert ks_permutation_p_value([1, 2, 5], [3, 4, 6]) == pytest.approx(12 / 20)
    assert ev.forget_quality([1, 2, 5], [3, 4, 6]) == pytest.approx(12 / 20)


# ---- evaluate and compare_to_oracle ----------------------------------------------------------

def one_hot(classes: list[int]) -> np.ndarray:
    return np.eye(3, dtype=np.float32)[classes]


# Logits 5·one_hot(predicted class): a correct row costs log(1 + 2e⁻⁵), a wrong one 5 more.
RIGHT = math.log1p(2 * math.exp(-5))
WRONG = RIGHT + 5
SETS = {  # (inputs = one-hot of the predicted class, labels)
    "forget": (one_hot([2, 2, 0, 2]), np.array([2, 2, 2, 2])),  # 3 of 4 right
    "retain": (one_hot([0, 1, 0, 1]), np.array([0, 1, 0, 1])),  # all right
    "test": (one_hot([0, 0, 2, 1, 0]), np.array([0, 1, 2, 2, 0])),  # rows 0, 2, 4 right
}


def test_evaluate_on_a_hand_built_three_class_problem():
    metrics, predictions = ev.evaluate(linear((5 * np.eye(3)).tolist()), SETS, forget_classes=[2])
    assert set(predictions) == {"forget", "retain", "test"}
    expected = {
        "forget_acc": 3 / 4, "retain_acc": 1.0, "test_acc": 3 / 5,
        "test_acc_retained": 2 / 3,  # without class 2: rows 0, 1, 4 of test, 0 and 4 right
        "forget_loss": (3 * RIGHT + WRONG) / 4, "retain_loss": RIGHT, "test_loss": (3 * RIGHT + 2 * WRONG) / 5,
        # members (forget): 3 RIGHT, 1 WRONG; non-members (test): 3 RIGHT, 2 WRONG. Of the 20 pairs,
        # each RIGHT member ties 3 and beats 2 (3.5), the WRONG member ties 2 (1): 11.5 / 20
        "mia_auc": 11.5 / 20,
    }
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, rel=1e-5), name
    top, other = math.exp(5) / (math.exp(5) + 2), 1 / (math.exp(5) + 2)
    assert metrics["forget_entropy"] == pytest.approx(-(top * math.log(top) + 2 * other * math.log(other)), rel=1e-5)
    assert all(type(v) is float for v in metrics.values())
    np.testing.assert_allclose(predictions["forget"].losses, [RIGHT, RIGHT, WRONG, RIGHT], rtol=1e-5)


def test_evaluate_without_forget_classes_keeps_all_of_test():
    metrics, _ = ev.evaluate(linear((5 * np.eye(3)).tolist()), SETS)
    assert metrics["test_acc_retained"] == metrics["test_acc"] == pytest.approx(3 / 5)


def test_evaluate_names_a_missing_set():
    with pytest.raises(KeyError, match="missing test"):
        ev.evaluate(linear(np.eye(3).tolist()), {k: SETS[k] for k in ("forget", "retain")})


def test_compare_to_oracle_gaps_by_hand():
    metrics = {"forget_acc": 0.20, "retain_acc": 0.90, "test_acc": 0.80, "test_acc_retained": 0.85, "mia_auc": 0.60}
    oracle = {"forget_acc": 0.00, "retain_acc": 0.95, "test_acc": 0.82, "test_acc_retained": 0.86, "mia_auc": 0.50}
    out = ev.compare_to_oracle(metrics, np.array([1.0, 2.0, 5.0]), oracle, np.array([3.0, 4.0, 6.0]))
    expected = {"gap_forget_acc": 0.20, "gap_retain_acc": 0.05, "gap_test_acc": 0.02,
                "gap_test_acc_retained": 0.01, "gap_mia_auc": 0.10,
                "avg_gap": (0.20 + 0.05 + 0.02) / 3, "forget_quality": 12 / 20,
                "forget_ks_stat": 2 / 3}  # {1,2,5} vs {3,4,6}: the CDFs differ by 2/3 at 2
    assert set(out) == set(expected)
    for name, value in expected.items():
        assert out[name] == pytest.approx(value), name
    same = ev.compare_to_oracle(oracle, np.array([1.0, 2.0]), oracle, np.array([1.0, 2.0]))
    assert same["forget_quality"] == 1.0 and same["avg_gap"] == 0.0


# ---- the comparison table --------------------------------------------------------------------

RESULTS = {
    "original": {"forget_acc": 0.9312, "retain_acc": 0.95, "test_acc": 0.9, "test_acc_retained": 0.91,
                 "forget_loss": 0.12345, "forget_entropy": 0.2, "mia_auc": 0.75, "forget_quality": 1.234e-30,
                 "avg_gap": 0.30149, "steps": 120, "stop": "epochs", "wall_s": 12.34,
                 "gap_mia_auc": 0.25},  # not a table column: left out
    "oracle": {"forget_acc": 0.0, "forget_quality": 1.0},
}


def test_comparison_rows_keep_order_and_columns():
    rows = ev.comparison_rows(RESULTS)
    assert [row["model"] for row in rows] == ["original", "oracle"]
    assert all(list(row) == list(ev.TABLE_COLUMNS) for row in rows)
    assert rows[0]["steps"] == 120 and rows[1]["retain_acc"] is None and rows[1]["stop"] is None


def test_markdown_formats_percent_decimals_and_missing():
    lines = ev.to_markdown(ev.comparison_rows(RESULTS)).splitlines()
    assert len(lines) == 4
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells[0] == list(ev.TABLE_COLUMNS)
    assert cells[1][0] == "---" and cells[1][1] == "---:"
    original, oracle = (dict(zip(ev.TABLE_COLUMNS, row)) for row in cells[2:])
    assert original == {"model": "original", "forget_acc": "93.1", "retain_acc": "95.0", "test_acc": "90.0",
                        "test_acc_retained": "91.0", "forget_loss": "0.123", "forget_entropy": "0.200",
                        "mia_auc": "0.750", "forget_quality": "1.23e-30", "avg_gap": "30.1",
                        "steps": "120", "stop": "epochs", "wall_s": "12.3"}
    assert oracle["forget_acc"] == "0.0" and oracle["forget_quality"] == "1"
    assert oracle["retain_acc"] == oracle["steps"] == oracle["stop"] == "–"


def test_text_table_is_aligned_with_the_same_cells():
    rows = ev.comparison_rows(RESULTS)
    lines = ev.to_text(rows).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1  # fixed width
    assert lines[0].split() == list(ev.TABLE_COLUMNS) and set(lines[1]) == {"-", " "}
    markdown = ev.to_markdown(rows).splitlines()
    for text_line, md_line in zip(lines[2:], markdown[2:]):
        assert text_line.split() == [c.strip() for c in md_line.strip("|").split("|")]
    # numbers right-aligned: each value ends where its header ends
    header_end = lines[0].index("forget_acc") + len("forget_acc")
    assert lines[2][:header_end].endswith("93.1") and lines[3][:header_end].endswith("0.0")


def test_csv_round_trip(tmp_path):
    path = tmp_path / "comparison.csv"
    ev.write_csv(ev.comparison_rows(RESULTS), path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        read = list(reader)
    assert reader.fieldnames == list(ev.TABLE_COLUMNS)
    assert [row["model"] for row in read] == ["original", "oracle"]
    assert float(read[0]["forget_acc"]) == 0.9312 and float(read[0]["forget_quality"]) == 1.234e-30
    assert read[0]["steps"] == "120" and read[0]["stop"] == "epochs"
    assert read[1]["retain_acc"] == "" and read[1]["stop"] == ""
