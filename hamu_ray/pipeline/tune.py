"""`hamu-ray tune`: Ray Tune searches one method's threshold (HAMU's B as a ratio of lr, or
surgery's epsilon, optionally lr and the radius mode; any method's lr) for the best forget
quality that keeps utility within a floor of the original model's: test accuracy on the
retained classes for classifiers, model utility (TOFU) for language models.

Each trial is a Tune function trainable that fits one engine job (a TorchTrainer; with Ray Train
V2, `Tuner(TorchTrainer)` is not supported) and forwards its step reports to Tune, so ASHA can
stop weak trials early; a finished trial ends with one report of its evaluation. The search
lives in `output_dir/tune/search-<key>`: running the same command again resumes it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray.tune import Callback
from ray.tune.integration.ray_train import TuneReportCallback

from hamu_ray import files
from hamu_ray.pipeline import evaluate, lm_pipeline
from hamu_ray.pipeline import stages as pipeline
from hamu_ray.pipeline import plots
from hamu_ray.pipeline.config import PipelineConfig, SearchDomain, TuneSection
from hamu_ray.engine.driver import ray_session
from hamu_ray.pipeline.tracking import Tracker, refuse_local_store_on_cluster, tracking_uri, ui_command

TRIAL_MEMORY = 512 * 2**20  # bytes Ray reserves for each trial's own process
JOURNAL = "journal.jsonl"  # one line per trial start and end: what ran, and how often
PARENT_FILE = "mlflow_parent_run"  # the search's parent run, reopened on resume
NO_STEP_CAP_REPORTS = 10_000  # ASHA's max_t when epochs, not max_steps, end a trial: never reached
TRIAL_TEXT_COLUMNS = ("trial", "status", "params", "stop", "feasible", "chosen")


@dataclass(frozen=True)
class SearchView:
    """What a search ranks and shows, by task: its utility (kept above the floor) and the
    trials table's columns; forget quality (KS p-value against the oracle) is the objective."""
    utility: str  # the metric the floor applies to
    utility_label: str
    percent: bool  # shown in percent (an accuracy)
    columns: tuple[str, ...]

    def show(self, value: float) -> str:
        return f"{100 * value:.1f}%" if self.percent else f"{value:.3f}"


CLASSIFIER_VIEW = SearchView("test_acc_retained", "test accuracy on retained classes", True,
                             ("trial", "status", "params", "steps", "stop", "forget_acc", "test_acc_retained",
                              "forget_quality", "forget_ks_stat", "mia_auc", "feasible", "chosen"))
LM_VIEW = SearchView("model_utility", "model utility", False,
                     ("trial", "status", "params", "steps", "stop", "forget_prob", "forget_rouge",
                      "model_utility", "forget_quality", "mia_auc", "priv_leak", "feasible", "chosen"))
TRIAL_COLUMNS = CLASSIFIER_VIEW.columns


def view_of(cfg: PipelineConfig) -> SearchView:
    return LM_VIEW if cfg.is_lm else CLASSIFIER_VIEW


@dataclass(frozen=True)
class SearchResult:
    trials: list[dict]
    chosen: dict | None
    report_dir: Path
    tracking_uri: str
    complete: bool  # False: interrupted; the same command resumes it


def run_search(cfg: PipelineConfig) -> SearchResult:
    if cfg.tune is None:
        raise ValueError(f"pipeline {cfg.name} has no tune: section; see README (Threshold search)")
    if cfg.is_lm:
        lm_pipeline.check_searchable(cfg)  # before anything is written
    out = Path(cfg.output_dir).resolve()
    pipeline.check_output_dir(out)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    directory = out / "tune" / f"search-{search_key(cfg)}"
    report = directory / "report"
    report.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.tracking.uri, out)
    tracker = Tracker(uri, cfg.tracking.experiment, artifact_root=out / "mlartifacts",
                      buffer_dir=directory / "mlflow-unsent")
    files.write_atomic(report / "config.yaml", yaml.safe_dump(cfg.model_dump(by_alias=True), sort_keys=False))

    parent_id = previous_parent(directory)  # a resumed search reopens its parent run
    with tracker.run(f"{cfg.name}-tune", run_id=parent_id,
                     params=None if parent_id else cfg.model_dump(by_alias=True),
                     tags={"kind": "tune", "search": directory.name}) as parent:
        (directory / PARENT_FILE).write_text(parent)
        prepared = pipeline.prepare(cfg, out, tracker)
        pipeline.check_given_models(cfg, prepared)  # before Ray starts
        view = view_of(cfg)
        with ray_session(cfg.cluster):
            refuse_local_store_on_cluster(uri)
            references = pipeline.train_references(cfg, prepared, out, tracker)
            ruler = pipeline.yardstick(cfg, prepared, references["oracle"].export(cfg))
            context = TrialContext(cfg.model_dump(by_alias=True), prepared, str(out), str(directory),
                                   str(references["original"].export(cfg)), ruler,
                                   pipeline.monitor_section(cfg, prepared, references, out))
            space = searched_space(cfg, prepared, references["original"].export(cfg), directory)
            results, complete = fit_search(space, context, directory, view)
            original = pipeline.measure(cfg, ruler, references["original"].export(cfg))[view.utility]
        trials, chosen = choose(results, original, cfg.tune.utility_floor, view, cfg.tune.rank)
        log_trials(tracker, parent, trials, out)
        write_search_report(trials, chosen, original, cfg.tune, report, view)
        for name in ("trials.csv", "trials.md", "pareto.png", "best.json", "config.yaml"):
            tracker.log_artifact(report / name)
        if (directory / PREFLIGHT_DIR).is_dir():  # the pre-flight the range came from
            tracker.log_artifact(directory / PREFLIGHT_DIR, PREFLIGHT_DIR)

    print("\n" + render_text(trials, view))
    print("\n" + describe_choice(chosen, cfg.tune, original, view))
    if not complete:
        print("the search was interrupted; run the same command again to resume it", flush=True)
    print(f"report: {report}\nMLflow: {ui_command(uri)}", flush=True)
    tracker.finish()
    return SearchResult(trials, chosen, report, uri, complete)


def search_key(cfg: PipelineConfig) -> str:
    """The search's identity: its tune section and the job of the method it starts from."""
    entry = cfg.method_entry(cfg.tune.method)
    tune = cfg.tune.model_dump()
    if tune["rank"] == "forget_quality":  # the default: earlier searches keep their key
        del tune["rank"]
    spec = {"tune": tune, "entry": entry.model_dump(), "unlearn": cfg.unlearn.model_dump(),
            "data": cfg.data.model_dump(by_alias=True), "model": cfg.model.model_dump(),
            "train": cfg.train and cfg.train.model_dump()}  # None: the user's own original
    if cfg.monitor is not None:  # added only when set: earlier searches keep their key
        spec["monitor"] = cfg.monitor.model_dump()
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


# ---- the pre-flight's range ------------------------------------------------------------------

PREFLIGHT_DIR = "preflight"  # in the search's directory: hardness.json/.md/.png of the original


def searched_space(cfg: PipelineConfig, prepared: dict[str, str], original: Path, directory: Path) -> TuneSection:
    """The tune section to search: `constraint_ratio: {preflight: true}` replaced by the log
    range the hardness pre-flight of the original model gives (run once per search)."""
    if not any(domain.preflight for domain in cfg.tune.space.values()):
        return cfg.tune
    entry = cfg.method_entry(cfg.tune.method)
    summary = preflight_summary(cfg, prepared, original, directory / PREFLIGHT_DIR)
    low, high = preflight_range(summary, cfg.unlearn_settings(entry).lr)
    print(f"[tune] searching constraint_ratio in [{low:.4g}, {high:.4g}] (log), from the pre-flight: "
          f"B from {low * cfg.unlearn_settings(entry).lr:.4g} to the largest feasible "
          f"{summary['max_feasible_constraint']:.4g}", flush=True)
    space = {**cfg.tune.space, "constraint_ratio": SearchDomain(low=low, high=high, log=True)}
    return cfg.tune.model_copy(update={"space": space})


def preflight_summary(cfg: PipelineConfig, prepared: dict[str, str], original: Path, out: Path) -> dict:
    """The hardness pre-flight of the searched method's job from the original (hamu-ray
    hardness, without per-row scores); a resumed search reads it back."""
    from hamu_ray import hardness
    from hamu_ray.engine.config import UnlearnConfig

    if (out / "hardness.json").exists():
        print(f"[tune] pre-flight: cached in {out}", flush=True)
        return json.loads((out / "hardness.json").read_text())
    print("[tune] pre-flight: whole-set gradients of the original on the forget and retain sets", flush=True)
    job = pipeline.unlearning_job(cfg, cfg.method_entry(cfg.tune.method), prepared, original)
    summary = hardness.main(UnlearnConfig.model_validate({**job, "output_dir": str(out / "unused")}),
                            out, rows=0, tracking_uri=None)
    print(f"[tune] pre-flight: {summary['verdict']}", flush=True)
    return summary


def preflight_range(summary: dict, lr: float) -> tuple[float, float]:
    """constraint_ratio's range (B / lr): from a quarter of the largest damage-free B (well
    inside it; at least a hundredth of the largest feasible B, so the range is never empty)
    up to the largest feasible B on the whole-set gradients."""
    free, feasible = summary["max_constraint_without_damage"], summary["max_feasible_constraint"]
    if not feasible > 0:
        raise ValueError("tune.space.constraint_ratio: the pre-flight finds no forget gain reachable "
                         "within the method's radius; nothing to search (raise the radius or lr)")
    return max(free / 4, feasible / 100) / lr, feasible / lr


def previous_parent(directory: Path) -> str | None:
    path = directory / PARENT_FILE
    return path.read_text().strip() if path.exists() else None


# ---- the search ----------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs (it travels to the trial's process through the object store)."""
    pipeline: dict
    prepared: dict[str, str]
    output_dir: str
    search_dir: str
    original: str  # the original model's export (a classifier's weights, an LM's directory)
    ruler: pipeline.Yardstick | lm_pipeline.LMYardstick  # the sets and the oracle's results
    monitor: dict | None = None  # the engine's monitor section (samples, stop target), if any


def tune_space(tune: TuneSection) -> dict:
    from ray import tune as ray_tune

    space = {}
    for name, domain in tune.space.items():
        if domain.values is not None:
            space[name] = ray_tune.choice(domain.values)
        elif domain.log:
            space[name] = ray_tune.loguniform(domain.low, domain.high)
        else:
            space[name] = ray_tune.uniform(domain.low, domain.high)
    return space


def fit_search(tune_cfg: TuneSection, context: TrialContext, directory: Path,
               view: SearchView = CLASSIFIER_VIEW) -> tuple[list[dict], bool]:
    """Run (or resume) the Tuner: one dict per trial (id, status, params, last metrics), and
    whether every trial ended (False after an interruption: Tune saved its state on SIGINT)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    check_fits(tune_cfg, context)
    # the trial process mostly waits on its workers; Ray needs a non-empty request: memory
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"CPU": tune_cfg.cpus_per_trial, "memory": TRIAL_MEMORY})
    if tune.Tuner.can_restore(str(directory / "tuner")):
        print(f"[tune] resuming the search in {directory}", flush=True)
        tuner = tune.Tuner.restore(str(directory / "tuner"), trainable=trainable,
                                   resume_unfinished=True, resume_errored=True)
    else:
        scheduler = None
        if tune_cfg.scheduler is not None:
            asha = tune_cfg.scheduler
            scheduler = ASHAScheduler(metric=asha.metric, mode=asha.mode, time_attr="training_iteration",
                                      grace_period=asha.grace_period, reduction_factor=asha.reduction_factor,
                                      max_t=max_reports(context))
        tuner = tune.Tuner(
            trainable, param_space=tune_space(tune_cfg),
            # Tune ignores max_concurrent_trials for a given BasicVariantGenerator: set it there
            tune_config=tune.TuneConfig(num_samples=tune_cfg.num_samples, scheduler=scheduler,
                                        search_alg=BasicVariantGenerator(random_state=tune_cfg.seed,
                                                                         max_concurrent=tune_cfg.max_concurrent)),
            run_config=tune.RunConfig(name="tuner", storage_path=str(directory), verbose=0,
                                      callbacks=[TrialLines(view)]))
    tuner.fit()
    # the grid fit() returns marks trials stopped by Ctrl-C as terminated; the state Tune saved
    # before stopping them still says which ones were running
    grid = tune.Tuner.restore(str(directory / "tuner"), trainable=trainable).get_results()
    # trials are created one by one (max_concurrent): after a Ctrl-C some may not exist yet
    complete = len(grid) == tune_cfg.num_samples and grid.num_terminated + grid.num_errors == len(grid)
    return [trial_summary(result, complete) for result in grid], complete


def check_fits(tune_cfg: TuneSection, context: TrialContext) -> None:
    """Concurrent trials that cannot all place their workers wait for each other forever:
    refuse such a search up front."""
    import ray

    cluster = context.pipeline["cluster"]
    per_trial = tune_cfg.cpus_per_trial + cluster["num_workers"] * cluster["cpus_per_worker"]
    needed = tune_cfg.max_concurrent * per_trial
    available = ray.cluster_resources().get("CPU", 0)
    if needed > available:
        raise ValueError(
            f"tune.max_concurrent {tune_cfg.max_concurrent} trials × {per_trial:g} CPUs "
            f"(tune.cpus_per_trial + cluster.num_workers × cluster.cpus_per_worker) "
            f"= {needed:g} CPUs, more than the cluster's {available:g}: the trials "
            "would wait on each other forever")


def max_reports(context: TrialContext) -> int:
    """ASHA's max_t: the step reports a full trial makes, plus its final evaluation report,
    from the searched method's own settings (its train: overrides included), so that no trial
    is stopped at max_t before its evaluation."""
    horizon = PipelineConfig.model_validate(context.pipeline).search_horizon()
    return horizon if horizon is not None else NO_STEP_CAP_REPORTS


def trial_summary(result, complete: bool) -> dict:
    metrics = dict(result.metrics or {})
    if result.error is not None:
        status = "error"
    elif metrics.get("evaluated"):
        status = "finished"
    elif complete:
        status = "stopped early"  # by ASHA
    else:
        status = "unfinished"  # the search was interrupted; resuming runs it
    return {"trial": metrics.get("trial_id") or result.path.rsplit("/", 1)[-1], "status": status,
            "params": dict(result.config), "metrics": metrics}


class TrialLines(Callback):
    """One line per trial start and end on the driver: a search takes minutes per trial."""

    def __init__(self, view: SearchView = CLASSIFIER_VIEW):
        self.view = view

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[tune] trial {trial.trial_id} started: {format_params(trial.config)}", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        m = trial.last_result or {}
        if m.get("evaluated"):
            print(f"[tune] trial {trial.trial_id} finished: forget_quality {m['forget_quality']:.3g}, "
                  f"{self.view.utility} {self.view.show(m[self.view.utility])}, {m['steps']} steps, "
                  f"stop {m['stop']}", flush=True)
        else:
            print(f"[tune] trial {trial.trial_id} stopped early by ASHA after "
                  f"{m.get('training_iteration', 0)} reports", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[tune] trial {trial.trial_id} failed; see {trial.local_path}", flush=True)


def format_params(params: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(params.items()))


# ---- one trial (runs in a Tune trial actor, maybe on another node) -------------------------

def run_trial(sample: dict, context: TrialContext) -> None:
    from ray import tune

    cfg = PipelineConfig.model_validate(context.pipeline)
    trial_id = tune.get_context().get_trial_id()
    journal(context, {"event": "start", "trial": trial_id, "params": sample})
    stage = trial_stage(cfg, context, sample)
    metrics = pipeline.measure(cfg, context.ruler, stage.export(cfg))
    steps = stage.step_log()
    last_step = steps[-1] if steps else {}
    if "retain_loss" in metrics:  # ASHA's metric at the last report: the evaluation's (classifiers)
        metrics["loss/retain"] = metrics["retain_loss"]
    final = {**last_step, **metrics, "steps": stage.summary["steps"],
             "stop": stage.summary["stop"], "wall_s": stage.summary["wall_s"], "stage": stage.directory.name,
             "trial_id": trial_id, "evaluated": True}
    journal(context, {"event": "end", "trial": trial_id, "stage": stage.directory.name})
    tune.report(final)


def trial_stage(cfg: PipelineConfig, context: TrialContext, sample: dict) -> pipeline.StageOutput:
    """Fit the trial's job, forwarding step reports to Tune; cached like a pipeline stage."""
    entry = cfg.method_entry(cfg.tune.method)
    method, train = cfg.trial_settings(entry, sample)
    job = pipeline.evaluated(cfg, pipeline.job_dict(
        cfg, train, method=method.model_dump(), start=Path(context.original),
        data={"forget": context.prepared["forget"], "retain": context.prepared["retain"]}), context.prepared,
        attacked=False)  # a trial is ranked, not attacked
    if context.monitor is not None:
        job["monitor"] = context.monitor
    return pipeline.cached_stage(f"trial-{entry.key}", job, Path(context.output_dir),
                                 callbacks=[StepReportsToTune()])


class StepReportsToTune(TuneReportCallback):
    """Ray Train's step reports go to Tune (for ASHA); the engine's final export report does not:
    the trial's last report is its evaluation."""

    def after_report(self, run_context, metrics, checkpoint):
        if metrics and not metrics[0].get("final"):
            super().after_report(run_context, metrics, None)


def journal(context: TrialContext, event: dict) -> None:
    with open(Path(context.search_dir) / JOURNAL, "a") as f:
        f.write(json.dumps({**event, "time": round(time.time(), 1)}) + "\n")


# ---- choosing, reporting -------------------------------------------------------------------

def choose(results: list[dict], original_utility: float, floor_points: float,
           view: SearchView = CLASSIFIER_VIEW, rank: str = "forget_quality") -> tuple[list[dict], dict | None]:
    """Best forget quality among finished trials whose utility is within the floor (points:
    hundredths of the utility): the KS p-value, then (where it underflows to 0) the smaller KS
    statistic where the task reports it, then more utility. With rank `matched`: the most
    utility among finished trials that reached the monitor's forget target (then fewer steps).
    Returns the table rows and the chosen one (None: no trial qualifies)."""
    if rank == "matched":
        return choose_matched(results, view)
    threshold = original_utility - floor_points / 100
    rows = table_rows(results, view)
    for row in rows:
        row["feasible"] = row["status"] == "finished" and row[view.utility] >= threshold - 1e-12
    feasible = [row for row in rows if row["feasible"]]
    unranked = [str(row["trial"]) for row in feasible if row["forget_quality"] is None]
    if unranked:  # ranking them by the tie-breakers alone would hide it
        raise ValueError(f"trial(s) {', '.join(unranked)} finished without a forget quality (it "
                         "needs the oracle and the forget set's truth-ratio columns): nothing to rank by")
    chosen = max(feasible, default=None, key=lambda row: (
        row["forget_quality"], -(row["forget_ks_stat"] or 0.0), row[view.utility]))
    if chosen is not None:
        chosen["chosen"] = True
    return rows, chosen


def table_rows(results: list[dict], view: SearchView) -> list[dict]:
    """One row per trial: its status, parameters and the view's columns (not yet ranked)."""
    shown = [c for c in view.columns if c not in ("trial", "status", "params", "feasible", "chosen")]
    return [{"trial": r["trial"], "status": r["status"], "params": r["params"],
             **{k: r["metrics"].get(k) for k in shown}, "forget_ks_stat": r["metrics"].get("forget_ks_stat"),
             "stage": r["metrics"].get("stage"), "feasible": False, "chosen": False}
            for r in results]


def choose_matched(results: list[dict], view: SearchView) -> tuple[list[dict], dict | None]:
    """Matched forgetting: feasible = finished at the forget target (stop forget_target); the
    most utility among them, then the fewest steps."""
    rows = table_rows(results, view)
    for row in rows:
        row["feasible"] = row["status"] == "finished" and row["stop"] == "forget_target"
    chosen = max((row for row in rows if row["feasible"]), default=None,
                 key=lambda row: (row[view.utility], -row["steps"]))
    if chosen is not None:
        chosen["chosen"] = True
    return rows, chosen


def describe_choice(chosen: dict | None, tune: TuneSection, original_utility: float,
                    view: SearchView = CLASSIFIER_VIEW) -> str:
    if tune.rank == "matched":
        if chosen is None:
            return "no finished trial reached the monitor's forget target (monitor.stop_at)"
        return (f"chosen: trial {chosen['trial']} ({format_params(chosen['params'])}): {view.utility_label} "
                f"{view.show(chosen[view.utility])} at the forget target, step {chosen['steps']} "
                f"(original {view.show(original_utility)})")
    floor = view.show(original_utility - tune.utility_floor / 100)
    if chosen is None:
        return (f"no finished trial kept {view.utility_label} ≥ {floor} "
                f"(original {view.show(original_utility)} − {tune.utility_floor} points)")
    return (f"chosen: trial {chosen['trial']} ({format_params(chosen['params'])}): forget quality "
            f"{chosen['forget_quality']:.3g}, {view.utility_label} "
            f"{view.show(chosen[view.utility])} (floor {floor})")


def trial_cell(column: str, value) -> str:
    if column == "params":
        return format_params(value)
    if value is None or column not in TRIAL_TEXT_COLUMNS:
        return evaluate.format_cell(column, value)
    return str(value)


def render_text(rows: list[dict], view: SearchView = CLASSIFIER_VIEW) -> str:
    return evaluate.to_text(rows, view.columns, trial_cell, TRIAL_TEXT_COLUMNS)


def write_search_report(rows: list[dict], chosen: dict | None, original_utility: float,
                        tune: TuneSection, report: Path, view: SearchView = CLASSIFIER_VIEW) -> None:
    evaluate.write_csv([{**row, "params": format_params(row["params"])} for row in rows],
                       report / "trials.csv", view.columns)
    markdown = evaluate.to_markdown(rows, view.columns, trial_cell, TRIAL_TEXT_COLUMNS)
    files.write_atomic(report / "trials.md", markdown + "\n")
    best = {"chosen": chosen, f"original_{view.utility}": original_utility,
            "utility_floor_points": tune.utility_floor, "method": tune.method, "rank": tune.rank}
    files.write_atomic(report / "best.json", json.dumps(best, indent=2, default=str))
    axis = plots.Axis(view.utility, view.utility_label + (" (%)" if view.percent else ""),
                      100 if view.percent else 1)
    plots.pareto(rows, floor=original_utility - tune.utility_floor / 100, path=report / "pareto.png",
                 utility=axis)


def log_trials(tracker: Tracker, parent: str, rows: list[dict], out: Path) -> None:
    """A child run per trial under the search's parent run; a resumed search logs only new ones."""
    logged = {run.data.tags.get("trial") for run in tracker.search_runs(
        f"tags.mlflow.parentRunId = '{parent}' and tags.kind = 'trial'")}
    for row in rows:
        if row["trial"] in logged or row["status"] == "unfinished":
            continue
        with tracker.run(f"trial-{row['trial']}", params=row["params"],
                         tags={"kind": "trial", "trial": row["trial"], "status": row["status"],
                               "chosen": str(row["chosen"])}) as run_id:
            tracker.log_metrics({k: v for k, v in row.items() if k not in ("trial", "status", "params",
                                                                           "stop", "stage")})
            if row["stage"]:  # the engine's per-step metrics of a trial that finished its job
                tracker.log_steps(run_id, pipeline.StageOutput.read(out / "stages" / row["stage"]).step_log())
