"""A pipeline, top to bottom: prepare → original → oracle → unlearn per method → evaluate → compare.

Each training stage is one engine job (`run_unlearning`), cached under
`output_dir/stages/<stage>-<key>` where the key hashes the stage's whole job (its inputs' paths
carry their own stages' keys), so a re-run skips finished stages and an edited config re-runs
only what it changed. Evaluation and the comparison take seconds and always run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from hamu_ray import digests, files, receipt
from hamu_ray.engine import monitor
from hamu_ray.pipeline import classifier_pipeline
from hamu_ray.pipeline import lm_pipeline
from hamu_ray.pipeline import outcomes
from hamu_ray.pipeline import plots
from hamu_ray.pipeline import user_data
from hamu_ray.engine.config import TrainSettings, UnlearnConfig
from hamu_ray.pipeline.config import PipelineConfig
from hamu_ray.engine.driver import monitor_values, ray_session, run_unlearning
from hamu_ray.pipeline import registry
from hamu_ray.pipeline import run_record
from hamu_ray.pipeline import seeds
from hamu_ray.pipeline.tracking import (Tracker, check_reachable, refuse_local_store_on_cluster, tracking_uri,
                                        ui_command)
from hamu_ray.engine.worker import EXPORT_LOG
from hamu_ray.errors import MissingInputError, OutputExistsError
from hamu_ray.rules import NonFiniteStatsError
from hamu_ray.schema import ConfigError
from hamu_ray.tasks.causal_lm import MODEL_DIR
from hamu_ray.tasks.classifier import EXPORT_WEIGHTS

PREPARE_VERSION = 1  # bump when the prepared files change for the same config
REFERENCES = ("original", "oracle")


@dataclass(frozen=True)
class StageOutput:
    name: str
    directory: Path
    cached: bool
    summary: dict
    registered_version: str | None = None  # the model registry's version, once registered
    run_id: str | None = None  # its MLflow child run in this invocation

    @classmethod
    def read(cls, directory: Path, name: str | None = None, cached: bool = True) -> "StageOutput":
        return cls(name or directory.name, directory, cached,
                   json.loads((directory / "summary.json").read_text()))

    @property
    def weights(self) -> Path:  # a classifier's export
        return self.directory / EXPORT_WEIGHTS

    @property
    def model_dir(self) -> Path:  # a language model's export (a Hugging Face directory)
        return self.directory / MODEL_DIR

    def export(self, cfg: PipelineConfig) -> Path:
        return self.model_dir if cfg.is_lm else self.weights

    def step_log(self) -> list[dict]:
        path = self.directory / EXPORT_LOG
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@dataclass(frozen=True)
class PipelineResult:
    rows: list[dict]
    table: str
    report_dir: Path
    tracking_uri: str
    parent_run_id: str
    runs: list[dict] = dataclasses.field(default_factory=list)  # one row per model run (every
    # method's seed); the same as rows with one seed
    notes: tuple[str, ...] = ()  # what the table cannot show by itself (outcomes.notes)

    @property
    def failed(self) -> dict[str, str]:
        """Runs that diverged or took no step → their stop cell (`hamu-ray run --strict`)."""
        return outcomes.failed_methods(self.runs or self.rows)


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    out = Path(cfg.output_dir).resolve()
    check_output_dir(out)
    uri = tracking_uri(cfg.tracking.uri, out)
    # A new output_dir goes again if the call fails before a training stage starts. The MLflow
    # store (sqlite in output_dir by default) opens only once the sets exist and Ray is up:
    # MLflow caches a store per URI, and one whose file was removed would swallow a retry's logs.
    check_reachable(uri)  # a server that is down fails here, before any data or worker
    with files.removed_unless_kept(out) as keep, contextlib.ExitStack() as ray:
        sets = prepare_sets(cfg, out)
        check_given_models(cfg, sets.paths)  # before Ray starts
        ray.enter_context(ray_session(cfg.cluster))
        refuse_local_store_on_cluster(uri)
        tracker = Tracker(uri, cfg.tracking.experiment, artifact_root=out / "mlartifacts",
                          buffer_dir=out / "mlflow-unsent")
        report = write_config(cfg, out / "report")
        with tracker.run(cfg.name, params=cfg.model_dump(by_alias=True), tags={"kind": "pipeline"}) as parent:
            tracker.log_artifact(report / "config.yaml")
            log_prepare(tracker, sets)
            keep()
            stages, diverged = run_stages(cfg, sets.paths, out, tracker)
            rows, table, runs = report_results(cfg, sets.paths, stages, diverged, report, tracker)
            original_version = getattr(stages["original"], "registered_version", None)  # None: the user's own
            registry.publish_unlearned(cfg, stages, runs, tracker, original_version)  # first seeds, not diverged

    notes = outcomes.notes(runs)
    print("\n" + table)
    for line in notes:
        print(f"warning: {line}")
    print(f"\nreport: {report}\nMLflow: {ui_command(uri)}", flush=True)
    tracker.finish()  # a server that stopped answering: the command that uploads the rest
    summary = outcomes.summary_line(runs)
    if summary:
        print(summary, flush=True)
    return PipelineResult(rows, table, report, uri, parent, runs, tuple(notes))


# What a pipeline or a search writes at the top of its output_dir: the stages, the report, the
# searches, the digest key, the default MLflow store (sqlite, with its journal files) and its artifacts.
OUTPUT_ENTRIES = ("stages", "report", "tune", digests.KEY_FILE, "mlflow.db", "mlartifacts", "mlflow-unsent")


def check_output_dir(out: Path) -> None:
    """A pipeline writes into a new or empty directory, or into a pipeline's earlier output (its
    stages are reused); a directory holding anything else is refused, so nothing is ever
    written beside the user's own files."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"output_dir {out} is a file; choose a new or empty directory")
    foreign = sorted(p.name for p in out.iterdir()
                     if p.name not in OUTPUT_ENTRIES and not p.name.startswith("mlflow.db-"))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise OutputExistsError(
            f"output_dir {out} holds files that are not a pipeline's output ({', '.join(foreign[:3])}{more}); "
            "choose a new or empty directory, or the output_dir of an earlier run")


def write_config(cfg: PipelineConfig, report: Path) -> Path:
    report.mkdir(exist_ok=True)
    files.write_atomic(report / "config.yaml", yaml.safe_dump(cfg.model_dump(by_alias=True), sort_keys=False))
    return report


def run_stages(cfg: PipelineConfig, prepared: dict[str, str], out: Path,
               tracker: Tracker) -> tuple[dict[str, StageOutput], list[outcomes.Diverged]]:
    """The references' and the methods' stages; a method whose run diverged is listed apart
    (it left no stage: a rerun tries it again) and the others go on."""
    stages = train_references(cfg, prepared, out, tracker)
    watch = monitor_section(cfg, prepared, stages, out)
    diverged = []
    for entry in cfg.methods:  # their models are published after the evaluation (registry)
        for name, job in seeded_jobs(cfg, entry, prepared, stages["original"].export(cfg), watch):
            try:
                stages[name] = run_stage(cfg, f"unlearn-{name}", job, out, tracker)
            except NonFiniteStatsError as exc:
                diverged.append(outcomes.Diverged(name, exc.step, str(exc)))
                print(f"[unlearn-{name}] diverged: {exc}", flush=True)
                with tracker.run(f"unlearn-{name}", params=job, tags={
                        "stage": f"unlearn-{name}", "cached": "False", "stop": "diverged",
                        "diverged_at_step": str(exc.step)}):
                    pass  # the child run records the failed stage; it has no metrics or model
    return stages, diverged


def seeded_jobs(cfg: PipelineConfig, entry, prepared: dict[str, str], original: Path,
                watch: dict | None) -> list[tuple[str, dict]]:
    """(run name, job) of the method's run with each seed (seeds); the first is its job as
    one seed runs it, so a pipeline given more seeds keeps that stage."""
    job = unlearning_job(cfg, entry, prepared, original, watch)
    return [(name, with_seed(job, seed)) for seed, name in cfg.seed_runs(entry.key)]


def with_seed(job: dict, seed: int) -> dict:
    """The job run with `seed` for its data order and its random draws (the first seed is the
    pipeline's data.seed: the job unchanged, so its stage key is too)."""
    return {**job, "data": {**job["data"], "shuffle_seed": seed}, "train": {**job["train"], "seed": seed}}


# ---- evaluation during unlearning ----------------------------------------------------------

def forget_tokens(cfg: PipelineConfig) -> str:
    """What every method's forget loss is on (a language model's answers, or their facts)."""
    return getattr(cfg.data, "forget_tokens", "answer") if cfg.is_lm else "answer"


def monitor_section(cfg: PipelineConfig, prepared: dict[str, str], references: dict,
                    out: Path) -> dict | None:
    """The engine's monitor section for every method: the samples, and the stop target (the
    oracle's forget probability on the same sample, measured by the workers' code)."""
    if cfg.monitor is None:
        return None
    m = cfg.monitor
    section = {**monitor_samples(cfg, prepared, out), "every": m.every, "batch_size": m.batch_size,
               "stop_forget_prob": None if m.stop_at == "oracle" else m.stop_at}
    if "oracle" in references:
        values = oracle_monitor_values(cfg, prepared, references["oracle"].export(cfg), section, out)
    if m.stop_at == "oracle":
        section["stop_forget_prob"] = values["monitor/forget_prob"]
        print(f"[monitor] the oracle's forget probability on the {m.forget_rows}-row sample is "
              f"{values['monitor/forget_prob']:.4g}: each method stops at its first evaluation at "
              f"or below it (every {m.every} steps)", flush=True)
    return section


def oracle_monitor_values(cfg: PipelineConfig, prepared: dict[str, str], oracle: Path, section: dict,
                          out: Path) -> dict:
    """The oracle's monitor values on the samples (its forget probability: the stop target; its
    per-row forget losses: the curves' forget quality), measured once and kept beside them."""
    path = oracle_values_file(section, oracle, out, forget_tokens(cfg))
    if not path.exists():
        job = job_dict(cfg, cfg.unlearn, method={"name": "ft"}, start=oracle,
                       data={"forget": prepared["forget"], "retain": prepared["retain"]})
        values = monitor_values(UnlearnConfig.model_validate(
            {**job, "monitor": section, "output_dir": str(out / "unused")}))
        files.write_atomic(path, json.dumps(values))
    return json.loads(path.read_text())


def oracle_values_file(section: dict, oracle: Path, out: Path, forget_on: str) -> Path:
    """Keyed by the oracle and, when not whole answers, the tokens its forget sample is scored on."""
    tokens = {"forget_tokens": forget_on} if forget_on != "answer" else {}
    return Path(section["forget"]).parent / f"oracle-{stage_key({'oracle': str(oracle), **tokens}, out)}.json"


def monitor_samples(cfg: PipelineConfig, prepared: dict[str, str], out: Path) -> dict[str, str]:
    """Seeded samples of the forget and retain sets (rows in file order), cached like a stage."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    sizes = {"forget": cfg.monitor.forget_rows, "retain": cfg.monitor.retain_rows}
    spec = {"sets": {role: prepared[role] for role in sizes}, "rows": sizes, "seed": cfg.data.seed}
    directory = out / "stages" / f"monitor-{stage_key(spec, out)}"
    paths = {role: str(directory / f"{role}.parquet") for role in sizes}
    if not (directory / "retain.parquet").exists():
        with files.staging_dir(directory) as staging:
            for role, size in sizes.items():
                ds = pads.dataset(prepared[role], format="parquet")
                total = ds.count_rows()
                rows = sorted(random.Random(f"{cfg.data.seed}/{role}").sample(range(total), min(size, total)))
                with files.atomic_path(staging / f"{role}.parquet", mode=0o600) as tmp:
                    pq.write_table(ds.take(pa.array(rows, pa.int64())), tmp)
    return paths


def report_results(cfg: PipelineConfig, prepared: dict[str, str], stages: dict[str, StageOutput],
                   diverged: list[outcomes.Diverged], report: Path,
                   tracker: Tracker) -> tuple[list[dict], str, list[dict]]:
    """The table's rows (a method's seeds as mean ± sd), its text, and the rows of every run
    (a diverged run's row empty but for its stop cell: outcomes.table_rows)."""
    print("evaluating", ", ".join(stages), flush=True)
    runs = task_pipeline(cfg).compare(cfg, prepared, stages, report)
    logs = {name: stage.step_log() for name, stage in stages.items() if name not in REFERENCES}
    order = [*REFERENCES, *(name for m in cfg.methods for _, name in cfg.seed_runs(m.key))]
    runs = outcomes.table_rows(runs, logs, diverged, order, table_columns(cfg))
    rows = seeds.table_rows(cfg, runs, table_columns(cfg))
    table = write_report(cfg, rows, stages, report, runs)
    spread = seeds.write_spread(cfg, runs, table_columns(cfg), report)
    run_record.write_run_record(cfg.name, cfg.seeds, report)
    names = ("comparison.csv", "comparison.md", "tradeoff.png", "hardness.png", "curves.png", "attacks.png",
             "per_example.parquet", lm_pipeline.PER_EXAMPLE_ATTACKED, run_record.RECORD, *seeds.SEED_FILES)
    for name in names:
        if (report / name).exists():
            tracker.log_artifact(report / name)
    tracker.log_metrics({f"{row['model']}/{key}": value for row in rows
                         for key, value in row.items() if key not in ("model", "stop")})
    return rows, table + ("\n\n" + spread if spread else ""), runs


# ---- stages --------------------------------------------------------------------------------

def stage_key(job: dict, out: Path) -> str:
    """Hash of a stage's job with the output directory factored out (so the folder can move), of
    the receipt format its stages write (a stage cached by an earlier format is not reused) and of
    the kernel pins it runs under, when any (kernels.KERNEL_ENV: they change the numbers)."""
    from hamu_ray.kernels import kernel_env

    pins = kernel_env()
    job = {key: value for key, value in job.items() if key != "evaluation"}  # scores, not the model
    keyed = {"job": job, "receipt": receipt.VERSION, **({"kernels": pins} if pins else {})}
    text = json.dumps(keyed, sort_keys=True).replace(str(out), "<out>")
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PreparedSets:
    spec: dict  # what the sets are made from (their stage key hashes it)
    directory: Path
    cached: bool
    info: dict  # prepare.json: per set its rows and sha256, the forgotten classes

    @property
    def paths(self) -> dict[str, str]:
        return {name: str(self.directory / f"{name}.parquet") for name in self.info["sets"]}


def prepare(cfg: PipelineConfig, out: Path, tracker: Tracker) -> dict[str, str]:
    """The parquet sets (forget, retain, train, test), cached like the training stages."""
    sets = prepare_sets(cfg, out)
    log_prepare(tracker, sets)
    return sets.paths


def task_pipeline(cfg: PipelineConfig):
    """The task's half of a pipeline (lm_pipeline or classifier_pipeline): build_sets,
    check_given_models, yardstick, measure, compare, table_columns, under the same names."""
    return lm_pipeline if cfg.is_lm else classifier_pipeline


def check_given_models(cfg: PipelineConfig, prepared: dict[str, str]) -> None:
    task_pipeline(cfg).check_given_models(cfg, prepared)


def prepared_directory(cfg: PipelineConfig, out: Path) -> tuple[dict, Path]:
    """What the sets are made from, and the directory they are (or will be) in."""
    data_spec = cfg.data.model_dump(by_alias=True, exclude={"batch_size"})
    if cfg.data.source == "files":  # an edited file at the same path must not reuse stale sets
        data_spec["sha256"] = user_data.content_digests(cfg)
    spec = {"version": PREPARE_VERSION, "data": data_spec}
    return spec, out / "stages" / f"prepare-{stage_key(spec, out)}"


def prepare_sets(cfg: PipelineConfig, out: Path) -> PreparedSets:
    spec, directory = prepared_directory(cfg, out)
    cached = (directory / "prepare.json").exists()
    if not cached:
        print(f"[prepare] {cfg.data.source}: building the sets", flush=True)
        with files.staging_dir(directory) as staging:
            info = build_sets(cfg, staging)
            (staging / "prepare.json").write_text(json.dumps(info, indent=2))
    sets = PreparedSets(spec, directory, cached, json.loads((directory / "prepare.json").read_text()))
    print(f"[prepare] {'cached' if cached else 'done'}: " +
          ", ".join(f"{k} {v['rows']} rows" for k, v in sets.info["sets"].items()), flush=True)
    return sets


def log_prepare(tracker: Tracker, sets: PreparedSets) -> None:
    """A child run with the sets' row counts and digests: never their rows."""
    counts = sets.info["sets"]
    with tracker.run("prepare", params=sets.spec, tags={"stage": "prepare", "cached": str(sets.cached)}):
        tracker.log_metrics({f"rows/{k}": v["rows"] for k, v in counts.items()})
        tracker.set_tags({f"digest/{k}": v["sha256"] for k, v in counts.items()})


def build_sets(cfg: PipelineConfig, directory: Path) -> dict:
    return task_pipeline(cfg).build_sets(cfg, directory)


def train_references(cfg: PipelineConfig, prepared: dict[str, str], out: Path,
                     tracker: Tracker) -> dict[str, StageOutput]:
    """The original model (trained on everything) and the oracle (retain set only); a user's
    given language models instead, when there are."""
    if (cfg.model.path if cfg.is_lm else cfg.model.weights) is not None:
        return user_data.given_models(cfg)  # checked before Ray started (check_given_models)
    start, oracle_set = None, "retain"
    if cfg.is_lm:
        start = lm_pipeline.initial_model(cfg, prepared, out, stage_key)
        lm_pipeline.check_scored_sets(cfg, prepared, [start])  # with its tokenizer, before training
        if cfg.pretrain is not None:  # shared: the original and the oracle differ only in the facts
            start = run_stage(cfg, "pretrain", pretraining_job(cfg, prepared, start), out, tracker).export(cfg)
        oracle_set = lm_pipeline.oracle_training_set(prepared)
    return {name: run_stage(cfg, name, evaluated(cfg, training_job(cfg, prepared[split], start), prepared), out,
                            tracker, register_as="original" if name == "original" else None)
            for name, split in (("original", "train"), ("oracle", oracle_set))}


def evaluated(cfg: PipelineConfig, job: dict, prepared: dict[str, str], attacked: bool = True) -> dict:
    """A language model's job whose model is compared: its workers score it after the last
    step, and (`attacked`) under the pipeline's attacks (lm_pipeline.compared_evaluation; not
    part of the stage's key)."""
    if not cfg.is_lm:
        return job
    section = (lm_pipeline.compared_evaluation(cfg, prepared) if attacked
               else lm_pipeline.evaluation_section(prepared))
    return {**job, "evaluation": section}


def pretraining_job(cfg: PipelineConfig, prepared: dict[str, str], start: Path) -> dict:
    """Plain-text training of the initial model on the built-in set's pretraining text."""
    return job_dict(cfg, cfg.pretrain, data=lm_pipeline.pretraining_data(cfg, prepared),
                    method={"name": "ft"}, start=start)


def training_job(cfg: PipelineConfig, retain: str, start: Path | None = None) -> dict:
    """Plain training on `retain` from `start` (a language model's initial directory; a
    classifier starts from its seeded initialisation)."""
    return job_dict(cfg, cfg.train, data={"forget": None, "retain": retain},
                    method={"name": "ft"}, start=start)


def unlearning_job(cfg: PipelineConfig, entry, prepared: dict[str, str], original: Path,
                   monitor: dict | None = None) -> dict:
    method = entry.model_dump(include={"name", "rule", "hparams", "objective"})
    job = evaluated(cfg, job_dict(cfg, cfg.unlearn_settings(entry), method=method, start=original,
                                  data={"forget": prepared["forget"], "retain": prepared["retain"]}), prepared)
    return {**job, "monitor": monitor} if monitor is not None else job


def job_dict(cfg: PipelineConfig, train: TrainSettings, *, data: dict, method: dict,
             start: Path | None) -> dict:
    batch = cfg.data.batch_size
    if cfg.is_lm:
        model = cfg.model.job_model(str(start), trains_adapters=method["name"] != "ft")
        data = {"text": cfg.data.text.model_dump(), **data}  # a stage's own text section wins
        tokens = forget_tokens(cfg)
        if data.get("forget") and tokens != "answer":  # (the default keeps keys as they were)
            data["forget_tokens"] = tokens
    else:
        model = {**cfg.model.model_dump(exclude={"oracle"}), "weights": None if start is None else str(start)}
    return {
        "data": {**data, "retain_batch_size": batch, "forget_batch_size": batch, "shuffle_seed": cfg.data.seed},
        "model": model,
        "method": method,
        "train": {**train.model_dump(), "seed": cfg.data.seed},
        "cluster": cfg.cluster.model_dump(),
    }


def stage_directory(name: str, job: dict, out: Path) -> Path:
    return out / "stages" / f"{name}-{stage_key(job, out)}"


def method_job(cfg: PipelineConfig, label: str, *, needs_sets: bool = True) -> UnlearnConfig:
    """The engine job of method `label`'s stage as `hamu-ray run` starts it (without a monitor:
    its target is measured by the run), on the sets and original model a run left in
    output_dir, or the user's own original. `needs_sets` False: only the model need be there
    (`hamu-ray plan` reads no data). For `hamu-ray plan` and `hardness` on a pipeline."""
    entry = cfg.method_entry(label)
    if entry is None:
        raise ConfigError(f"--method {label}: not a label of the pipeline's methods "
                          f"({', '.join(m.key for m in cfg.methods)})")
    out = Path(cfg.output_dir).resolve()
    _, sets = prepared_directory(cfg, out)
    prepared = {name: str(sets / f"{name}.parquet") for name in ("forget", "retain", "train", lm_pipeline.PRETRAIN)}
    original = original_export(cfg, prepared, out)
    made_here = {"the original model": original if cfg.given_original is None else None,
                 "the prepared sets": sets / "prepare.json" if needs_sets else None}
    missing = [f"{what} ({path})" for what, path in made_here.items() if path and not path.exists()]
    if missing:  # (the user's own original is checked where it is read)
        raise MissingInputError(f"--method {label}: not made yet: {' and '.join(missing)}; `hamu-ray run` "
                                "on the pipeline makes them (and keeps its finished stages), or give a job YAML")
    job = unlearning_job(cfg, entry, prepared, original)
    return UnlearnConfig.model_validate({**job, "output_dir": str(stage_directory(f"unlearn-{entry.key}", job, out))})


def original_export(cfg: PipelineConfig, prepared: dict[str, str], out: Path) -> Path:
    """Where the original model is: the user's own, or the export of its training stage."""
    if cfg.given_original is not None:
        return Path(cfg.given_original)
    start = lm_pipeline.initial_model_dir(cfg, prepared, out, stage_key) if cfg.is_lm else None
    if cfg.is_lm and cfg.pretrain is not None:
        start = stage_directory("pretrain", pretraining_job(cfg, prepared, start), out) / MODEL_DIR
    stage = stage_directory("original", training_job(cfg, prepared["train"], start), out)
    return stage / (MODEL_DIR if cfg.is_lm else EXPORT_WEIGHTS)


def cached_stage(name: str, job: dict, out: Path, *, progress: str | None = None,
                 callbacks=()) -> StageOutput:
    """`out/stages/<name>-<key>`, fitted by the engine unless a finished one is there (a pipeline
    stage and a search trial alike). `progress`: the label of the driver's lines (None: silent);
    `callbacks`: more Ray Train callbacks for the fit."""
    directory = stage_directory(name, job, out)
    cached = (directory / "summary.json").exists()
    if progress and cached:
        print(f"[{progress}] cached: {directory.name}", flush=True)
    elif progress:
        print(f"[{progress}] running ({job['method']['name']}, {job['cluster']['num_workers']} workers, "
              f"ZeRO-{job['train']['zero_stage']})", flush=True)
    if not cached:
        run_unlearning(UnlearnConfig.model_validate({**job, "output_dir": str(directory)}),
                       progress=progress, callbacks=callbacks, key_dir=out)  # one digest key per pipeline
    return StageOutput.read(directory, name, cached)


def run_stage(cfg: PipelineConfig, name: str, job: dict, out: Path, tracker: Tracker,
              register_as: str | None = None) -> StageOutput:
    """A pipeline stage (cached_stage) and its MLflow child run; with `register_as` (a role)
    its model is logged as an MLflow model and registered."""
    stage = cached_stage(name, job, out, progress=name)
    with tracker.run(name, params=job, tags={"stage": name, "cached": str(stage.cached),
                                             "stop": stage.summary["stop"]}) as run_id:
        tracker.log_steps(run_id, stage.step_log())
        tracker.log_metrics({"steps": stage.summary["steps"], "wall_s": stage.summary["wall_s"]})
        version = None
        if register_as is not None:
            version = registry.register(tracker, cfg, stage, role=register_as)
            tracker.set_tags({"registered_version": version})
    return dataclasses.replace(stage, registered_version=version, run_id=run_id)


# ---- evaluation and report -----------------------------------------------------------------

def yardstick(cfg: PipelineConfig, prepared: dict[str, str], oracle: Path):
    """What a search measures every trial against (a classifier's sets and oracle results;
    a language model's scored sets and the oracle's per-example scores)."""
    return task_pipeline(cfg).yardstick(cfg, prepared, oracle)


def measure(cfg: PipelineConfig, ruler, model: Path) -> dict[str, float]:
    """A model's metrics against the yardstick: for a classifier accuracies, losses, MIA and
    the comparison to the oracle (forget quality, gaps); for a language model TOFU's and MUSE's
    (scored by its job's workers: lm_pipeline.model_scores)."""
    return task_pipeline(cfg).measure(cfg, ruler, model)


def table_columns(cfg: PipelineConfig) -> tuple[str, ...]:
    """The comparison's columns, the attacks' before steps, stop and wall_s."""
    return task_pipeline(cfg).table_columns(cfg)


def write_report(cfg: PipelineConfig, rows: list[dict], stages: dict[str, StageOutput], report: Path,
                 runs: list[dict]) -> str:
    """comparison.csv, comparison.md (the table, then the notes on every run: outcomes.notes)
    and the plots; returns the table as text."""
    lm = cfg.is_lm
    columns = table_columns(cfg)
    table = seeds.write_table(rows, columns, report)  # with seeds: mean ± sd
    notes = "".join(f"\n- {line}" for line in outcomes.notes(runs))
    if notes:  # under the table: what it cannot show by itself
        files.write_atomic(report / "comparison.md", (report / "comparison.md").read_text() + f"\nNotes:\n{notes}\n")
    plots.tradeoff(rows, report / "tradeoff.png", plots.LM_AXES if lm else plots.CLASSIFIER_AXES)
    attacks = lm_pipeline.attack_names(cfg)
    if attacks:
        plots.attacks(rows, attacks, report / "attacks.png", "prob" if lm else "acc")
    else:  # an earlier run's would describe other runs
        (report / "attacks.png").unlink(missing_ok=True)
    logs = {name: stage.step_log() for name, stage in stages.items() if name not in REFERENCES}
    plots.hardness(logs, report / "hardness.png")
    monitors = [stage.summary["config"].get("monitor") for name, stage in stages.items()
                if name not in REFERENCES]
    if any(monitors):
        oracle = None
        if "oracle" in stages:
            path = oracle_values_file(monitors[0], stages["oracle"].export(cfg), Path(cfg.output_dir).resolve(),
                                      forget_tokens(cfg))
            oracle = json.loads(path.read_text())[monitor.ROW_LOSSES] if path.exists() else None
        plots.curves(logs, report / "curves.png", target=monitors[0]["stop_forget_prob"], oracle_losses=oracle)
    else:  # an earlier run's curves would describe other runs
        (report / "curves.png").unlink(missing_ok=True)
    return table
