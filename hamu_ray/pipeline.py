"""A pipeline, top to bottom: prepare → original → oracle → unlearn per method → evaluate → compare.

Each training stage is one engine job (`run_unlearning`), cached under
`output_dir/stages/<stage>-<key>` where the key hashes the stage's whole job (its inputs' paths
carry their own stages' keys), so a re-run skips finished stages and an edited config re-runs
only what it changed. Evaluation and the comparison take seconds and always run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from hamu_ray import data, datasets, evaluate, plots
from hamu_ray.config import PipelineConfig, StageTrain, UnlearnConfig
from hamu_ray.driver import ray_session, run_unlearning
from hamu_ray.tracking import Tracker, refuse_local_store_on_cluster, tracking_uri, ui_command
from hamu_ray.worker import EXPORT_LOG, EXPORT_WEIGHTS

PREPARE_VERSION = 1  # bump when the prepared files change for the same config
REFERENCES = ("original", "oracle")


@dataclass(frozen=True)
class StageOutput:
    name: str
    directory: Path
    cached: bool
    summary: dict

    @classmethod
    def read(cls, directory: Path, name: str | None = None, cached: bool = True) -> "StageOutput":
        return cls(name or directory.name, directory, cached,
                   json.loads((directory / "summary.json").read_text()))

    @property
    def weights(self) -> Path:
        return self.directory / EXPORT_WEIGHTS

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


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    out = Path(cfg.output_dir).resolve()
    (out / "stages").mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.tracking.uri, out)
    tracker = Tracker(uri, cfg.tracking.experiment, artifact_root=out / "mlartifacts")
    report = out / "report"
    report.mkdir(exist_ok=True)
    write_atomic(report / "config.yaml", yaml.safe_dump(cfg.model_dump(by_alias=True), sort_keys=False))

    with tracker.run(cfg.name, params=cfg.model_dump(by_alias=True), tags={"kind": "pipeline"}) as parent:
        tracker.log_artifact(report / "config.yaml")
        prepared = prepare(cfg, out, tracker)
        with ray_session(cfg.cluster):
            refuse_local_store_on_cluster(uri)
            stages = train_references(cfg, prepared, out, tracker)
            for entry in cfg.methods:
                job = unlearning_job(cfg, entry, prepared, stages["original"].weights)
                stages[entry.key] = run_stage(f"unlearn-{entry.key}", job, out, tracker, final_model=True)

        print("evaluating", ", ".join(stages), flush=True)
        rows = compare(cfg, prepared, stages)
        table = write_report(rows, stages, report)
        for name in ("comparison.csv", "comparison.md", "tradeoff.png", "hardness.png"):
            tracker.log_artifact(report / name)
        tracker.log_metrics({f"{row['model']}/{key}": value for row in rows
                             for key, value in row.items() if key not in ("model", "stop")})

    print("\n" + table)
    print(f"\nreport: {report}\nMLflow: {ui_command(uri)}", flush=True)
    return PipelineResult(rows, table, report, uri, parent)


# ---- stages --------------------------------------------------------------------------------

def stage_key(job: dict, out: Path) -> str:
    """Hash of a stage's job with the output directory factored out (so the folder can move)."""
    text = json.dumps(job, sort_keys=True).replace(str(out), "<out>")
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def prepare(cfg: PipelineConfig, out: Path, tracker: Tracker) -> dict[str, str]:
    """The parquet sets (forget, retain, train, test), cached like the training stages."""
    spec = {"version": PREPARE_VERSION, "data": cfg.data.model_dump(by_alias=True, exclude={"batch_size"})}
    directory = out / "stages" / f"prepare-{stage_key(spec, out)}"
    cached = (directory / "prepare.json").exists()
    if not cached:
        print(f"[prepare] {cfg.data.source}: building the forget / retain / test sets", flush=True)
        with staging_dir(directory) as staging:
            info = build_sets(cfg, staging)
            (staging / "prepare.json").write_text(json.dumps(info, indent=2))
    info = json.loads((directory / "prepare.json").read_text())
    print(f"[prepare] {'cached' if cached else 'done'}: " +
          ", ".join(f"{k} {v['rows']} rows" for k, v in info["sets"].items()), flush=True)
    with tracker.run("prepare", params=spec, tags={"stage": "prepare", "cached": str(cached)}):
        tracker.log_metrics({f"rows/{k}": v["rows"] for k, v in info["sets"].items()})
        tracker.mlflow.set_tags({f"digest/{k}": v["sha256"] for k, v in info["sets"].items()})
    return {name: str(directory / f"{name}.parquet") for name in info["sets"]}


def build_sets(cfg: PipelineConfig, directory: Path) -> dict:
    request = cfg.data.forget
    train, test = datasets.load_source(cfg.data.source, root=cfg.data.root, seed=cfg.data.seed)
    train = datasets.subsample(train, cfg.data.max_train_rows, cfg.data.seed)
    if request.kind == "class":
        forget_idx, retain_idx = datasets.class_forget_indices(
            train.y, request.forget_class, request.rho, cfg.data.seed)
    else:
        forget_idx, retain_idx = datasets.random_forget_indices(len(train.y), request.fraction, cfg.data.seed)
    paths = datasets.write_sets(directory, train, test, forget_idx, retain_idx)
    infos = {name: data.inspect_set(name, path, ["x", "y"]) for name, path in paths.items()}
    return {"sets": {name: {"rows": info.num_rows, "sha256": info.digest} for name, info in infos.items()},
            "forget_classes": forget_classes(cfg)}


def forget_classes(cfg: PipelineConfig) -> list[int]:
    return [cfg.data.forget.forget_class] if cfg.data.forget.kind == "class" else []


def train_references(cfg: PipelineConfig, prepared: dict[str, str], out: Path,
                     tracker: Tracker) -> dict[str, StageOutput]:
    """The original model (trained on everything) and the oracle (retain set only)."""
    return {name: run_stage(name, training_job(cfg, prepared[split]), out, tracker)
            for name, split in (("original", "train"), ("oracle", "retain"))}


def training_job(cfg: PipelineConfig, retain: str) -> dict:
    return job_dict(cfg, cfg.train, data={"forget": None, "retain": retain},
                    method={"name": "ft"}, weights=None)


def unlearning_job(cfg: PipelineConfig, entry, prepared: dict[str, str], original: Path) -> dict:
    method = entry.model_dump(include={"name", "rule", "hparams", "objective"})
    return job_dict(cfg, cfg.unlearn_settings(entry), method=method, weights=str(original),
                    data={"forget": prepared["forget"], "retain": prepared["retain"]})


def job_dict(cfg: PipelineConfig, train: StageTrain, *, data: dict, method: dict, weights) -> dict:
    batch = cfg.data.batch_size
    return {
        "data": {**data, "retain_batch_size": batch, "forget_batch_size": batch, "shuffle_seed": cfg.data.seed},
        "model": {**cfg.model.model_dump(), "weights": weights},
        "method": method,
        "train": {**train.model_dump(), "seed": cfg.data.seed},
        "cluster": cfg.cluster.model_dump(),
    }


def run_stage(name: str, job: dict, out: Path, tracker: Tracker, final_model: bool = False) -> StageOutput:
    directory = out / "stages" / f"{name}-{stage_key(job, out)}"
    cached = (directory / "summary.json").exists()
    if cached:
        print(f"[{name}] cached: {directory.name}", flush=True)
    else:
        print(f"[{name}] running ({job['method']['name']}, {job['cluster']['num_workers']} workers, "
              f"ZeRO-{job['train']['zero_stage']})", flush=True)
        run_unlearning(UnlearnConfig.model_validate({**job, "output_dir": str(directory)}), progress=name)
    stage = StageOutput.read(directory, name, cached)
    with tracker.run(name, params=job, tags={"stage": name, "cached": str(cached),
                                             "stop": stage.summary["stop"]}) as run_id:
        tracker.log_steps(run_id, stage.step_log())
        tracker.log_metrics({"steps": stage.summary["steps"], "wall_s": stage.summary["wall_s"]})
        if final_model:
            tracker.log_artifact(stage.weights, "model")
    return stage


# ---- evaluation and report -----------------------------------------------------------------

@dataclass(frozen=True)
class Yardstick:
    """What every model is measured against: the sets and the oracle's results on them."""
    sets: dict[str, tuple]
    forget_classes: list[int]
    oracle: dict[str, float]  # measured like any model (forget quality 1, gaps 0)
    oracle_forget_losses: np.ndarray


def yardstick(cfg: PipelineConfig, prepared: dict[str, str], oracle_weights: Path) -> Yardstick:
    splits = {name: datasets.read_split(prepared[name]) for name in ("forget", "retain", "test")}
    sets = {name: (split.x, split.y) for name, split in splits.items()}
    metrics, predictions = evaluate.evaluate(load_weights(cfg, oracle_weights), sets,
                                             forget_classes=forget_classes(cfg))
    losses = predictions["forget"].losses
    metrics.update(evaluate.compare_to_oracle(metrics, losses, metrics, losses))  # its own table row
    return Yardstick(sets, forget_classes(cfg), metrics, losses)


def measure(cfg: PipelineConfig, ruler: Yardstick, weights: Path) -> dict[str, float]:
    """Accuracies, losses, MIA, and the comparison to the oracle (forget quality, gaps)."""
    metrics, predictions = evaluate.evaluate(load_weights(cfg, weights), ruler.sets,
                                             forget_classes=ruler.forget_classes)
    metrics.update(evaluate.compare_to_oracle(metrics, predictions["forget"].losses,
                                              ruler.oracle, ruler.oracle_forget_losses))
    return metrics


def load_weights(cfg: PipelineConfig, weights: Path):
    from hamu_ray import models

    return models.build_model(cfg.model.model_copy(update={"weights": str(weights)}))


def compare(cfg: PipelineConfig, prepared: dict[str, str], stages: dict[str, StageOutput]) -> list[dict]:
    ruler = yardstick(cfg, prepared, stages["oracle"].weights)
    results = {}
    for name, stage in stages.items():  # original, oracle, then the methods
        summary = stage.summary
        measured = ruler.oracle if name == "oracle" else measure(cfg, ruler, stage.weights)
        results[name] = {**measured, "steps": summary["steps"],
                         "stop": summary["stop"], "wall_s": summary["wall_s"]}
    return evaluate.comparison_rows(results)


def write_report(rows: list[dict], stages: dict[str, StageOutput], report: Path) -> str:
    evaluate.write_csv(rows, report / "comparison.csv")
    write_atomic(report / "comparison.md", evaluate.to_markdown(rows) + "\n")
    plots.tradeoff(rows, report / "tradeoff.png")
    plots.hardness({name: stage.step_log() for name, stage in stages.items() if name not in REFERENCES},
                   report / "hardness.png")
    return evaluate.to_text(rows)


# ---- small helpers -------------------------------------------------------------------------

class staging_dir:
    """A directory that appears at `target` only if the block succeeds."""

    def __init__(self, target: Path):
        self.target = target
        self.staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.staging.mkdir(parents=True)
        return self.staging

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.staging.rename(self.target)
        else:
            shutil.rmtree(self.staging, ignore_errors=True)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
