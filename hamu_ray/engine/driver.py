"""Driver side of an unlearning job: check inputs, start or join Ray, fit, publish the output.

The output directory appears only when the run succeeds: everything is written to a staging
directory beside it and renamed at the end, so a failed run leaves no half-written model. A run
that fails after Ray Train registered a checkpoint (Ctrl-C, a lost head node, a failed publish)
keeps that staging directory: the same command continues from the checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray.train
from ray.train import UserCallback as UserCallbackBase

from hamu_ray import digests, quiet, receipt
from hamu_ray.engine import data, evaluation, monitor
from hamu_ray.engine.config import ClusterSection, UnlearnConfig
from hamu_ray.errors import OutputExistsError, UserError
from hamu_ray.files import file_stats, staging_dir
from hamu_ray.kernels import kernel_env
from hamu_ray.rules import NonFiniteStatsError
from hamu_ray.engine.worker import (EXPORT_INFO, EXPORT_LOG, MONITOR_FILE, PREFLIGHT_FILE,
                                   evaluate_loop_per_worker, preflight_loop_per_worker,
                                   train_loop_per_worker)
from hamu_ray.tasks import task_for

log = logging.getLogger(__name__)

# No telemetry, no token file (docs/design.md §9).
RUNTIME_ENV_DEFAULTS = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                        "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}
RUN_NAME = "unlearn"  # the Ray Train run's name in its storage (the staging directory's ray/)
# Set by Ray's job supervisor in a submitted job's driver: the job's runtime env, as JSON.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# The embedded Ray's Train controller checks on its workers every 0.25 s instead of Ray's 2 s:
# a job starts and ends in several such polls, and on a small machine they are most of a short
# stage's time (docs/design.md §9). A cluster keeps its own setting.
LOCAL_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}


@dataclass(frozen=True)
class UnlearnResult:
    output_dir: Path
    steps: int
    stop: str
    resumed_from_step: int  # 0 unless a failed worker group restarted from a checkpoint
    sets: dict[str, data.SetInfo]


def run_unlearning(cfg: UnlearnConfig, progress: str | None = None, callbacks=(),
                   key_dir: Path | None = None) -> UnlearnResult:
    """Run one job; with `progress` (a label) print a line every train.progress_every steps.
    `callbacks`: more Ray Train UserCallbacks (a Tune trial forwards the reports with one).
    `key_dir`: whose digest key names the receipt's forget rows (hamu_ray.digests; a pipeline
    passes its output directory, so all its stages share one); None: the job's own output's."""
    out = Path(cfg.output_dir)
    if out.exists():  # staging_dir refuses it too; here before the sets are read, naming the field
        raise OutputExistsError(f"output_dir {out} already exists; choose a new one (nothing is overwritten)")
    sets = check_inputs(cfg)
    started = time.perf_counter()
    # a driver killed or failed mid-run leaves its staging directory; the same job started again
    # continues from the last checkpoint Ray Train registered there (Ray Train restores its run
    # from the same storage path and name)
    with staging_dir(out, resume_key=job_identity(cfg, sets), keep_if=kept_for_retry) as staging:
        interrupted = latest_checkpoint(staging / "ray")
        if interrupted is not None:
            say(progress, f"resuming the interrupted run in {staging} from its checkpoint at step "
                          f"{interrupted['metrics'].get('step', interrupted['metrics'].get('steps'))}")
        if interrupted is not None and interrupted["metrics"].get("final"):  # only the publishing was left
            result = FinishedRun(ray.train.Checkpoint(str(staging / "ray" / RUN_NAME / interrupted["checkpoint_dir_name"])))
        else:
            with ray_session(cfg.cluster):
                if progress:  # starting the workers takes a while: say where the stage is
                    print(f"  [{progress}] sets ready ({', '.join(f'{i.name} {i.num_rows} rows' for i in sets.values())}); "
                          f"starting {cfg.cluster.num_workers} worker(s)", flush=True)
                result = fit(cfg, staging / "ray", progress, callbacks)
        summary = publish(cfg, sets, result, staging, wall_s=time.perf_counter() - started,
                          key_dir=key_dir or staging)
    for line in task_for(cfg).prepared_lines(summary.get("prepared", {})):
        log.info("%s", line)
        print(f"  {line}", flush=True)
    return UnlearnResult(out, summary["steps"], summary["stop"], summary["resumed_from_step"], sets)


@dataclass(frozen=True)
class FinishedRun:
    checkpoint: object  # the final export of a run whose driver died before publishing it


def say(progress: str | None, line: str) -> None:
    log.info("%s", line)
    if progress:
        print(f"  [{progress}] {line}", flush=True)


def job_identity(cfg: UnlearnConfig, sets: dict[str, data.SetInfo]) -> str:
    """What makes an interrupted run this job's: its whole config (not where it writes or which
    cluster it joins), the sets' fingerprints (sizes, parquet footers: the workers compare the
    content digests when they resume) and the starting model's files (size, mtime)."""
    job = cfg.model_dump(exclude={"output_dir"})
    job["cluster"].pop("address", None)
    start = getattr(cfg.model, "weights", None) or getattr(cfg.model, "path", None)
    model = file_stats(start) if start is not None and Path(start).exists() else []
    spec = {"job": job, "sets": {name: info.fingerprint for name, info in sets.items()}, "model": model}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def latest_checkpoint(storage: Path) -> dict | None:
    """The latest checkpoint Ray Train registered in a run's storage (its snapshot's entry:
    checkpoint_dir_name, metrics), None when there is none."""
    snapshot = storage / RUN_NAME / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):
        return None


def kept_for_retry(staging: Path, error: BaseException) -> bool:
    """Whether a failed run's staging directory is kept (and says so): when Ray Train has
    registered a checkpoint there, so that nothing trained is lost; not for a diverged run
    (continued, it would diverge again)."""
    checkpoint = latest_checkpoint(staging / "ray")
    if checkpoint is None or isinstance(error, NonFiniteStatsError):
        return False
    metrics = checkpoint["metrics"]
    kept = ("the trained model (only its publishing is left)" if metrics.get("final") else
            f"the checkpoint at step {metrics.get('step')}")
    log.warning("the run stopped (%s); %s is kept in %s: run the same command again to continue, "
                "or remove that directory to start over", type(error).__name__, kept, staging)
    return True


def check_inputs(cfg: UnlearnConfig) -> dict[str, data.SetInfo]:
    """Every set readable, with its columns, non-empty, large enough for one batch per worker,
    from the sets' metadata: their rows are read, hashed and checked for forget rows in the
    retain set by the job's workers (worker.checked_sets)."""
    task = task_for(cfg)
    paths = {"forget": cfg.data.forget, "retain": cfg.data.retain, "eval": cfg.data.eval,
             **(monitor.sample_paths(cfg.monitor) if cfg.monitor else {})}
    sets = {name: data.inspect_set(name, path, task.columns(name)) for name, path in paths.items() if path}
    batches = {"forget": cfg.data.forget_batch_size, "retain": cfg.data.retain_batch_size}
    for name, batch in ((name, batches[name]) for name in batches if name in sets):
        per_worker = sets[name].num_rows // cfg.cluster.num_workers
        if per_worker < batch:
            raise data.DataError(
                f"{name} set {sets[name].path}: {sets[name].num_rows} rows give {per_worker} per worker, "
                f"fewer than data.{name}_batch_size={batch}")
    if "forget" in sets:  # its receipt digests every row: a column it cannot encode fails here, not after training
        digests.check_encodable(sets["forget"].path)
    task.check_model()
    check_evaluation_sets(cfg)
    for info in sets.values():  # counts and fingerprints only: never the rows
        log.info("%s set: %d rows, fingerprint %s", info.name, info.num_rows, info.fingerprint)
    return sets


def check_evaluation_sets(cfg: UnlearnConfig) -> list[data.SetInfo]:
    """The evaluation sets readable, non-empty, with the question and answer columns."""
    if cfg.evaluation is None:
        return []
    columns = [cfg.data.text.question_column, cfg.data.text.answer_column]
    return [data.inspect_set(evaluation.set_label(name), path, columns)
            for name, path in cfg.evaluation.sets.items()]


@dataclass(frozen=True)
class Evaluated:
    scores: dict  # set → score → per-example values
    seconds: float  # the workers' scoring, their start and the model's load left out


def run_evaluation(cfg: UnlearnConfig) -> Evaluated:
    """The job's model as given (model.path), scored on its evaluation sets by the job's own
    workers at its ZeRO stage and dtype (an evaluation-only job: no optimizer, no step); only
    the per-example numbers come back."""
    if cfg.evaluation is None:
        raise UserError("the job has no evaluation: section (the sets to score)")
    task_for(cfg).check_model()
    check_evaluation_sets(cfg)
    return evaluation_only_job(cfg, lambda reported, metrics: Evaluated(
        evaluation.read_scores(reported / evaluation.SCORES_FILE), metrics["evaluation_s"]))


def evaluation_only_job(cfg: UnlearnConfig, read):
    """`worker.evaluate_loop_per_worker` on the job's workers (in a temporary Ray Train storage);
    `read(reported directory, final metrics)` takes what rank 0 reported before it goes."""
    with tempfile.TemporaryDirectory() as tmp, ray_session(cfg.cluster):
        result = fit(cfg, Path(tmp) / "ray", loop=evaluate_loop_per_worker)
        if result.checkpoint is None:
            raise RuntimeError("the evaluation-only job reported nothing")
        with result.checkpoint.as_directory() as reported:
            return read(Path(reported), result.metrics)


def monitor_values(cfg: UnlearnConfig) -> dict:
    """The monitor's values for the job's model as given, before any step, computed by the
    job's own workers at its ZeRO stage and dtype (an evaluation-only job: the task's
    preparation, batches and scores, as during a run): e.g. a pipeline's oracle, whose forget
    probability becomes the methods' stop target."""
    if cfg.monitor is None:
        raise ValueError("the job has no monitor: section")
    cfg = cfg.model_copy(update={"evaluation": None})  # the samples only
    check_inputs(cfg)
    return evaluation_only_job(cfg, lambda reported, _: json.loads((reported / MONITOR_FILE).read_text()))


@contextlib.contextmanager
def ray_session(cluster: ClusterSection):
    """Join $RAY_ADDRESS or cluster.address; otherwise start an embedded local Ray for this run."""
    import ray

    if ray.is_initialized():
        yield
        return
    for key, value in RUNTIME_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    quiet.ray_driver_output()
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    env_vars = worker_env_vars()
    if address:
        ray.init(address=address, runtime_env=joining_runtime_env(env_vars), log_to_driver=False)
    else:
        # Logical CPUs = cores: workers take fractions (cluster.cpus_per_worker) so that a
        # pipeline's one-CPU tasks always find a CPU (docs/design.md §9).
        # Idle workers are kept (up to 4 per core) instead of being killed while a stage's
        # training actors run: the next stage's data tasks then reuse a process that has
        # already imported transformers (seconds per stage on a small machine). The raylet warns
        # (on stdout, at every stage) once its worker processes reach 4× its startup
        # concurrency, by default one per core: that is the idle workers this keeps on purpose.
        # As many starts at once as workers kept (Ray starts no more than are asked for) move
        # the warning to 4× those, where it again means a runaway.
        cores = os.cpu_count() or 2
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)  # the controller runs in a process Ray starts from ours
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.path.join(tempfile.gettempdir(), "hamu-ray"),
                 runtime_env={"env_vars": env_vars},
                 _system_config={"num_workers_soft_limit": 4 * cores,
                                 "worker_maximum_startup_concurrency": 4 * cores})
    try:
        yield
    finally:
        ray.shutdown()


def worker_env_vars() -> dict[str, str]:
    """What the driver passes on to every Ray worker: the defaults, and the accelerator and kernel
    pins and the host-memory choice (usage.HOST_MEMORY_ENV) when set here. DeepSpeed picks cuda on
    GPU nodes and cpu elsewhere by itself, so only an explicit DS_ACCELERATOR is passed."""
    from hamu_ray.engine.usage import HOST_MEMORY_ENV, host_memory_choice

    try:
        host_memory_choice()  # named here, before any worker starts
    except ValueError as e:
        raise UserError(str(e)) from None
    passed = {key: os.environ[key] for key in ("DS_ACCELERATOR", HOST_MEMORY_ENV) if key in os.environ}
    return {**RUNTIME_ENV_DEFAULTS, **passed, **kernel_env()}


def joining_runtime_env(env_vars: dict[str, str]) -> dict | None:
    """The runtime_env for ray.init when joining a cluster.

    Inside a submitted Ray job, Ray merges ray.init's runtime_env into the job's (its working_dir,
    py_modules and env_vars stay) but refuses any env var both set, even to the same value; so
    pass only the variables the job's runtime env lacks.
    """
    job_config = os.environ.get(JOB_CONFIG_ENV)
    if not job_config:
        return {"env_vars": env_vars}
    job_vars = (json.loads(job_config).get("runtime_env") or {}).get("env_vars") or {}
    missing = {key: value for key, value in env_vars.items() if key not in job_vars}
    return {"env_vars": missing} if missing else None


def fit(cfg: UnlearnConfig, storage: Path, progress: str | None = None, callbacks=(),
        loop=train_loop_per_worker, loop_config: dict | None = None):
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    queue = Queue(actor_options={"num_cpus": 0}) if progress else None
    use_gpu = cfg.cluster.use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    trainer = TorchTrainer(
        loop,
        train_loop_config=cfg.model_dump() if loop_config is None else loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.cluster.num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(storage.resolve()),
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=[*callbacks, *([ProgressCallback(queue)] if queue is not None else [])]),
    )
    try:
        return trainer.fit() if queue is None else fit_showing_progress(trainer, queue, progress)
    except ray.train.WorkerGroupError as exc:
        raise worker_user_error(exc) or exc


def run_preflight(cfg: UnlearnConfig, rows: int = 64) -> tuple[dict, dict[str, data.SetInfo]]:
    """The hardness pre-flight on the job's own workers and ZeRO stage (no optimizer step):
    whole-set statistics, then the first `rows` forget rows one by one. Returns the raw numbers
    ({"stats": [K, 3], "names": [...], "rows": [N, 2]}) and the sets' infos."""
    if cfg.data.forget is None:
        raise data.DataError("the hardness pre-flight compares two sets: data.forget is missing")
    if rows < 0:
        raise ValueError(f"rows must be ≥ 0, got {rows}")
    sets = check_inputs(cfg)
    with tempfile.TemporaryDirectory() as tmp, ray_session(cfg.cluster):
        config = {"job": cfg.model_dump(), "rows": rows}
        result = fit(cfg, Path(tmp) / "ray", loop=preflight_loop_per_worker, loop_config=config)
        if result.checkpoint is None:
            raise RuntimeError("the pre-flight reported no result")
        with result.checkpoint.as_directory() as reported:
            raw = json.loads((Path(reported) / PREFLIGHT_FILE).read_text())
    return raw, sets


def worker_user_error(exc) -> UserError | None:
    """The worker's UserError, if that is why the group failed: a diverged run (a
    NonFiniteStatsError, with the step it names) or a set's rows the task cannot use (found as
    the worker reads them). The user's to act on (lower the lr, mend the data), not an internal one."""
    for failure in exc.worker_failures.values():
        found, seen = None, failure
        while seen is not None:  # the innermost is the worker's own (Ray wraps it, message and all)
            if isinstance(seen, UserError):
                found = seen
            seen = seen.__cause__ or getattr(seen, "cause", None)
        if isinstance(found, NonFiniteStatsError):
            return NonFiniteStatsError(str(found), getattr(found, "step", None))
        if found is not None:
            return UserError(str(found))
    return None


class ProgressCallback(UserCallbackBase):
    """Runs in Ray Train's controller (maybe on another node): sends progress lines to the
    driver through a Ray queue. The worker reports every train.progress_every steps."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if metrics:
            self.queue.put_nowait(progress_line(metrics[0]))


PROGRESS_KEYS = {"loss/retain": "retain", "loss/forget": "forget", "hardness/cosine_mean": "cos",
                 "stop/margin": "margin", "surgery/weight": "w",
                 "monitor/forget_prob": "forget prob", "monitor/retain_prob": "retain prob"}


def progress_line(row: dict) -> str:
    if row.get("final"):
        return f"done: {row['steps']} steps, stop {row['stop']}"
    parts = [f"{short} {row[key]:.4g}" for key, short in PROGRESS_KEYS.items() if key in row]
    if row.get("stop", "none") != "none":
        parts.append(f"stop {row['stop']}")
    return f"step {row.get('step')}: " + ", ".join(parts)


def fit_showing_progress(trainer, queue, label: str):
    """trainer.fit() in a daemon thread while this one prints the progress lines. Ctrl-C (here,
    in the main thread) stops the waiting at once, not when the training ends (a thread pool
    would join the fit first): ray_session's shutdown then ends the run."""
    from ray.util.queue import Empty

    outcome = {}

    def fit_into_outcome():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # raised again below, in the caller's thread
            outcome["error"] = exc

    fitting = threading.Thread(target=fit_into_outcome, name="hamu-ray-fit", daemon=True)
    fitting.start()
    while fitting.is_alive() or not queue.empty():
        try:
            print(f"  [{label}] {queue.get(timeout=0.5)}", flush=True)
        except Empty:
            pass
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def publish(cfg: UnlearnConfig, sets: dict[str, data.SetInfo], result, staging: Path,
            wall_s: float, key_dir: Path) -> dict:
    """Copy the final export out of the Ray checkpoint and write the run summary (again, over
    what a failed earlier try copied, when a kept run is published on a retry)."""
    if result.checkpoint is None:
        raise RuntimeError("the run reported no final checkpoint")
    with result.checkpoint.as_directory() as exported:
        for entry in Path(exported).iterdir():  # the task's model export and the step log
            if entry.name == EXPORT_INFO:
                continue
            if entry.is_dir():
                shutil.copytree(entry, staging / entry.name, dirs_exist_ok=True)
            else:
                shutil.copy2(entry, staging / entry.name)
        info = json.loads((Path(exported) / EXPORT_INFO).read_text())
    digests_by_set = info.pop("set_digests", {})  # the workers' (data.DIGEST_RULE)
    summary = {
        **info,
        "method": cfg.method.name,
        "rule": cfg.method.rule_name,
        "wall_s": round(wall_s, 1),
        "sets": {name: {**asdict(info), **({"sha256": digests_by_set[name]} if name in digests_by_set else {})}
                 for name, info in sets.items()},
        "config": cfg.model_dump(),
    }
    (staging / "summary.json").write_text(json.dumps(summary, indent=2))
    if "forget" in sets:  # an unlearning job (not plain training): its receipt, beside the model
        step_log = [json.loads(line) for line in (staging / EXPORT_LOG).read_text().splitlines()]
        content = receipt.build(cfg, sets, summary, staging, step_log, digests.output_key(key_dir))
        (staging / "receipt.json").write_text(json.dumps(content, indent=2))
    return summary
