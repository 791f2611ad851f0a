"""The threshold search: its config, the choice under the utility floor, the Pareto front, and a
real 2-trial search of the digits pipeline (real local Ray Tune + Train, DeepSpeed, sqlite
MLflow) that is interrupted with SIGINT after its first trial and resumed."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from hamu_ray.engine.config import parse_config
from hamu_ray.schema import ConfigError
from hamu_ray.pipeline.config import PipelineConfig
from hamu_ray.pipeline.plots import pareto_front
from hamu_ray.pipeline.tune import JOURNAL, choose, max_reports, TrialContext

ROOT = Path(__file__).parents[2]
DIGITS = ROOT / "pipelines" / "digits.yaml"


def digits_raw(**tune) -> dict:
    raw = yaml.safe_load(DIGITS.read_text())
    raw["tune"] = {**raw["tune"], **tune}
    return raw


def config(raw: dict) -> PipelineConfig:
    return parse_config(raw, source="digits.yaml", schema=PipelineConfig)


# ---- configuration ----------------------------------------------------------------------------

@pytest.mark.parametrize("tune, expected", [
    ({"method": "nope"}, "tune.method: 'nope' is not a label in methods"),
    ({"method": "gdiff"}, "constraint_ratio, radius cannot be searched for gdiff; valid: lr"),
    ({"space": {"epsilon": {"low": 0, "high": 1}}}, "epsilon cannot be searched for hamu-q"),
    ({"space": {"radius": {"values": ["wide"]}}}, "tune.space.radius: 'wide' is not valid"),
    ({"space": {"constraint_ratio": {"low": -1, "high": 1}}}, "tune.space.constraint_ratio: -1"),
    ({"space": {"constraint_ratio": {"low": 1, "high": 0.5}}}, "a range needs low < high"),
    ({"space": {"lr": {"low": 0, "high": 1, "log": True}}}, "a log range needs low > 0"),
    ({"space": {"constraint_ratio": {"preflight": True}, "radius": {"values": [0.1]}}},
     "do not search lr or radius with it"),
    ({"space": {"constraint_ratio": {"preflight": True, "low": 0.1}}}, "give no low, high or values"),
    ({"space": {"constraint_ratio": {"low": 0.1, "high": 1}, "lr": {"preflight": True}}},
     "tune.space.lr: preflight: true is for constraint_ratio only"),
    ({"space": {"lr": {"low": 0.01, "high": 0.1}}}, "tune.space.lr: every trial of hamu-q would take the same steps"),
    ({"space": {"lr": {"low": 0.01, "high": 0.1}, "radius": {"values": [0.1, 0.3]}}}, "search radius"),
    ({"utility_floor": -1}, "tune.utility_floor"),
    ({"rank": "matched"}, "tune.rank: matched ranks the trials that reached the monitor's forget target; "
                          "set monitor.stop_at"),
    ({"rank": "best"}, "tune.rank"),
])
def test_search_config_errors_name_the_field(tune, expected):
    with pytest.raises(ConfigError) as err:
        config(digits_raw(**tune))
    assert "digits.yaml" in str(err.value) and expected in str(err.value)


@pytest.mark.parametrize("space, hparams, optimizer", [
    ({"lr": {"low": 0.01, "high": 0.1}, "radius": {"values": ["lr", 0.1]}}, {}, "SGD"),  # an lr radius
    ({"lr": {"low": 0.01, "high": 0.1}}, {"radius": "lr"}, "SGD"),
    ({"lr": {"low": 0.01, "high": 0.1}, "constraint_ratio": {"low": 0.2, "high": 0.8}}, {}, "SGD"),  # B = ratio·lr
    ({"lr": {"low": 0.01, "high": 0.1}}, {}, "AdamW"),  # its state makes lr matter
])
def test_a_searched_lr_that_hamus_step_depends_on_is_accepted(space, hparams, optimizer):
    raw = digits_raw(space=space)
    raw["methods"][0]["hparams"].update(hparams)
    raw["unlearn"]["optimizer"] = optimizer
    assert set(config(raw).tune.space) == set(space)


def test_a_hamu_step_at_a_fixed_radius_is_the_same_whatever_the_lr():
    """Why a searched lr is refused there: the rule's coefficients times lr (plain SGD's Δ) agree."""
    import torch
    from hamu_ray.rules.hamu import HamuParams, hamu_q
    from hamu_ray.rules.stats import BlockStats

    stats = BlockStats(rr=torch.tensor([4.0, 1.0]), ff=torch.tensor([2.0, 3.0]), rf=torch.tensor([1.0, -0.5]))
    for params in (HamuParams(constraint=0.3, radius=0.5), HamuParams(constraint=0.5, radius=0.5,
                                                                      constraint_unit="damage_free")):
        steps = [(lr * hamu_q(stats, lr, params).retain_coef, lr * hamu_q(stats, lr, params).forget_coef)
                 for lr in (0.01, 0.3)]
        torch.testing.assert_close(steps[0], steps[1])


def test_a_trial_sets_hamus_constraint_as_a_ratio_of_its_lr():
    cfg = config(digits_raw())
    entry = cfg.method_entry("hamu-q")
    method, train = cfg.trial_settings(entry, {"constraint_ratio": 0.5, "radius": 0.2})
    assert train.lr == 0.1 and method.hparams == {"constraint": pytest.approx(0.05), "radius": 0.2}
    method, train = cfg.trial_settings(entry, {"constraint_ratio": 0.5, "lr": 0.02, "radius": "lr"})
    assert train.lr == 0.02 and method.hparams["constraint"] == pytest.approx(0.01)
    assert method.hparams["radius"] == "lr" and train.max_steps == 30  # the rest is the entry's


def test_a_preflight_range_runs_from_inside_the_damage_free_b_to_the_largest_feasible():
    from hamu_ray.pipeline.tune import preflight_range

    # B / lr: a quarter of the damage-free 0.08 to the feasible 0.2, at lr 0.1
    assert preflight_range({"max_constraint_without_damage": 0.08, "max_feasible_constraint": 0.2}, 0.1) \
        == pytest.approx((0.2, 2.0))
    # every block fully conflicting (no damage-free B): from a hundredth of the feasible B
    assert preflight_range({"max_constraint_without_damage": 0.0, "max_feasible_constraint": 0.2}, 0.1) \
        == pytest.approx((0.02, 2.0))
    with pytest.raises(ValueError, match="finds no forget gain reachable"):
        preflight_range({"max_constraint_without_damage": 0.0, "max_feasible_constraint": 0.0}, 0.1)


def test_surgery_searches_epsilon():
    raw = digits_raw(method="surgery", space={"epsilon": {"low": -0.1, "high": 0.1}})
    raw["methods"].append({"name": "surgery", "hparams": {"epsilon": 0.0}})
    cfg = config(raw)
    method, _ = cfg.trial_settings(cfg.method_entry("surgery"), {"epsilon": 0.05})
    assert method.name == "surgery" and method.hparams == {"epsilon": 0.05}


def test_asha_horizon_is_the_step_reports_plus_the_evaluation():
    cfg = config(digits_raw())  # 30 steps, a report every 10
    context = TrialContext(cfg.model_dump(by_alias=True), {}, "", "", "", ruler=None)
    assert max_reports(context) == 4


def test_asha_horizon_counts_the_searched_methods_own_steps_and_reports():
    raw = digits_raw()
    raw["methods"][0]["train"] = {"max_steps": 45, "progress_every": 4}  # the unlearn section: 30, 10
    cfg = PipelineConfig.model_validate(raw)
    context = TrialContext(cfg.model_dump(by_alias=True), {}, "", "", "", ruler=None)
    assert max_reports(context) == 12 + 1  # ceil(45 / 4) step reports, then the evaluation


# ---- the choice and the front -------------------------------------------------------------------

def trial(name, status, quality, utility, ks_stat=0.5):
    return {"trial": name, "status": status, "params": {"constraint_ratio": 0.5},
            "metrics": {"forget_quality": quality, "forget_ks_stat": ks_stat,
                        "test_acc_retained": utility, "steps": 30,
                        "stop": "none", "forget_acc": 0.1, "mia_auc": 0.5}}


def test_the_choice_is_the_best_forget_quality_above_the_floor():
    results = [trial("a", "finished", 0.9, 0.90),  # best quality, but 5 points below the original
               trial("b", "finished", 0.4, 0.94),
               trial("c", "finished", 0.4, 0.95),  # ties b on quality, keeps more utility
               trial("d", "stopped early", 0.99, 0.99),  # never evaluated: not a candidate
               trial("e", "finished", 0.1, 0.96)]
    rows, chosen = choose(results, original_utility=0.95, floor_points=2.0)
    assert chosen["trial"] == "c"
    assert [row["feasible"] for row in rows] == [False, True, True, False, True]
    assert [row["chosen"] for row in rows] == [False, False, True, False, False]


def test_underflowed_p_values_are_ranked_by_the_ks_statistic():
    results = [trial("far", "finished", 0.0, 0.96, ks_stat=0.9),
               trial("near", "finished", 0.0, 0.94, ks_stat=0.4)]
    _, chosen = choose(results, original_utility=0.95, floor_points=2.0)
    assert chosen["trial"] == "near"


def test_no_choice_when_every_trial_breaks_the_floor():
    rows, chosen = choose([trial("a", "finished", 0.9, 0.5)], original_utility=0.95, floor_points=2.0)
    assert chosen is None and not rows[0]["feasible"]


def test_a_language_model_search_ranks_by_forget_quality_above_a_model_utility_floor():
    from hamu_ray.pipeline.tune import LM_VIEW

    def lm_trial(name, quality, utility):
        return {"trial": name, "status": "finished", "params": {"lr": 0.1},
                "metrics": {"forget_quality": quality, "model_utility": utility, "steps": 10,
                            "stop": "forget_target", "forget_prob": 0.05}}
    results = [lm_trial("a", 0.9, 0.50), lm_trial("b", 0.3, 0.57), lm_trial("c", 0.3, 0.58),
               lm_trial("d", 0.1, 0.60)]
    rows, chosen = choose(results, original_utility=0.58, floor_points=2.0, view=LM_VIEW)
    assert chosen["trial"] == "c"  # a breaks the floor (0.56); c ties b and keeps more utility
    assert [row["feasible"] for row in rows] == [False, True, True, True]
    assert set(LM_VIEW.columns) <= set(rows[0]) and rows[0]["forget_ks_stat"] is None


def test_finished_trials_without_a_forget_quality_are_not_ranked_by_utility_alone():
    from hamu_ray.pipeline.tune import LM_VIEW

    results = [{"trial": name, "status": "finished", "params": {"lr": 0.1},
                "metrics": {"forget_quality": None, "model_utility": utility, "steps": 10, "stop": "none"}}
               for name, utility in (("a", 0.57), ("b", 0.58))]
    with pytest.raises(ValueError, match=r"trial\(s\) a, b finished without a forget quality"):
        choose(results, original_utility=0.58, floor_points=2.0, view=LM_VIEW)


def test_at_matched_forgetting_the_most_utility_among_trials_that_reached_the_target_wins():
    """rank matched: only finished trials stopped at the forget target qualify, whatever their
    forget quality; the most utility wins, then the fewest steps; the floor plays no part."""
    from hamu_ray.pipeline.config import TuneSection
    from hamu_ray.pipeline.tune import LM_VIEW, describe_choice

    def lm_trial(name, status, stop, utility, steps, quality=0.5):
        return {"trial": name, "status": status, "params": {"lr": 0.1},
                "metrics": {"forget_quality": quality, "model_utility": utility, "steps": steps,
                            "stop": stop, "forget_prob": 0.03}}
    results = [lm_trial("short", "finished", "none", 0.70, 100, quality=0.9),  # never reached it
               lm_trial("slow", "finished", "forget_target", 0.40, 60),
               lm_trial("fast", "finished", "forget_target", 0.40, 20),  # ties slow, fewer steps
               lm_trial("cut", "stopped early", "forget_target", 0.65, 10),  # never evaluated
               lm_trial("low", "finished", "forget_target", 0.10, 5, quality=1.0)]
    rows, chosen = choose(results, original_utility=0.58, floor_points=2.0, view=LM_VIEW, rank="matched")
    assert chosen["trial"] == "fast"
    assert [row["feasible"] for row in rows] == [False, True, True, False, True]
    assert [row["chosen"] for row in rows] == [False, False, True, False, False]
    tune = TuneSection(method="npo", space={"lr": {"values": [0.1]}}, rank="matched")
    assert describe_choice(chosen, tune, 0.58, LM_VIEW) == (
        "chosen: trial fast (lr 0.1): model utility 0.400 at the forget target, step 20 (original 0.580)")
    _, none = choose(results[:1], original_utility=0.58, floor_points=2.0, view=LM_VIEW, rank="matched")
    assert none is None and describe_choice(none, tune, 0.58, LM_VIEW).startswith("no finished trial reached")


def test_the_rank_joins_a_searchs_key_only_when_it_is_not_the_default():
    import hashlib

    from hamu_ray.pipeline.tune import search_key

    raw = digits_raw()
    raw["monitor"] = {"every": 5, "stop_at": 0.1}
    default, matched = config(raw), config(digits_raw(rank="matched") | {"monitor": raw["monitor"]})
    entry = default.method_entry(default.tune.method)
    tune = default.tune.model_dump()
    del tune["rank"]
    spec = {"tune": tune, "entry": entry.model_dump(), "unlearn": default.unlearn.model_dump(),
            "data": default.data.model_dump(by_alias=True), "model": default.model.model_dump(),
            "train": default.train.model_dump(), "monitor": default.monitor.model_dump()}
    assert search_key(default) == hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    assert search_key(matched) != search_key(default)


def test_pareto_front_keeps_only_undominated_points():
    points = [(90.0, 0.5), (95.0, 0.1), (92.0, 0.4), (89.0, 0.6), (91.0, 0.3), (95.0, 0.05)]
    assert pareto_front(points) == [(89.0, 0.6), (90.0, 0.5), (92.0, 0.4), (95.0, 0.1)]


# ---- a real search, interrupted and resumed -------------------------------------------------

def hamu_ray(*args, **popen):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "hamu_ray.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.fixture(scope="module")
def search(tmp_path_factory, digits_run_dir):
    """Run a 2-trial search, SIGINT it once its first trial finished, then resume it."""
    tmp = tmp_path_factory.mktemp("tune")
    # B's range from the hardness pre-flight of the original, at the method's own radius
    raw = digits_raw(num_samples=2, space={"constraint_ratio": {"preflight": True}})
    raw["output_dir"] = str(digits_run_dir)  # shares the cached original and oracle
    raw["unlearn"].update(max_steps=10, progress_every=5)  # 3 reports a trial: ASHA's grace period is 2
    path = tmp / "digits-tune.yaml"
    path.write_text(yaml.safe_dump(raw))

    first = hamu_ray("tune", str(path))
    lines, interrupted_at = [], None
    for line in first.stdout:
        lines.append(line)
        if interrupted_at is None and "[tune] trial" in line and " finished:" in line:
            first.send_signal(signal.SIGINT)
            interrupted_at = time.time()
    first_rc = first.wait(timeout=300)
    resumed = hamu_ray("tune", str(path))
    second_out, _ = resumed.communicate(timeout=900)
    return {"cfg": config(raw), "out": digits_run_dir, "first": "".join(lines), "first_rc": first_rc,
            "second": second_out, "second_rc": resumed.returncode, "interrupted": interrupted_at}


def search_dir(out: Path) -> Path:
    (directory,) = (out / "tune").glob("search-*")
    return directory


@pytest.mark.integration
def test_an_interrupted_search_resumes_without_rerunning_finished_trials(search):
    assert search["interrupted"] is not None, search["first"][-3000:]
    assert search["first_rc"] == 130, search["first"][-3000:]
    assert "run the same command again to resume" in search["first"]
    assert search["second_rc"] == 0, search["second"][-3000:]
    assert "[tune] resuming the search" in search["second"]
    events = [json.loads(line) for line in (search_dir(search["out"]) / JOURNAL).read_text().splitlines()]
    ended = [e["trial"] for e in events if e["event"] == "end"]
    started = [e["trial"] for e in events if e["event"] == "start"]
    # every trial ran to its evaluation, or ASHA stopped it (whether it does depends on timing)
    stopped = set(started) - set(ended)
    output = search["first"] + search["second"]
    assert len(set(started)) == 2 and len(set(ended)) >= 1, output[-3000:]
    assert all(f"trial {trial} stopped early by ASHA" in output for trial in stopped), output[-3000:]
    first_done = ended[0]  # finished before the interruption: it must never start again
    assert started.count(first_done) == 1 and ended.count(first_done) == 1


@pytest.mark.integration
def test_the_search_range_comes_from_one_preflight_of_the_original(search):
    from hamu_ray.pipeline.tune import PREFLIGHT_DIR, preflight_range

    summary = json.loads((search_dir(search["out"]) / PREFLIGHT_DIR / "hardness.json").read_text())
    assert summary["job"]["method"] == "hamu-q" and summary["radius"] == 0.1 and summary["lr"] == 0.1
    low, high = preflight_range(summary, 0.1)
    assert "[tune] pre-flight: On the whole-set gradients" in search["first"]
    assert f"constraint_ratio in [{low:.4g}, {high:.4g}] (log)" in search["first"]
    assert "[tune] pre-flight: cached" in search["second"]  # the resumed search reads it back
    events = [json.loads(line) for line in (search_dir(search["out"]) / JOURNAL).read_text().splitlines()]
    ratios = [e["params"]["constraint_ratio"] for e in events if e["event"] == "start"]
    assert len(ratios) >= 2 and all(low <= r <= high for r in ratios) and "radius" not in events[0]["params"]


@pytest.mark.integration
def test_every_trial_runs_under_one_parent_with_the_report_artifacts(search):
    uri = f"sqlite:///{search['out']}/mlflow.db"
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("hamu-ray")
    trials = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'trial'")
    assert len(trials) == 2
    parents = {run.data.tags["mlflow.parentRunId"] for run in trials}
    assert len(parents) == 1
    (parent,) = parents
    assert client.get_run(parent).data.tags["kind"] == "tune"
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"pareto.png", "trials.csv", "trials.md", "best.json", "preflight"} <= artifacts
    assert {a.path for a in client.list_artifacts(parent, "preflight")} == {
        "preflight/hardness.json", "preflight/hardness.md", "preflight/hardness.png"}
    assert all("constraint_ratio" in run.data.params for run in trials)
    finished = [run for run in trials if run.data.tags["status"] == "finished"]
    assert finished and all("forget_quality" in run.data.metrics for run in finished)


@pytest.mark.integration
def test_the_chosen_trial_meets_the_utility_floor(search):
    report = search_dir(search["out"]) / "report"
    best = json.loads((report / "best.json").read_text())
    chosen = best["chosen"]
    assert chosen is not None, search["second"][-3000:]
    floor = best["original_test_acc_retained"] - best["utility_floor_points"] / 100
    assert chosen["test_acc_retained"] >= floor and chosen["status"] == "finished"
    assert (report / "pareto.png").stat().st_size > 10_000
    with open(report / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and [row["chosen"] for row in rows].count("True") == 1
    assert "chosen: trial" in search["second"]
