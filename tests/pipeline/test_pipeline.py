"""The digits pipeline end to end on the real local Ray, DeepSpeed and a sqlite MLflow store;
then the same command with one method edited, killed while that method runs, and run again:
the finished stages come from the cache and the edited one continues from its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from hamu_ray.engine.config import parse_config
from hamu_ray.schema import ConfigError
from hamu_ray.pipeline.config import PipelineConfig, load_pipeline

PIPELINE = Path(__file__).parents[2] / "pipelines" / "digits.yaml"
STAGES = ["prepare", "original", "oracle", "unlearn-hamu-q"]


def digits_config(output_dir: Path, edit=None) -> PipelineConfig:
    raw = yaml.safe_load(PIPELINE.read_text())
    raw["output_dir"] = str(output_dir)
    if edit:
        edit(raw)
    return parse_config(raw, source=str(PIPELINE), schema=PipelineConfig)


def stage_log(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "step_log.jsonl").read_text().splitlines()]


def stage_dirs(out: Path, name: str) -> list[Path]:
    """The stages named `name` (any key; not `<name>-seed<s>`, another seed's run)."""
    return sorted((out / "stages").glob(f"{name}-" + "[0-9a-f]" * 12))


def runs_of(uri: str, parent_id: str) -> dict[str, mlflow.entities.Run]:
    client = mlflow.MlflowClient(uri)
    parent = client.get_run(parent_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {run.info.run_name: run for run in children}


def hamu_only(raw):  # GradDiff on a classifier pipeline runs in the own-files test below
    raw["methods"] = raw["methods"][:1]


def checkpointed_hamu(raw):  # a new stage key for HAMU-Q, the same math
    hamu_only(raw)
    raw["methods"][0]["train"] = {"checkpoint_every": 1}  # a report per step: the kill lands mid-run


@pytest.fixture(scope="module")
def pipeline_runs(digits_run_dir, ray_cluster, tmp_path_factory):  # one Ray for the pipelines run here
    """The digits pipeline with HAMU-Q its one method; then, with HAMU-Q checkpointing, `hamu-ray
    run` in a subprocess SIGKILLed while HAMU-Q runs; then that pipeline once more here: the
    finished stages come from the cache and HAMU-Q continues from its last registered checkpoint.
    Returns (out, first run, second run, the second run's printed lines, the killed driver's Ray
    processes)."""
    import contextlib
    import io

    from hamu_ray.pipeline.stages import run_pipeline

    out = digits_run_dir
    first = run_pipeline(digits_config(out, hamu_only))
    ray_processes = kill_mid_stage(digits_config(out, checkpointed_hamu), tmp_path_factory.mktemp("killed"),
                                   "unlearn-hamu-q", step=10)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        second = run_pipeline(digits_config(out, checkpointed_hamu))
    return out, first, second, printed.getvalue(), ray_processes


def kill_mid_stage(cfg: PipelineConfig, tmp: Path, stage: str, step: int) -> list:
    """`hamu-ray run` of `cfg` in a subprocess, SIGKILLed once Ray Train has registered a
    checkpoint at `step` or later in `stage`; returns the processes its embedded Ray ran."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from hamu_ray.engine.driver import latest_checkpoint

    path = tmp / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(by_alias=True)))
    stages = Path(cfg.output_dir) / "stages"
    with open(tmp / "driver.log", "w") as log:
        driver = subprocess.Popen([sys.executable, "-m", "hamu_ray.cli", "run", str(path)],
                                  stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    try:
        while not [s for s in stages.glob(f".{stage}-*.partial")
                   if (latest_checkpoint(s / "ray") or {}).get("metrics", {}).get("step", 0) >= step]:
            assert driver.poll() is None and time.monotonic() < deadline, (tmp / "driver.log").read_text()[-3000:]
            time.sleep(0.05)
        ray_processes = psutil.Process(driver.pid).children(recursive=True)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            driver.kill()
    return ray_processes


@pytest.mark.integration
def test_hamu_q_forgets_the_class_and_keeps_the_retained_classes(pipeline_runs):
    _, first, *_ = pipeline_runs
    rows = {row["model"]: row for row in first.rows}
    assert list(rows) == ["original", "oracle", "hamu-q"]
    original, hamu = rows["original"], rows["hamu-q"]
    assert hamu["forget_acc"] <= original["forget_acc"] - 0.30
    assert abs(hamu["test_acc_retained"] - original["test_acc_retained"]) <= 0.05
    assert rows["oracle"]["forget_acc"] < 0.05  # whole-class forgetting: the oracle never saw a 3


@pytest.mark.integration
def test_mlflow_holds_the_parent_children_metrics_and_plots(pipeline_runs):
    out, first, *_ = pipeline_runs
    assert first.tracking_uri == f"sqlite:///{out.resolve()}/mlflow.db"
    children = runs_of(first.tracking_uri, first.parent_run_id)
    assert sorted(children) == sorted(STAGES)
    client = mlflow.MlflowClient(first.tracking_uri)

    hamu = children["unlearn-hamu-q"]
    steps = int(hamu.data.metrics["steps"])
    for key in ("loss/forget", "hardness/cosine_mean", "guarantee/forget_gain", "stop/margin"):
        history = client.get_metric_history(hamu.info.run_id, key)
        assert len(history) == steps and [m.step for m in history] == list(range(1, steps + 1)), key
    assert hamu.data.params["method.name"] == "hamu-q" and hamu.data.tags["cached"] == "False"
    assert [a.path for a in client.list_artifacts(hamu.info.run_id)] == ["receipt.json"]

    parent_artifacts = {a.path for a in client.list_artifacts(first.parent_run_id)}
    assert {"tradeoff.png", "hardness.png", "comparison.csv", "comparison.md", "config.yaml", "run.json"} <= parent_artifacts
    for name in ("tradeoff.png", "hardness.png"):
        assert (first.report_dir / name).read_bytes()[:4] == b"\x89PNG"
    parent = client.get_run(first.parent_run_id)
    assert parent.data.metrics["hamu-q/forget_acc"] == pytest.approx(first.rows[2]["forget_acc"])

    # the forget set appears only as counts and digests
    prepare = children["prepare"]
    assert prepare.data.metrics["rows/forget"] > 0 and len(prepare.data.tags["digest/forget"]) == 16


@pytest.mark.integration
def test_the_registry_says_which_model_forgot_what(pipeline_runs):
    import hashlib

    import torch
    from safetensors.torch import load_file

    out, first, second, *_ = pipeline_runs
    client = mlflow.MlflowClient(first.tracking_uri)
    registered = client.search_model_versions("name = 'digits'")
    # the original once, each unlearned model once: the resumed HAMU-Q (a new stage, the same
    # weights) kept its version
    assert sorted(v.tags["stage"] for v in registered) == ["original", "unlearn-hamu-q"]
    versions = {v.tags["stage"]: v for v in registered}
    original = versions["original"]
    assert original.tags["role"] == "original" and len(original.tags["model_sha256"]) == 64
    hamu = versions["unlearn-hamu-q"]
    # a receipt describes the model and how it was made, not how the run was checkpointed: the
    # resumed stage's receipt is byte for byte the uninterrupted one's, and the tag names it
    receipts = [d / "receipt.json" for d in stage_dirs(out, "unlearn-hamu-q")]
    assert len(receipts) == 2 and receipts[0].read_bytes() == receipts[1].read_bytes()
    receipt_path = receipts[0]
    receipt = json.loads(receipt_path.read_text())
    assert hamu.tags == {**hamu.tags, "role": "unlearned", "method": "hamu-q",
                         "receipt_sha256": hashlib.sha256(receipt_path.read_bytes()).hexdigest(),
                         "forget_merkle_root": receipt["forget"]["merkle_root"],
                         "original_version": str(original.version)}
    # one model digest: the original's tag is what the receipt names as its input, the weights'
    # sha256; the unlearned version's tag is the receipt's model_out
    assert original.tags["model_sha256"] == receipt["model_in"]["sha256"] == hashlib.sha256(
        Path(receipt["model_in"]["path"]).read_bytes()).hexdigest()
    assert hamu.tags["model_sha256"] == receipt["model_out"]["sha256"] == hashlib.sha256(
        (receipt_path.parent / "model.safetensors").read_bytes()).hexdigest()
    # the receipt carries the evaluation against the oracle, the hardness trace and the verdict
    rows = {row["model"]: row for row in second.rows}
    evaluation = receipt["evaluation"]
    assert evaluation["against"] == "oracle"
    for name, key in (("model", "hamu-q"), ("original", "original"), ("oracle", "oracle")):
        assert evaluation[name] == {k: rows[key][k] for k in evaluation[name]}, name
    steps = rows["hamu-q"]["steps"]
    assert receipt["hardness"]["steps"] == steps and 0 <= receipt["hardness"]["conflicting_steps"] <= steps
    assert receipt["hardness"]["stop_margin"]["last"] == stage_log(receipt_path.parent)[-1]["stop/margin"]
    held = receipt["guarantee"]["held"]
    assert receipt["verdict"].startswith(f"hamu-q took {steps} steps") and f"held on {held} of" in receipt["verdict"]
    assert f"forget set is {rows['hamu-q']['forget_acc']:.3g}" in receipt["verdict"]
    assert "Forget quality" in receipt["verdict"]
    # the registered model is the stage's export, loadable through MLflow's pytorch flavour
    loaded = mlflow.pytorch.load_model(f"models:/digits/{hamu.version}")
    exported = load_file(receipt_path.parent / "model.safetensors")
    for name, value in loaded.state_dict().items():
        torch.testing.assert_close(value, exported[name], rtol=0, atol=0)


@pytest.mark.integration
def test_a_killed_run_reruns_from_the_cache_and_the_interrupted_stages_checkpoint(pipeline_runs):
    """The second run: every finished stage cached, HAMU-Q resumed from its checkpoint to the
    very model (and metrics) of the uninterrupted first run; the first results are kept."""
    import psutil
    import torch
    from safetensors.torch import load_file

    out, first, second, printed, ray_processes = pipeline_runs
    cached = {name: run.data.tags["cached"] for name, run in runs_of(second.tracking_uri, second.parent_run_id).items()}
    assert cached == {"prepare": "True", "original": "True", "oracle": "True",
                      "unlearn-hamu-q": "False"}
    for stage in ("prepare", "original", "oracle"):
        assert f"[{stage}] cached" in printed, stage
    assert "[unlearn-hamu-q] resuming the interrupted run" in printed
    summaries = {path: json.loads((path / "summary.json").read_text()) for path in stage_dirs(out, "unlearn-hamu-q")}
    [uninterrupted] = [p for p, s in summaries.items() if s["config"]["train"]["checkpoint_every"] is None]
    [resumed] = [p for p, s in summaries.items() if s["config"]["train"]["checkpoint_every"] == 1]
    assert summaries[resumed]["resumed_from_step"] >= 10
    assert summaries[resumed]["steps"] == summaries[uninterrupted]["steps"]
    expected = load_file(uninterrupted / "model.safetensors")
    for name, value in load_file(resumed / "model.safetensors").items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    before, after = ({row["model"]: row for row in run.rows} for run in (first, second))
    assert {k: v for k, v in after["hamu-q"].items() if k != "wall_s"} == \
        {k: v for k, v in before["hamu-q"].items() if k != "wall_s"}
    assert not list((out / "stages").glob(".*partial*"))  # no staging directory, no owner record
    # the killed driver's embedded Ray went with it (its agents notice within a minute)
    _, alive = psutil.wait_procs(ray_processes, timeout=60)
    assert not [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.integration
def test_two_seeds_add_one_stage_and_report_the_mean_and_spread(pipeline_runs, tmp_path):
    """seeds: 2 on the first run's pipeline: its HAMU-Q stage is the first seed's (cached), one
    new stage runs with seed 1; the table's row is the runs' mean ± sd, the registry keeps the
    first seed's model and evaluation. With robustness: the attacks (check_classifier_attacks)."""
    import contextlib
    import io

    from hamu_ray.pipeline.stages import run_pipeline

    out, first, *_ = pipeline_runs
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run_pipeline(digits_config(out, lambda raw: hamu_only(raw) or raw.update(seeds=2, robustness=ATTACKS)))
    cached = {name: run.data.tags["cached"] for name, run in runs_of(result.tracking_uri, result.parent_run_id).items()}
    assert cached == {"prepare": "True", "original": "True", "oracle": "True",
                      "unlearn-hamu-q": "True", "unlearn-hamu-q-seed1": "False"}
    runs = {row["model"]: row for row in result.runs}
    measured = {row["model"]: row for row in first.rows}["hamu-q"]  # the same model, measured the same
    assert {k: runs["hamu-q"][k] for k in measured} == measured  # (and now attacked too)
    [seed1] = (out / "stages").glob("unlearn-hamu-q-seed1-*")
    assert json.loads((seed1 / "summary.json").read_text())["config"]["data"]["shuffle_seed"] == 1
    first_model = stage_dirs(out, "unlearn-hamu-q")[0] / "model.safetensors"
    assert (seed1 / "model.safetensors").read_bytes() != first_model.read_bytes()  # another data order
    row = {r["model"]: r for r in result.rows}["hamu-q"]
    pair = [runs["hamu-q"]["forget_acc"], runs["hamu-q-seed1"]["forget_acc"]]
    assert row["seeds"] == 2 and row["forget_acc"] == pytest.approx(sum(pair) / 2)
    assert row["forget_acc_sd"] == pytest.approx(abs(pair[0] - pair[1]) / 2 ** 0.5)  # sd of two values
    assert " ± " in result.table and (result.report_dir / "comparison_seeds.csv").exists()
    assert "forget_quality: not compared (it needs two methods" in (result.report_dir / "spread.md").read_text()
    method_run = runs_of(result.tracking_uri, result.parent_run_id)["unlearn-hamu-q"]  # its stage's receipt, as
    logged = mlflow.MlflowClient(result.tracking_uri).download_artifacts(  # killed and resumed runs left another
        method_run.info.run_id, "receipt.json", str(tmp_path))
    receipt = json.loads(Path(logged).read_text())
    assert receipt["evaluation"]["model"]["forget_acc"] == runs["hamu-q"]["forget_acc"]
    check_classifier_attacks(result, runs, receipt, out)


ATTACKS = {"quantize": [8, 4], "relearn": {"share": 0.2, "steps": 4, "batch_size": 8}}


def check_classifier_attacks(result, runs: dict, receipt: dict, out: Path) -> None:
    """robustness on a classifier: per attack the forget accuracy after it (quantized: the models
    as fake_quantize leaves them; relearned: plain-torch AdamW at a tenth of train.lr on the
    held-apart forget rows, scored on the others), the recovered share, mean ± sd over the seeds,
    the plot and the receipt."""
    import copy

    import torch

    from hamu_ray.attacks.quantize import fake_quantize
    from hamu_ray.attacks.recovery import recovered_share
    from hamu_ray.attacks.relearn import batch_rows
    from hamu_ray.pipeline.lm_pipeline import relearn_split
    from hamu_ray.pipeline.classifier_pipeline import load_weights

    cfg = digits_config(out, lambda raw: hamu_only(raw) or raw.update(robustness=ATTACKS))
    forget = pq.read_table(next((out / "stages").glob("prepare-*/forget.parquet")))
    x = torch.tensor(forget.column("x").to_pylist(), dtype=torch.float32)
    y = torch.tensor(forget.column("y").to_pylist())
    trained, scored = relearn_split(next((out / "stages").glob("prepare-*/forget.parquet")), 0.2, 0)

    def relearned(model):
        tuned = copy.deepcopy(model).train()
        optimizer = torch.optim.AdamW(tuned.parameters(), lr=cfg.train.lr / 10, weight_decay=0.0)
        for rows in batch_rows(trained, 4, 8, 0):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(tuned(x[rows]), y[rows]).backward()
            optimizer.step()
        return tuned.eval()

    def correct(model):
        with torch.no_grad():
            return (model(x).argmax(-1) == y).numpy()

    from hamu_ray.receipt import model_digest

    unlearned = next(d for d in stage_dirs(out, "unlearn-hamu-q")  # the receipt's model
                     if model_digest(d / "model.safetensors") == receipt["model_out"]["sha256"])
    weights = {"original": stage_dirs(out, "original")[0], "oracle": stage_dirs(out, "oracle")[0], "hamu-q": unlearned}
    models = {name: load_weights(cfg, d / "model.safetensors") for name, d in weights.items()}
    plain = {name: correct(m) for name, m in models.items()}
    for name, model in models.items():
        row = runs[name]
        for attack, after, rows in (("int8", correct(fake_quantize(model, 8)), slice(None)),
                                    ("int4", correct(fake_quantize(model, 4)), slice(None)),
                                    ("relearn", correct(relearned(model)), scored)):
            accuracy = lambda c: float(c[rows].mean())  # noqa: E731
            assert row[f"forget_acc_{attack}"] == pytest.approx(accuracy(after), abs=1e-12), (name, attack)
            share = recovered_share(accuracy(plain["original"]), accuracy(plain[name]), accuracy(after))
            assert row[f"recovered_acc_{attack}"] == (None if share is None else pytest.approx(share))
        assert 0 <= row["forget_acc_benign"] <= 1
    assert runs["original"]["recovered_acc_relearn"] is None and runs["oracle"]["recovered_acc_int8"] is not None
    mean = {r["model"]: r for r in result.rows}["hamu-q"]
    pair = [runs["hamu-q"]["forget_acc_relearn"], runs["hamu-q-seed1"]["forget_acc_relearn"]]
    assert mean["forget_acc_relearn"] == pytest.approx(sum(pair) / 2) and "forget_acc_relearn_sd" in mean
    assert (result.report_dir / "attacks.png").read_bytes()[:4] == b"\x89PNG"
    assert receipt["evaluation"]["attacks"]["int4"]["recovered_acc"] == runs["hamu-q"]["recovered_acc_int4"]
    assert "Attacks brought back this share of its forgetting (forget accuracy" in receipt["verdict"]


COUNTRY_QA = PIPELINE.parent / "country_qa.yaml"


# ---- your own classifier and files ---------------------------------------------------------------

def byo_config(out: Path, stages: Path, files: Path, *, oracle: bool = True, edit=None) -> PipelineConfig:
    """The user's files (the built-in run's sets, columns renamed) and weights (its models)."""
    prepared = next(stages.glob("prepare-*"))
    for name in ("forget", "retain", "test"):
        if not (files / f"{name}.parquet").exists():
            pq.write_table(pq.read_table(prepared / f"{name}.parquet").rename_columns(["pixels", "label"]),
                           files / f"{name}.parquet")
    raw = {"name": "byo-digits", "output_dir": str(out),
           "data": {"source": "files", **{name: str(files / f"{name}.parquet") for name in ("forget", "retain", "test")},
                    "input_column": "pixels", "label_column": "label", "forget_classes": [3], "batch_size": 32},
           "model": {"kind": "mlp", "sizes": [64, 64, 10],
                     "weights": str(next(stages.glob("original-*")) / "model.safetensors"),
                     "oracle": str(next(stages.glob("oracle-*")) / "model.safetensors") if oracle else None},
           "train": {"lr": 0.01}, "unlearn": {"lr": 0.01, "max_steps": 2, "progress_every": 1},
           "methods": [{"name": "gdiff"}], "cluster": {"num_workers": 1}}
    if edit:
        edit(raw)
    return parse_config(raw, source="byo.yaml", schema=PipelineConfig)


@pytest.mark.integration
def test_a_users_classifier_and_files_run_without_training(pipeline_runs, tmp_path):
    """With an oracle every metric of the original equals the built-in run's (same weights,
    same rows); without one (same directory: only the evaluation runs again) the comparisons
    that need it are absent."""
    from hamu_ray.pipeline.stages import run_pipeline

    out, first, *_ = pipeline_runs
    result = run_pipeline(byo_config(tmp_path / "byo", out / "stages", tmp_path))
    rows = {row["model"]: row for row in result.rows}
    assert list(rows) == ["original", "oracle", "gdiff"]  # nothing trained here but the method
    assert rows["original"]["stop"] == "given" and rows["gdiff"]["steps"] == 2
    built_in = {row["model"]: row for row in first.rows}
    for model in ("original", "oracle"):
        for column in ("forget_acc", "test_acc_retained", "mia_auc", "forget_quality", "avg_gap"):
            assert rows[model][column] == pytest.approx(built_in[model][column], rel=1e-9), (model, column)

    alone = run_pipeline(byo_config(tmp_path / "byo", out / "stages", tmp_path, oracle=False))
    rows = {row["model"]: row for row in alone.rows}
    assert list(rows) == ["original", "gdiff"]
    assert all(row["forget_quality"] is None and row["avg_gap"] is None for row in rows.values())
    assert rows["original"]["forget_acc"] == pytest.approx(built_in["original"]["forget_acc"])


@pytest.mark.integration
def test_a_diverged_method_is_a_row_and_the_others_are_compared_and_registered(pipeline_runs, tmp_path):
    """GA at lr 1e30 diverges and HAMU-Q with an unreachable B stops infeasible at step 1: the
    pipeline still writes the table (GA's row says where it diverged, HAMU-Q's that it took no
    step), the plots and the notes, registers HAMU-Q's model but nothing of GA's, and caches
    nothing of GA (a rerun tries it again)."""
    import contextlib
    import io

    from hamu_ray.pipeline.stages import run_pipeline

    out, *_ = pipeline_runs

    def two_failing(raw):
        raw["methods"] = [{"name": "ga", "train": {"lr": 1e30}},  # one ascent step overflows float32
                          {"name": "hamu-q", "hparams": {"constraint": 1e6}}]  # no step in R gains B
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run_pipeline(byo_config(tmp_path / "byo", out / "stages", tmp_path, edit=two_failing))
    rows = {row["model"]: row for row in result.rows}
    assert list(rows) == ["original", "oracle", "ga", "hamu-q"]
    # step 1 is at the original's finite losses; the loss after its ascent step is the first NaN/Inf
    assert rows["ga"]["stop"] == "diverged: NaN/Inf at step 2"
    assert all(value is None for key, value in rows["ga"].items() if key not in ("model", "stop"))
    assert rows["hamu-q"]["stop"] == "took no step: infeasible at step 1"
    for column in ("forget_acc", "test_acc_retained", "mia_auc"):  # its model is the original
        assert rows["hamu-q"][column] == rows["original"][column], column
    assert result.failed == {"ga": "diverged: NaN/Inf at step 2", "hamu-q": "took no step: infeasible at step 1"}

    report = (result.report_dir / "comparison.md").read_text()
    assert "| ga | – |" in report and "diverged: NaN/Inf at step 2 |" in report
    assert "- ga diverged (NaN/Inf at step 2)" in report and "- hamu-q took no step (infeasible at step 1)" in report
    assert (result.report_dir / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    lines = printed.getvalue().splitlines()
    assert "warning: ga diverged (NaN/Inf at step 2): it has no model" in printed.getvalue()
    assert lines[-1] == ("warning: 1 method diverged (ga); 1 method took no step (hamu-q); "
                         "`hamu-ray run --strict` exits 1 on this")

    stages = tmp_path / "byo" / "stages"
    assert not list(stages.glob("unlearn-ga-*")) and not list(stages.glob(".unlearn-ga-*"))
    assert (next(stages.glob("unlearn-hamu-q-*")) / "summary.json").exists()
    children = runs_of(result.tracking_uri, result.parent_run_id)
    assert children["unlearn-ga"].data.tags["stop"] == "diverged"
    assert children["unlearn-ga"].data.tags["diverged_at_step"] == "2"
    registered = mlflow.MlflowClient(result.tracking_uri).search_model_versions("name = 'byo-digits'")
    assert sorted(v.tags["stage"] for v in registered) == ["unlearn-hamu-q"]  # the user's original is theirs


@pytest.mark.integration
def test_a_users_classifier_inputs_are_refused_before_ray(pipeline_runs, tmp_path):
    from hamu_ray.engine.data import DataError
    from hamu_ray.pipeline.stages import run_pipeline

    out, *_ = pipeline_runs
    stages = out / "stages"
    cfg = byo_config(tmp_path / "a", stages, tmp_path)
    retain = pq.read_table(tmp_path / "retain.parquet")
    forget = pq.read_table(tmp_path / "forget.parquet")
    pq.write_table(pa.concat_tables([retain, forget.slice(2, 2)]), tmp_path / "overlap.parquet")
    cfg = byo_config(tmp_path / "a", stages, tmp_path,
                     edit=lambda raw: raw["data"].update(retain=str(tmp_path / "overlap.parquet")))
    with pytest.raises(DataError, match=r"2 row\(s\) also in the retain set .*: forget row 2 = retain row \d+, forget row 3 = "):
        run_pipeline(cfg)
    cfg = byo_config(tmp_path / "b", stages, tmp_path, edit=lambda raw: raw["model"].update(sizes=[64, 32, 10]))
    with pytest.raises(DataError, match=r"model.weights .*original-.*: not weights of this model"):
        run_pipeline(cfg)
    pq.write_table(forget.set_column(1, "label", forget.column("label").cast(pa.float64())), tmp_path / "floats.parquet")
    cfg = byo_config(tmp_path / "c", stages, tmp_path,
                     edit=lambda raw: raw["data"].update(forget=str(tmp_path / "floats.parquet")))
    with pytest.raises(DataError, match=r"forget set .*floats.parquet: column pixels must hold a list .* label an integer"):
        run_pipeline(cfg)
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing left behind


@pytest.mark.parametrize("pipeline, edit, needle", [
    (PIPELINE, lambda raw: raw["data"]["forget"].update(rho=1.5), "data.forget.rho: Input should be less than or equal to 1"),
    (PIPELINE, lambda raw: raw["data"].update(source="cifar"),
     "data: source must be one of fashion-mnist, digits, country-qa, fictitious-qa, files"),
    (PIPELINE, lambda raw: raw["methods"].append({"name": "gdiff"}), "labels must be unique"),
    (PIPELINE, lambda raw: raw["methods"][0].update(train={"lr": -1}), "methods.0.train.lr: Input should be greater than 0"),
    (PIPELINE, lambda raw: raw["methods"][0].update(name="hamu-z"), "methods.0: Value error, unknown method 'hamu-z'"),
    (COUNTRY_QA, lambda raw: raw.update(model={"kind": "mlp", "sizes": [4, 2]}), "do not go together"),
    (COUNTRY_QA, lambda raw: raw["data"].update(forget_share=0.6, holdout_share=0.5), "must leave entities to retain"),
    (COUNTRY_QA, lambda raw: raw["model"]["init"].update(hidden_size=30), "must divide by heads"),
    (COUNTRY_QA, lambda raw: raw.update(
        model={"kind": "causal_lm", "path": "/models/x"}, tune={"method": "hamu-q", "space": {"radius": {"values": [0.1]}}},
        pretrain=None,
        data={"source": "files", "forget": "f.parquet", "retain": "r.parquet"}),
     "tune: the search ranks trials by forget quality against the oracle; give model.oracle"),
    (COUNTRY_QA, lambda raw: raw["model"].update(dtype="bf16"), "needs train.bf16 and unlearn.bf16"),
    (COUNTRY_QA, lambda raw: raw["model"].update(path="/models/x"), "give exactly one of init"),
    (COUNTRY_QA, lambda raw: raw["model"].update(init=None, path="/models/x"), "the country-qa set trains its own original"),
    (COUNTRY_QA, lambda raw: raw["model"].update(oracle="/models/x"), "an oracle model goes with path"),
    (COUNTRY_QA, lambda raw: raw.pop("pretrain"), "pretrain: Field required: a small Llama built here"),
    (COUNTRY_QA, lambda raw: raw.update(data={"source": "files", "forget": "f.parquet", "retain": "r.parquet"}),
     "pretrain: pretraining text is built for the built-in QA sets (country-qa, fictitious-qa) with model.init"),
    (COUNTRY_QA, lambda raw: raw["data"].update(source="files"), "data.forget: Field required"),
    (COUNTRY_QA, lambda raw: raw["data"]["text"].update(format="text"), "scores question/answer rows"),
    (PIPELINE, lambda raw: raw["model"].update(weights="/w.safetensors"), "model.weights: your own classifier goes with data.source files"),
    (PIPELINE, lambda raw: raw["data"].update(source="files", forget="f.parquet", retain="r.parquet"),
     "data.test: a classifier pipeline needs held-out rows"),
    (PIPELINE, lambda raw: raw.update(data={"source": "files", "forget": "f", "retain": "r", "test": "t", "holdout": "h"},
                                      model={"kind": "mlp", "sizes": [4, 2], "weights": "w"}),
     "data.holdout is for language-model pipelines"),
    (COUNTRY_QA, lambda raw: raw.update(monitor={"stop_at": 1.5}), "monitor.stop_at: Value error, a forget probability between 0 and 1"),
    (COUNTRY_QA, lambda raw: raw.update(monitor={"every": 0}), "monitor.every: Input should be greater than 0"),
    (COUNTRY_QA, lambda raw: raw.update(
        model={"kind": "causal_lm", "path": "/models/x"}, monitor={"stop_at": "oracle"}, pretrain=None,
        data={"source": "files", "forget": "f.parquet", "retain": "r.parquet"}),
     "monitor.stop_at: oracle needs an oracle model"),
    (COUNTRY_QA, lambda raw: raw.update(robustness={"quantize": [8, 3]}), "robustness.quantize.1: Input should be 8 or 4"),
    (COUNTRY_QA, lambda raw: raw.update(robustness={"quantize": [4, 4]}), "robustness.quantize: Value error, a width listed twice"),
    (COUNTRY_QA, lambda raw: raw.update(robustness={}), "robustness: Value error, no attack: give quantize"),
    (COUNTRY_QA, lambda raw: raw.update(robustness={"quantize": []}), "robustness.quantize: List should have at least 1 item"),
    (COUNTRY_QA, lambda raw: raw.update(robustness={"relearn": {"share": 1}}), "robustness.relearn.share: Input should be less than 1"),
    (COUNTRY_QA, lambda raw: raw.update(robustness={"relearn": {"steps": 0}}), "robustness.relearn.steps: Input should be greater than 0"),
    (COUNTRY_QA, lambda raw: raw.update(
        model={"kind": "causal_lm", "path": "/models/x"}, robustness={"relearn": {}}, pretrain=None, train=None,
        data={"source": "files", "forget": "f.parquet", "retain": "r.parquet"}),
     "robustness.relearn.lr: required with your own model"),
])
def test_pipeline_errors_name_the_file_and_the_field(tmp_path, pipeline, edit, needle):
    raw = yaml.safe_load(pipeline.read_text())
    edit(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert f"{path}: " in str(err.value) and needle in str(err.value), str(err.value)


# ---- without Ray ------------------------------------------------------------------------------

def fashion_config(output_dir: Path, root: Path) -> PipelineConfig:
    def from_empty_root(raw):
        raw["data"].update(source="fashion-mnist", root=str(root))
    return digits_config(output_dir, from_empty_root)


def test_a_failed_prepare_leaves_no_output_dir(tmp_path):
    from hamu_ray.pipeline.datasets import DatasetError
    from hamu_ray.pipeline.stages import run_pipeline

    (tmp_path / "empty").mkdir()
    out = tmp_path / "runs" / "fashion"
    with pytest.raises(DatasetError, match="lacks"):
        run_pipeline(fashion_config(out, tmp_path / "empty"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_a_failed_prepare_keeps_an_existing_output_dir(tmp_path):
    from hamu_ray.pipeline.datasets import DatasetError
    from hamu_ray.pipeline.stages import run_pipeline

    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    (out / "stages" / "original-abc").mkdir(parents=True)
    (out / "stages" / "original-abc" / "summary.json").write_text("{}")
    with pytest.raises(DatasetError):
        run_pipeline(fashion_config(out, tmp_path / "empty"))
    assert (out / "stages" / "original-abc" / "summary.json").read_text() == "{}"


def test_a_directory_of_other_files_is_refused_and_a_pipelines_own_output_is_reused(tmp_path):
    import os

    from hamu_ray.errors import OutputExistsError
    from hamu_ray.pipeline.stages import check_output_dir, run_pipeline

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match=r"output_dir .*mine holds files that are not a pipeline's output \(notes.txt\)"):
        run_pipeline(digits_config(mine))
    assert os.listdir(mine) == ["notes.txt"]  # nothing written beside it
    earlier = tmp_path / "earlier"  # what a pipeline and a search leave
    for name in ("stages", "report", "tune", "mlartifacts", "mlflow-unsent"):
        (earlier / name).mkdir(parents=True)
    for name in ("mlflow.db", "mlflow.db-journal", "digest.key"):
        (earlier / name).write_text("")
    (tmp_path / "empty").mkdir()
    for directory in (earlier, tmp_path / "empty", tmp_path / "new"):
        check_output_dir(directory)


def test_cached_stage_runs_a_job_once_then_reuses_it(tmp_path, monkeypatch):
    from hamu_ray.pipeline import stages as pipeline

    calls = []

    def fake_run(cfg, progress=None, callbacks=(), key_dir=None):
        calls.append((cfg.output_dir, progress, list(callbacks)))
        Path(cfg.output_dir).mkdir(parents=True)
        (Path(cfg.output_dir) / "summary.json").write_text('{"steps": 3, "stop": "none"}')

    monkeypatch.setattr(pipeline, "run_unlearning", fake_run)
    cfg = digits_config(tmp_path)
    job = pipeline.training_job(cfg, str(tmp_path / "retain.parquet"))
    first = pipeline.cached_stage("trial-x", job, tmp_path, callbacks=["cb"])
    again = pipeline.cached_stage("trial-x", job, tmp_path, progress="trial-x")
    assert first.directory == again.directory == tmp_path / "stages" / f"trial-x-{pipeline.stage_key(job, tmp_path)}"
    assert calls == [(str(first.directory), None, ["cb"])]
    assert (first.cached, again.cached, again.summary["steps"]) == (False, True, 3)


@pytest.mark.parametrize("data, model", [
    ({"source": "files", "forget": "f", "retain": "r", "test": "t"}, {"kind": "mlp", "sizes": [4, 2], "weights": "w", "oracle": "o"}),
    ({"source": "files", "forget": "f", "retain": "r", "holdout": "h"}, {"kind": "causal_lm", "path": "/m", "oracle": "/o"}),
])
def test_a_dumped_pipeline_of_your_own_files_validates_again(data, model):
    """Search trials and submitted jobs re-validate the dump, which repeats every default."""
    raw = {"name": "byo", "output_dir": "out", "data": data, "model": model, "train": {"lr": 0.1},
           "unlearn": {"lr": 0.1}, "methods": [{"name": "gdiff"}]}
    cfg = parse_config(raw, source="byo.yaml", schema=PipelineConfig)
    assert PipelineConfig.model_validate(cfg.model_dump(by_alias=True)) == cfg


@pytest.mark.parametrize("data, model", [
    ({"source": "files", "forget": "f", "retain": "r", "test": "t"}, {"kind": "mlp", "sizes": [4, 2], "weights": "w"}),
    ({"source": "files", "forget": "f", "retain": "r"}, {"kind": "causal_lm", "path": "/m"}),
])
def test_your_own_original_needs_no_train_section_and_one_trained_here_does(data, model):
    """Only the methods train with your own model (README): `train:` is left out, and survives
    the dump's round trip as null; a pipeline that trains its original asks for it."""
    raw = {"name": "byo", "output_dir": "out", "data": data, "model": model,
           "unlearn": {"lr": 0.1}, "methods": [{"name": "gdiff"}]}
    cfg = parse_config(raw, source="byo.yaml", schema=PipelineConfig)
    assert cfg.train is None and PipelineConfig.model_validate(cfg.model_dump(by_alias=True)) == cfg
    raw["model"] = {**model, "weights": None} if model["kind"] == "mlp" else {
        "kind": "causal_lm", "init": {"hidden_size": 8, "intermediate_size": 16, "layers": 1, "heads": 2}}
    if model["kind"] == "mlp":
        raw["data"] = {"source": "digits"}
    with pytest.raises(ConfigError, match="byo.yaml: train: Field required: the pipeline trains its original"):
        parse_config(raw, source="byo.yaml", schema=PipelineConfig)


def test_a_methods_job_is_the_one_run_starts_from_the_stages_it_left(tmp_path):
    """`hamu-ray hardness/plan PIPELINE --method LABEL`: the job of that stage, on the prepared
    sets and the original's export as a run leaves them in output_dir; until then, one error."""
    from hamu_ray.errors import MissingInputError
    from hamu_ray.pipeline import stages

    cfg = digits_config(tmp_path / "run")
    with pytest.raises(MissingInputError, match="--method gdiff: not made yet: the original model "
                       r"\(.*/stages/original-\w+/model.safetensors\) and the prepared sets"):
        stages.method_job(cfg, "gdiff")
    with pytest.raises(ConfigError, match=r"--method gdif: not a label of the pipeline's methods \(hamu-q, gdiff\)"):
        stages.method_job(cfg, "gdif")
    out = Path(cfg.output_dir).resolve()
    _, sets = stages.prepared_directory(cfg, out)
    prepared = {name: str(sets / f"{name}.parquet") for name in ("forget", "retain", "train")}
    original = stages.stage_directory("original", stages.training_job(cfg, prepared["train"]), out)
    for made in (sets / "prepare.json", original / "model.safetensors"):
        made.parent.mkdir(parents=True, exist_ok=True)
        made.write_text("{}")
    job = stages.method_job(cfg, "gdiff")
    expected = stages.unlearning_job(cfg, cfg.method_entry("gdiff"), prepared, original / "model.safetensors")
    assert job.model_dump(exclude={"output_dir"}) == parse_config({**expected, "output_dir": "x"}).model_dump(
        exclude={"output_dir"})
    assert (job.method.name, job.train.lr, job.data.forget) == ("gdiff", 0.01, str(sets / "forget.parquet"))


# ---- privacy: no forget row in anything the pipeline stores or logs ---------------------------

WINDOW = 8  # consecutive pixel values that identify a row's content


def pixel_windows(rows) -> set[tuple[float, ...]]:
    """Every run of WINDOW consecutive values of the rows with at least 4 non-zero ones (the
    digits' borders are zeros: all-zero runs would match any zero-filled text)."""
    return {tuple(round(v, 4) for v in row[i:i + WINDOW]) for row in rows
            for i in range(len(row) - WINDOW + 1) if sum(v != 0 for v in row[i:i + WINDOW]) >= 4}


def leaked_windows(blob: bytes, windows: set, raw: set[bytes]) -> int:
    """Windows of the rows found in a file: as float32/float64 bytes, or as a run of numbers in
    its text (any separator, any formatting: JSON lists, numpy reprs, CSV)."""
    import re

    if any(r in blob for r in raw):
        return 1
    numbers = [round(float(x), 4) for x in re.findall(rb"-?\d+(?:\.\d+)?(?:[eE]-?\d+)?", blob)]
    return len({tuple(numbers[i:i + WINDOW]) for i in range(len(numbers) - WINDOW + 1)} & windows)


@pytest.mark.integration
def test_the_store_report_receipts_and_ray_logs_hold_no_forget_pixels(pipeline_runs, tmp_path):
    import numpy as np
    import ray

    out, *_ = pipeline_runs
    rows = pq.read_table(next((out / "stages").glob("prepare-*")) / "forget.parquet").column("x").to_pylist()
    windows = pixel_windows(rows)
    raw = {np.asarray(w, dtype=dtype).tobytes() for w in list(windows)[:200] for dtype in (np.float32, np.float64)}
    # the detector finds a row however it is written
    row = rows[0]
    for planted in (json.dumps(row), str(np.asarray(row)), ",".join(map(str, row)), np.asarray(row, np.float32).tobytes()):
        assert leaked_windows(planted if isinstance(planted, bytes) else planted.encode(), windows, raw), planted[:40]

    stored = [p for p in (out / "report").rglob("*") if p.is_file()] + [out / "mlflow.db"]
    stored += [p for p in (out / "mlartifacts").rglob("*") if p.is_file()]
    stored += [p for name in ("receipt.json", "summary.json", "step_log.jsonl") for p in (out / "stages").rglob(name)]
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    stored += [p for p in logs.rglob("*") if p.is_file()]  # the workers' and Ray's own logs
    assert any(p.name == "receipt.json" for p in stored) and any(p.suffix in (".out", ".err") for p in stored)
    found = {str(p): n for p in stored if (n := leaked_windows(p.read_bytes(), windows, raw))}
    assert not found, f"forget pixels in {found}"
