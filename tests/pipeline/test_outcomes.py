"""How the comparison says what its numbers cannot: a method that diverged or took no step, an
original whose retain truth score is ~0, a forget-quality test without power; `run --strict`.
Rows are the comparison's own (evaluate.comparison_rows, lm_evaluate.model_metrics), step logs
as the worker writes them. No Ray here (the divergence through a real run: test_pipeline.py)."""

from __future__ import annotations

import pickle
import warnings

import numpy as np
import pytest

from hamu_ray.pipeline import evaluate, lm_evaluate, lm_metrics, outcomes
from hamu_ray.rules import NonFiniteStatsError

COLUMNS = evaluate.TABLE_COLUMNS


def classifier_rows(**stops) -> list[dict]:
    """The comparison's rows for the references and the methods given (label → stop)."""
    results = {"original": {"forget_acc": 0.99, "test_acc_retained": 0.97, "forget_quality": 1e-9,
                            "steps": 250, "stop": "none", "wall_s": 9.0},
               "oracle": {"forget_acc": 0.0, "test_acc_retained": 0.96, "forget_quality": 1.0,
                          "steps": 200, "stop": "none", "wall_s": 8.0}}
    for label, stop in stops.items():
        results[label] = {"forget_acc": 0.5, "test_acc_retained": 0.9, "forget_quality": 1e-3,
                          "steps": 1 if stop != "none" else 30, "stop": stop, "wall_s": 2.0}
    return evaluate.comparison_rows(results)


def rule_step(step: int, stop: str = "none") -> dict:
    return {"step": step, "loss/retain": 0.1, "loss/forget": 0.2, "guarantee/B": 0.05, "stop": stop}


# ---- steps taken ---------------------------------------------------------------------------

@pytest.mark.parametrize("log, taken, cell", [
    ([rule_step(1, "infeasible")], 0, "took no step: infeasible at step 1"),
    ([rule_step(1, "criterion")], 0, "took no step: criterion at step 1"),
    ([{"step": 0, "stop": "forget_target", "monitor/forget_prob": 0.01}], 0, "took no step: forget_target at step 0"),
    ([{"step": 0, "stop": "none"}, rule_step(1), rule_step(2, "infeasible")], 1, None),
    ([rule_step(1), rule_step(2), rule_step(3, "criterion")], 2, None),
    ([rule_step(1), {**rule_step(2), "stop": "forget_target"}], 2, None),  # the monitor stops after a step
    ([rule_step(s) for s in range(1, 31)], 30, None),
])
def test_a_step_its_rule_stopped_at_is_not_taken(log, taken, cell):
    assert outcomes.steps_taken(log) == taken
    assert outcomes.no_step_stop(log[-1]["stop"], log) == cell


# one row of each kind, as the worker writes them, and whether it is a step taken
ROWS_TAKEN = [
    ({"step": 0, "stop": "none", "monitor/forget_prob": 0.5}, False),  # the monitor's starting point
    ({"step": 0, "stop": "forget_target", "monitor/forget_prob": 0.01}, False),  # target met before a step
    (rule_step(1), True),
    (rule_step(2, "forget_target"), True),  # the monitor stopped the run after this step
    (rule_step(3, "trust_region"), True),  # the trust region stopped it after this step
    (rule_step(4, "infeasible"), False),  # the rule stopped instead of stepping
    (rule_step(5, "criterion"), False),
    ({"step": 6, "stop": "none", "loss/retain": 0.1}, True),  # a method without a guarantee (gdiff)
]


def test_the_receipt_and_the_table_count_steps_taken_by_one_definition():
    from hamu_ray import receipt
    from hamu_ray.rules import took_step

    rows = [row for row, _ in ROWS_TAKEN]
    assert [took_step(row) for row in rows] == [taken for _, taken in ROWS_TAKEN]
    assert outcomes.steps_taken(rows) == 4
    guaranteed = [{**row, "guarantee/forget_gain": 0.05, "guarantee/retain_change": 0.01} if "guarantee/B" in row
                  else row for row in rows]
    assert receipt.guarantee_record(guaranteed, "hamu-q")["steps"] == 3  # the rows with a B among those taken


# ---- the table -----------------------------------------------------------------------------

def test_a_diverged_method_has_its_row_naming_the_step_and_the_others_are_kept():
    rows = classifier_rows(**{"hamu-q": "none"})  # ga diverged: the comparison measured no model of it
    failed = outcomes.Diverged("ga", 3, "step 3: non-finite loss (forget_loss = nan): the run diverged")
    table = outcomes.table_rows(rows, {"hamu-q": [rule_step(s) for s in range(1, 31)]}, [failed],
                                ["original", "oracle", "ga", "hamu-q"], COLUMNS)
    assert [row["model"] for row in table] == ["original", "oracle", "ga", "hamu-q"]  # the configured order
    ga = table[2]
    assert list(ga) == list(COLUMNS)
    assert ga["stop"] == "diverged: NaN/Inf at step 3"
    assert all(ga[c] is None for c in COLUMNS if c not in ("model", "stop"))
    assert table[3] == rows[2] and table[:2] == rows[:2]  # the finished ones untouched
    text = evaluate.to_text(table)
    ga_line = next(line for line in text.splitlines() if line.startswith("ga "))
    assert "diverged: NaN/Inf at step 3" in ga_line and "–" in ga_line
    assert outcomes.failed_methods(table) == {"ga": "diverged: NaN/Inf at step 3"}


def test_a_method_that_took_no_step_is_marked_in_its_row():
    rows = classifier_rows(**{"hamu-q": "infeasible", "gdiff": "none"})
    logs = {"hamu-q": [rule_step(1, "infeasible")], "gdiff": [rule_step(1), rule_step(2)]}
    table = outcomes.table_rows(rows, logs, [], ["original", "oracle", "hamu-q", "gdiff"], COLUMNS)
    stops = {row["model"]: row["stop"] for row in table}
    assert stops == {"original": "none", "oracle": "none", "hamu-q": "took no step: infeasible at step 1",
                     "gdiff": "none"}
    assert {k: v for k, v in table[2].items() if k != "stop"} == {k: v for k, v in rows[2].items() if k != "stop"}
    assert outcomes.failed_methods(table) == {"hamu-q": "took no step: infeasible at step 1"}


def test_the_notes_and_the_last_line_name_the_failed_methods():
    rows = classifier_rows(**{"hamu-q": "infeasible", "gdiff": "none"})
    table = outcomes.table_rows(rows, {"hamu-q": [rule_step(1, "infeasible")], "gdiff": [rule_step(1)]},
                                [outcomes.Diverged("ga", 2, "…")], ["original", "oracle", "ga", "hamu-q", "gdiff"],
                                COLUMNS)
    notes = outcomes.notes(table)
    assert len(notes) == 2
    assert notes[0].startswith("ga diverged (NaN/Inf at step 2): it has no model")
    assert notes[1].startswith("hamu-q took no step (infeasible at step 1): no step inside the radius "
                               "could gain the constraint B")
    assert "its exported model is the original's" in notes[1]
    assert outcomes.summary_line(table) == ("warning: 1 method diverged (ga); 1 method took no step (hamu-q); "
                                            "`hamu-ray run --strict` exits 1 on this")
    fine = classifier_rows(gdiff="none")
    assert outcomes.notes(fine) == [] and outcomes.summary_line(fine) is None


# ---- validity of the measurements ------------------------------------------------------------

def lm_scores(rng, *, perturbed_shift: float, forget_rows: int = 40) -> dict:
    """Per-example scores as score_model returns them: every answer's log-prob and count, and
    the truth ratio's inputs; `perturbed_shift`: how much likelier (in mean log-prob) the
    perturbed answers are than the paraphrase."""
    def one_set(n):
        para = rng.normal(-1.0, 0.2, n)
        return {"logprob": rng.normal(-3.0, 0.5, n), "count": np.full(n, 6.0), "min_k": rng.normal(-2, 1, n),
                "rouge": rng.uniform(0.5, 1.0, n), "paraphrased_logp": para,
                "perturbed_logp": para[:, None] + perturbed_shift + rng.normal(0, 0.1, (n, 3))}
    return {"forget": one_set(forget_rows), "retain": one_set(40), "holdout": one_set(20)}


def test_perturbed_answers_worded_like_the_answer_are_said_so_not_a_numpy_warning():
    """The measured case: perturbed answers worded like the (trained) answer are likelier than
    the paraphrase for the original, so its retain truth score is 0 and every model's utility
    with it; the note names the likely cause, and no RuntimeWarning is all the user sees."""
    rng = np.random.default_rng(0)
    original, oracle = lm_scores(rng, perturbed_shift=+1.5), lm_scores(rng, perturbed_shift=+1.5)
    oracle["forget"]["perturbed_logp"][0] = -800.0  # a collapsed score: R underflows to 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = [{"model": name, **lm_evaluate.model_metrics(scores, oracle), "stop": "none"}
                for name, scores in (("original", original), ("oracle", oracle))]
    assert rows[0]["retain_truth"] == 0.0 and rows[0]["model_utility"] == 0.0
    [note] = [n for n in outcomes.notes(rows) if "retain truth" in n]
    assert note.startswith("the original's retain truth score is 0.000 (below 0.05)")
    assert "perturbed answers are probably not worded like the paraphrase" in note

    good = lm_scores(np.random.default_rng(1), perturbed_shift=-1.5)  # false answers unlikelier
    row = {"model": "original", **lm_evaluate.model_metrics(good, oracle), "stop": "none"}
    assert row["retain_truth"] > 0.7 and not [n for n in outcomes.notes([row]) if "retain truth" in n]


def test_a_forget_quality_the_original_itself_passes_is_said_to_have_no_power():
    rng = np.random.default_rng(2)
    oracle = lm_scores(rng, perturbed_shift=-0.5, forget_rows=5)
    original = lm_scores(rng, perturbed_shift=-0.55, forget_rows=5)  # 5 rows: the KS test cannot tell
    row = {"model": "original", **lm_evaluate.model_metrics(original, oracle), "stop": "none"}
    assert row["forget_quality"] >= 0.05
    [note] = [n for n in outcomes.notes([row]) if "forget quality" in n]
    assert note.startswith(f"forget quality has no power here: the original itself scores {row['forget_quality']:.3g}")
    assert not [n for n in outcomes.notes(classifier_rows()) if "forget quality" in n]  # original 1e-9


def test_the_verdict_says_the_test_has_no_power_when_the_original_passes_it():
    from hamu_ray.pipeline.registry import evaluation_verdict

    def judged(quality, original_quality):
        model = {"forget_prob": 0.01, "model_utility": 0.5, "forget_quality": quality}
        return evaluation_verdict(True, {
            "model": model, "original": {**model, "forget_prob": 0.9, "forget_quality": original_quality},
            "oracle": {**model, "forget_quality": 1.0}})

    verdict = judged(0.0539, 0.0539)
    assert ("Forget quality 0.0539: the test has no power here: the original itself scores FQ 0.0539"
            in verdict) and "cannot be told apart" not in verdict
    assert "cannot be told apart from the oracle" in judged(0.3, 0.049)
    assert "can still be told apart" in judged(0.01, 1e-5)


def test_the_receipt_names_what_each_attack_brought_back_beside_the_oracles_floor():
    from hamu_ray.pipeline.registry import attack_record, attack_verdict

    row = {"forget_prob": 0.1, "forget_prob_int4": 0.12, "recovered_prob_int4": 0.025,
           "forget_prob_relearn": 0.5, "recovered_prob_relearn": 0.5, "recovered_prob_relearn_sd": 0.1}
    oracle = {"recovered_prob_int4": 0.0, "recovered_prob_relearn": 0.03}
    record = attack_record(row, oracle, "prob")
    assert record == {"int4": {"forget_prob": 0.12, "recovered_prob": 0.025, "oracle_recovered_prob": 0.0},
                      "relearn": {"forget_prob": 0.5, "recovered_prob": 0.5, "oracle_recovered_prob": 0.03}}
    verdict = attack_verdict(record, "prob")
    assert verdict.endswith("int4 0.03 (oracle 0.00); relearn 0.50 (oracle 0.03).")
    assert attack_verdict(attack_record(row, None, "prob"), "prob").endswith("int4 0.03; relearn 0.50.")
    assert attack_record({"forget_prob": 0.1}, oracle, "prob") == {} and attack_verdict({}, "prob") == ""
    classifier = attack_record({"forget_acc_int8": 0.2, "recovered_acc_int8": None}, {"recovered_acc_int8": 0.0}, "acc")
    assert classifier == {"int8": {"forget_acc": 0.2, "recovered_acc": None, "oracle_recovered_acc": 0.0}}
    said = attack_verdict(classifier, "acc")
    assert "(forget accuracy; 0 none" in said and said.endswith("int8 – (oracle 0.00).")


def test_truth_ratio_scores_of_a_collapsed_model_raise_no_numpy_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lm_metrics.truth_ratio_forget_score(np.array([0.0, 0.5, np.inf])) == pytest.approx(0.5 / 3)
        assert lm_metrics.model_utility([1e-310, 0.5]) == pytest.approx(0.0, abs=1e-300)


# ---- the step a run diverged at reaches the driver -------------------------------------------

def test_the_step_survives_pickling_and_rays_wrapping():
    """A worker's error reaches the driver pickled, inside Ray's RayTaskError (a class of both)
    and Ray Train's WorkerGroupError: worker_user_error gives back the worker's message and step."""
    import ray.exceptions
    import ray.train

    from hamu_ray.engine.driver import worker_user_error

    raised = NonFiniteStatsError("non-finite loss (forget_loss = nan): the run diverged").at_step(7)
    assert (str(raised), raised.step) == ("step 7: non-finite loss (forget_loss = nan): the run diverged", 7)
    copy = pickle.loads(pickle.dumps(raised))
    assert (str(copy), copy.step) == (str(raised), 7)
    sent = pickle.loads(pickle.dumps(ray.exceptions.RayTaskError("train_fn", "Traceback …", raised)))
    group = ray.train.WorkerGroupError("a worker failed", {0: sent.as_instanceof_cause()})
    found = worker_user_error(group)
    assert type(found) is NonFiniteStatsError and (str(found), found.step) == (str(raised), 7)


# ---- run --strict ---------------------------------------------------------------------------

def test_run_exits_1_under_strict_only(monkeypatch, capsys):
    import types

    from hamu_ray import cli
    from tests.test_cli import PIPELINE, fake_module

    table = outcomes.table_rows(classifier_rows(**{"hamu-q": "infeasible"}), {"hamu-q": [rule_step(1, "infeasible")]},
                                [outcomes.Diverged("ga", 4, "…")], ["original", "oracle", "ga", "hamu-q"], COLUMNS)
    result = types.SimpleNamespace(failed=outcomes.failed_methods(table))
    fake_module(monkeypatch, "hamu_ray.pipeline.stages", run_pipeline=lambda cfg: result)
    assert cli.main(["run", str(PIPELINE)]) == 0
    assert cli.main(["run", str(PIPELINE), "--strict"]) == 1
    assert capsys.readouterr().err.strip() == ("hamu-ray: --strict: ga: diverged: NaN/Inf at step 4; "
                                               "hamu-q: took no step: infeasible at step 1")
    result.failed = {}
    assert cli.main(["run", str(PIPELINE), "--strict"]) == 0
