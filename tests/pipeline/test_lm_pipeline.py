"""The country QA pipeline end to end on the real local Ray, DeepSpeed and a sqlite MLflow
store, in a small configuration: the sets, a small Llama built and trained here, the oracle,
an unlearning method, evaluation on each stage's workers (with two attacks); the same pipeline
run again into a fresh directory (the same table, bit for bit); then the same as a user's own
model and files, the report. Nothing of the forget rows' text
reaches the report or the tracking store."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from hamu_ray.engine.config import parse_config
from hamu_ray.pipeline.config import PipelineConfig
from hamu_ray.schema import ConfigError
from hamu_ray.pipeline.lm_evaluate import TABLE_COLUMNS
from tests.lm_fixtures import qa_rows

PIPELINE = Path(__file__).parents[2] / "pipelines" / "country_qa.yaml"


def qa_config(output_dir: Path, edit=None) -> PipelineConfig:
    raw = yaml.safe_load(PIPELINE.read_text())
    raw["output_dir"] = str(output_dir)
    if edit:
        edit(raw)
    return parse_config(raw, source=str(PIPELINE), schema=PipelineConfig)


def small(raw: dict) -> None:
    raw.pop("robustness", None)  # the demo's attacks: one fixture runs its own
    raw["data"].update(forget_share=0.05, eval_retain_rows=40)
    raw["model"]["init"] = {"hidden_size": 32, "intermediate_size": 64, "layers": 1, "heads": 2,
                            "vocab_size": 512}
    raw["pretrain"].update(epochs=1, max_steps=10, progress_every=5)
    raw["train"].update(epochs=1, progress_every=20)
    raw["unlearn"].update(max_steps=4, progress_every=2)
    raw["methods"] = [{"name": "hamu-q", "hparams": {"constraint": 0.1, "radius": 0.2}}]
    raw["cluster"] = {"num_workers": 1}
    raw["monitor"] = {"every": 2, "forget_rows": 8, "retain_rows": 8, "stop_at": "oracle"}


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory, ray_cluster):  # one Ray for both pipelines of this module
    from hamu_ray.pipeline.stages import run_pipeline

    out = tmp_path_factory.mktemp("country-qa") / "run"
    attacks = {"quantize": [4], "relearn": {"steps": 3, "batch_size": 4, "benign": False}}
    cfg = qa_config(out, lambda raw: (small(raw), raw.update(robustness=attacks)))
    result = run_pipeline(cfg)
    return out, cfg, result


@pytest.mark.integration
def test_every_model_is_scored_and_the_oracle_is_its_own_yardstick(qa_run):
    from hamu_ray.pipeline.stages import table_columns

    _, cfg, result = qa_run
    rows = {row["model"]: row for row in result.rows}
    assert list(rows) == ["original", "oracle", "hamu-q"]
    for row in rows.values():
        assert list(row) == list(table_columns(cfg))
        assert all(math.isfinite(row[c]) for c in TABLE_COLUMNS if c not in ("model", "stop")), row
        assert 0 <= row["forget_rouge"] <= 1 and 0 <= row["model_utility"] <= 1
    assert rows["oracle"]["forget_quality"] == 1.0 and rows["oracle"]["priv_leak"] == 0.0
    assert "forget_quality" in result.table and "hamu-q" in result.table


@pytest.mark.integration
def test_the_same_pipeline_run_again_into_a_fresh_directory_gives_the_same_table_bit_for_bit(qa_run, tmp_path):
    """Same config, same machine, same seeds: every stage trained and scored again from nothing
    (a fresh output directory: no cache, a new digest key, a new MLflow store) gives every cell
    of the table as before, wall-clock seconds aside (issue: runs that reproduce)."""
    from hamu_ray.pipeline.stages import run_pipeline, table_columns

    _, cfg, first = qa_run
    again = run_pipeline(cfg.model_copy(update={"output_dir": str(tmp_path / "again")}))
    drop = lambda row: {k: v for k, v in row.items() if k != "wall_s"}  # noqa: E731
    assert [drop(r) for r in again.rows] == [drop(r) for r in first.rows]
    assert len(first.rows) == 3  # original, oracle, hamu-q: every metric and both attacks' columns
    assert all(list(drop(r)) == [c for c in table_columns(cfg) if c != "wall_s"] for r in first.rows)


@pytest.mark.integration
def test_each_stage_scores_its_own_model_on_its_workers_and_the_table_reads_those_scores(qa_run):
    """original, oracle and every method: the job scored its final model before exiting, and
    its forget set again under each attack (evaluation.npz beside it); the report's per-example
    rows are those numbers, and no evaluation-only job ran (no model scored twice)."""
    from hamu_ray.engine import evaluation
    from hamu_ray.pipeline import lm_metrics

    out, _, result = qa_run
    stages = out / "stages"
    per_example = pq.read_table(result.report_dir / "per_example.parquet").to_pylist()
    attacked_rows = pq.read_table(result.report_dir / "per_example_attacked.parquet").to_pylist()
    for name, pattern in (("original", "original-*"), ("oracle", "oracle-*"), ("hamu-q", "unlearn-hamu-q-*")):
        stage = next(stages.glob(pattern))
        scores = evaluation.read_scores(stage / evaluation.SCORES_FILE)
        plain = {s for s in scores if "@" not in s}
        assert plain == {r["set"] for r in per_example if r["model"] == name} >= {"forget", "retain", "holdout"}
        assert set(scores) - plain == {"forget@int4", "forget@relearn"}
        assert json.loads((stage / "summary.json").read_text())["evaluation_s"] > 0
        for set_name in plain:
            reported = [r["probability"] for r in per_example if r["model"] == name and r["set"] == set_name]
            s = scores[set_name]
            assert reported == pytest.approx(lm_metrics.probability(s["logprob"], s["count"]).tolist(), rel=1e-12)
        for attack in ("int4", "relearn"):
            reported = [r["probability"] for r in attacked_rows if r["model"] == name and r["attack"] == attack]
            s = scores[f"forget@{attack}"]
            assert reported == pytest.approx(lm_metrics.probability(s["logprob"], s["count"]).tolist(), rel=1e-12)
    assert not list(stages.glob("evaluate-*"))


def test_a_stages_key_leaves_out_its_evaluation_section(tmp_path):
    """The scored sets ride along with every compared job, but a stage's key is its model's:
    stages cached before they evaluated are reused (scored by an evaluation-only job)."""
    from hamu_ray.pipeline.stages import stage_key, unlearning_job

    cfg = qa_config(tmp_path / "out", lambda raw: raw.pop("robustness"))
    prepared = {name: f"/sets/{name}.parquet" for name in ("forget", "retain", "retain_eval", "holdout")}
    job = unlearning_job(cfg, cfg.methods[0], prepared, Path("/m"))
    assert job["evaluation"]["sets"] == {"forget": "/sets/forget.parquet", "retain": "/sets/retain_eval.parquet",
                                         "holdout": "/sets/holdout.parquet"}
    plain = {key: value for key, value in job.items() if key != "evaluation"}
    assert stage_key(job, tmp_path) == stage_key(plain, tmp_path)


def test_an_evaluation_only_job_is_kept_by_what_it_scored(tmp_path):
    """A cached model scored once without attacks is scored again when they are asked for (and
    for other sets, or changed model files): the pipeline then reads every attack's scores."""
    from hamu_ray.pipeline.lm_pipeline import Attack, evaluation_dir, evaluation_job, evaluation_section

    cfg = qa_config(tmp_path / "out")
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"weights")
    prepared = {name: f"/sets/{name}.parquet" for name in ("forget", "retain", "retain_eval", "holdout")}
    job = evaluation_job(cfg, prepared, model)
    plain = evaluation_section(prepared)
    attacked = evaluation_section(prepared, {"int8": Attack({"quantize_bits": 8})})
    other_sets = evaluation_section({**prepared, "holdout": "/sets/other.parquet"})
    dirs = [evaluation_dir(cfg, job, model, wanted) for wanted in (plain, attacked, other_sets)]
    assert len(set(dirs)) == 3 and dirs[0] == evaluation_dir(cfg, job, model, plain)
    (model / "model.safetensors").write_bytes(b"other weights")
    assert evaluation_dir(cfg, job, model, plain) != dirs[0]


def forget_means(rows: list[dict]) -> dict[str, float | None]:
    """The table's forget metrics of some per-example rows, by hand."""
    facts = [r["fact_probability"] for r in rows if r["fact_probability"] is not None]
    return {"prob": sum(r["probability"] for r in rows) / len(rows),
            "rouge": sum(r["rouge_l_recall"] for r in rows) / len(rows),
            "fact": sum(facts) / len(facts) if facts else None}


@pytest.mark.integration
def test_the_attacks_rescore_every_models_forget_set_and_its_recovered_share(qa_run):
    """robustness: int4 and relearning. Each model's forget rows scored again by its stage's
    workers after each attack (per_example_attacked.parquet); the table's columns are their
    means and the recovered share against the original, which has none, on the rows the attack
    did not train on: relearning trains on whole entities of the forget set, never scores them."""
    from hamu_ray.attacks.recovery import recovered_share

    out, cfg, result = qa_run
    rows = {row["model"]: row for row in result.rows}
    per_example = pq.read_table(result.report_dir / "per_example.parquet").to_pylist()
    attacked_rows = pq.read_table(result.report_dir / "per_example_attacked.parquet").to_pylist()
    client = mlflow.MlflowClient(result.tracking_uri)
    logged = client.get_run(result.parent_run_id).data.metrics
    assert {"per_example_attacked.parquet", "attacks.png"} <= {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert (result.report_dir / "attacks.png").read_bytes()[:4] == b"\x89PNG"
    forget = pq.read_table(next((out / "stages").glob("prepare-*/forget.parquet"))).to_pylist()
    plain = {name: [r for r in per_example if r["model"] == name and r["set"] == "forget"] for name in rows}
    for attack in ("int4", "relearn"):
        for name, row in rows.items():
            attacked = [r for r in attacked_rows if r["model"] == name and r["attack"] == attack]
            assert [r["row_digest"] for r in attacked] == [r["row_digest"] for r in plain[name]]
            trained = [r["trained_on"] for r in attacked]
            if attack == "relearn":  # whole entities, at least one, never all
                held = {forget[i]["entity"] for i, t in enumerate(trained) if t}
                assert held and 0 < sum(trained) < len(trained)
                assert all(t == (f["entity"] in held) for t, f in zip(trained, forget))
            else:
                assert not any(trained)
            scored = lambda rs: [r for r, t in zip(rs, trained) if not t]  # noqa: E731
            model, original, after = (forget_means(scored(rs)) for rs in (plain[name], plain["original"], attacked))
            for metric in ("prob", "rouge", "fact"):
                assert row[f"forget_{metric}_{attack}"] == pytest.approx(after[metric], rel=1e-9)
                share = recovered_share(original[metric], model[metric], after[metric])
                assert row[f"recovered_{metric}_{attack}"] == (None if share is None else pytest.approx(share))
            if name == "original":
                assert row[f"recovered_prob_{attack}"] is None
            else:
                assert math.isfinite(row[f"recovered_prob_{attack}"])
                assert logged[f"{name}/recovered_prob_{attack}"] == pytest.approx(row[f"recovered_prob_{attack}"])
    assert "recovered_prob_int4" in result.table and "recovered_prob_relearn" in result.table
    receipt = json.loads(next((out / "stages").glob("unlearn-hamu-q-*/receipt.json")).read_text())
    for attack in ("int4", "relearn"):
        assert receipt["evaluation"]["attacks"][attack] == {
            "forget_prob": rows["hamu-q"][f"forget_prob_{attack}"], "recovered_prob": rows["hamu-q"][f"recovered_prob_{attack}"],
            "oracle_recovered_prob": rows["oracle"][f"recovered_prob_{attack}"]}
        assert f"{attack} {rows['hamu-q'][f'recovered_prob_{attack}']:.2f} (oracle" in receipt["verdict"]


@pytest.mark.integration
def test_methods_are_evaluated_during_the_run_and_stop_at_the_oracles_forget_probability(qa_run):
    """The stop target is the oracle's mean answer probability on the monitor's forget sample
    (checked against the evaluation's own per-row scores of those rows); the method stops at
    its first evaluation at or below it, or runs its 4 steps without reaching it."""
    from hamu_ray import digests
    from hamu_ray.pipeline.stages import StageOutput

    out, cfg, result = qa_run
    stage = StageOutput.read(next((out / "stages").glob("unlearn-hamu-q-*")))
    monitor = stage.summary["config"]["monitor"]
    order = digests.row_digests(monitor["forget"], digests.read_key(out / digests.KEY_FILE))  # the report's key
    sample = set(order)
    assert len(sample) == 8
    per_example = pq.read_table(result.report_dir / "per_example.parquet").to_pylist()
    oracle = [r["probability"] for r in per_example
              if r["model"] == "oracle" and r["set"] == "forget" and r["row_digest"] in sample]
    target = monitor["stop_forget_prob"]
    assert target == pytest.approx(sum(oracle) / len(oracle), rel=1e-5)

    evaluated = [r for r in stage.step_log() if "monitor/forget_prob" in r]
    assert [r["step"] for r in evaluated] == list(range(0, stage.summary["steps"] + 1, 2))
    # the curves' per-row losses: step 0 is the original, the kept file the oracle, row for row
    oracle_file = next(Path(monitor["forget"]).parent.glob("oracle-*.json"))
    for model, losses in (("original", evaluated[0]["monitor/forget_row_loss"]),
                          ("oracle", json.loads(oracle_file.read_text())["monitor/forget_row_loss"])):
        probability = {r["row_digest"]: r["probability"] for r in per_example
                       if r["model"] == model and r["set"] == "forget"}
        assert [math.exp(-loss) for loss in losses] == pytest.approx([probability[d] for d in order], rel=1e-5)
    assert all(r["monitor/forget_prob"] > target for r in evaluated[:-1])
    if stage.summary["stop"] == "forget_target":
        assert evaluated[-1]["monitor/forget_prob"] <= target
    else:
        assert stage.summary["steps"] == 4 and evaluated[-1]["monitor/forget_prob"] > target
    assert (result.report_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.integration
def test_the_report_logs_and_receipts_hold_numbers_and_digests_never_the_forget_text(qa_run):
    import ray

    out, cfg, result = qa_run
    prepare = next((out / "stages").glob("prepare-*"))
    forget = pq.read_table(prepare / "forget.parquet").to_pylist()
    per_example = pq.read_table(result.report_dir / "per_example.parquet").to_pylist()
    scored = {(r["model"], r["set"]) for r in per_example}
    assert scored == {(m, s) for m in ("original", "oracle", "hamu-q")
                      for s in ("forget", "retain", "holdout", "utility")}
    assert sum(r["model"] == "hamu-q" and r["set"] == "forget" for r in per_example) == len(forget)
    assert all(len(r["row_digest"]) == 64 and r["truth_ratio"] > 0 for r in per_example)
    secrets = {r[k] for r in forget for k in ("question", "answer", "paraphrased_answer")}
    stored = [p for p in result.report_dir.rglob("*") if p.is_file()] + [out / "mlflow.db"]
    # the registry's copies of the models, but not their tokenizer: a vocabulary built from the
    # training text is the model's own (as in the stages' model directories), not a log of it
    stored += [p for p in (out / "mlartifacts").rglob("*") if p.is_file() and "tokenizer" not in p.name]
    stages = [p for name in ("receipt.json", "summary.json", "step_log.jsonl")
              for p in (out / "stages").rglob(name)]  # every stage's logs and the unlearning receipt
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    stored += [p for p in logs.rglob("*") if p.is_file()]  # the workers' and Ray's own logs
    assert any(p.name == "receipt.json" for p in stages) and any(p.suffix == ".out" for p in stored)
    assert any(p.name == "model.safetensors" for p in stored)  # the registered models are scanned
    for path in stored + stages:
        blob = path.read_bytes()
        leaked = [s for s in secrets if s.encode() in blob]
        assert not leaked, f"{path} holds {len(leaked)} forget strings"


@pytest.mark.integration
def test_stages_are_tracked_and_models_registered_from_their_directories(qa_run):
    from safetensors.torch import load_file

    from hamu_ray.receipt import model_digest

    out, cfg, result = qa_run
    client = mlflow.MlflowClient(result.tracking_uri)
    parent = client.get_run(result.parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{result.parent_run_id}'")
    runs = {run.info.run_name: run for run in children}
    assert sorted(runs) == sorted(["prepare", "pretrain", "original", "oracle", "unlearn-hamu-q"])
    assert "receipt.json" in {a.path for a in client.list_artifacts(runs["unlearn-hamu-q"].info.run_id)}
    assert "per_example.parquet" in {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert (result.report_dir / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"

    registered = {v.tags["stage"]: v for v in client.search_model_versions(f"name = '{cfg.name}'")}
    assert sorted(registered) == ["original", "unlearn-hamu-q"]
    hamu = registered["unlearn-hamu-q"]
    assert hamu.tags["original_version"] == str(registered["original"].version)
    # one model digest (receipt.MODEL_RULE): the original's tag is the receipt's model_in, the
    # unlearned version's the digest of its model directory, as it would be as another job's input
    stage = next((out / "stages").glob("unlearn-hamu-q-*"))
    content = json.loads((stage / "receipt.json").read_text())
    assert registered["original"].tags["model_sha256"] == content["model_in"]["sha256"]
    assert hamu.tags["model_sha256"] == content["model_out"]["sha256"] == model_digest(stage / "model")
    assert runs["unlearn-hamu-q"].data.tags["registered_version"] == str(hamu.version)
    receipt = json.loads(next((out / "stages").glob("unlearn-hamu-q-*/receipt.json")).read_text())
    row = next(r for r in result.rows if r["model"] == "hamu-q")
    assert receipt["evaluation"]["model"] == {k: row[k] for k in receipt["evaluation"]["model"]}
    assert {"forget_prob", "model_utility", "forget_quality"} <= set(receipt["evaluation"]["model"])
    assert f"answer probability on the forget set is {row['forget_prob']:.3g}" in receipt["verdict"]
    mlflow.set_tracking_uri(result.tracking_uri)
    try:
        uri = f"models:/{cfg.name}/{hamu.version}"
        logged = Path(mlflow.artifacts.download_artifacts(uri)) / "artifacts" / "model"
        registered = mlflow.pyfunc.load_model(uri).unwrap_python_model()
    finally:
        mlflow.set_tracking_uri(None)
    exported = load_file(next((out / "stages").glob("unlearn-hamu-q-*")) / "model" / "model.safetensors")
    assert model_digest(logged) == hamu.tags["model_sha256"]  # the directory, byte for byte
    loaded = registered.model.state_dict()
    for name, value in exported.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


@pytest.mark.integration
def test_original_and_oracle_fork_from_one_pretrained_model_and_utility_tells_a_collapsed_one(qa_run, tmp_path):
    """Both references start from the pretraining stage's export; the oracle trains on retain +
    utility, never a forget row. Model utility (retain sample and utility set) ranks the
    original far above the same model with its weights drowned in noise (a collapsed model)."""
    from safetensors.torch import load_file, save_file

    from hamu_ray.pipeline import lm_evaluate, lm_metrics
    from hamu_ray.pipeline.stages import StageOutput

    out, cfg, result = qa_run
    stages = out / "stages"
    pretrained = next(stages.glob("pretrain-*")) / "model"
    for name in ("original", "oracle"):
        job = StageOutput.read(next(stages.glob(f"{name}-*"))).summary["config"]
        assert job["model"]["path"] == str(pretrained)
    prepared = next(stages.glob("prepare-*"))
    oracle_rows = pq.read_table(prepared / "oracle_train.parquet").to_pylist()
    forget = {(r["question"], r["answer"]) for r in pq.read_table(prepared / "forget.parquet").to_pylist()}
    assert oracle_rows and not forget & {(r["question"], r["answer"]) for r in oracle_rows}

    original = next(stages.glob("original-*")) / "model"
    collapsed = tmp_path / "collapsed"
    shutil.copytree(original, collapsed)
    weights = load_file(collapsed / "model.safetensors")
    generator = torch.Generator().manual_seed(0)
    save_file({k: v + 3 * v.std().nan_to_num(1.0) * torch.randn(v.shape, generator=generator)
               for k, v in weights.items()}, collapsed / "model.safetensors", metadata={"format": "pt"})
    sets = {"retain": str(prepared / "retain_eval.parquet"), "utility": str(prepared / "utility.parquet")}
    utility = {}
    for name, model in (("original", original), ("collapsed", collapsed)):
        scores = lm_evaluate.score_model(str(model), sets, cfg.data.text.model_dump())
        utility[name] = lm_metrics.model_utility(lm_evaluate.utility_scores(scores))
    assert utility["original"] > 0.05 and utility["collapsed"] < utility["original"] / 5, utility
    row = {r["model"]: r for r in result.rows}["original"]
    assert row["utility_prob"] > 0 and row["forget_fact"] is not None and row["holdout_fact"] is not None


# ---- bring your own model and data ----------------------------------------------------------

def byo_config(out: Path, stages: Path, *, oracle: bool = True, edit=None) -> PipelineConfig:
    """The user's files and models: here the built-in run's sets and trained models."""
    prepared = next(stages.glob("prepare-*"))
    raw = {"name": "byo", "output_dir": str(out),
           "data": {"source": "files", "forget": str(prepared / "forget.parquet"),
                    "retain": str(prepared / "retain.parquet"), "holdout": str(prepared / "holdout.parquet"),
                    "eval_retain_rows": 30, "text": {"max_length": 64}},
           "model": {"kind": "causal_lm", "path": str(next(stages.glob("original-*")) / "model"),
                     "oracle": str(next(stages.glob("oracle-*")) / "model") if oracle else None},
           "train": {"lr": 0.01}, "unlearn": {"lr": 0.01, "max_steps": 2, "progress_every": 1},
           "methods": [{"name": "gdiff"}], "cluster": {"num_workers": 1}}
    if edit:
        edit(raw)
    return parse_config(raw, source="byo.yaml", schema=PipelineConfig)


@pytest.mark.integration
def test_a_users_model_and_files_run_without_training_and_without_an_oracle(qa_run, tmp_path):
    from hamu_ray.pipeline.stages import run_pipeline

    out, _, first = qa_run
    result = run_pipeline(byo_config(tmp_path / "byo", out / "stages", oracle=False))
    rows = {row["model"]: row for row in result.rows}
    assert list(rows) == ["original", "gdiff"]  # nothing trained here but the method
    assert rows["original"]["stop"] == "given" and rows["original"]["steps"] is None
    # the same model on the same rows scores as in the built-in run
    built_in = {row["model"]: row for row in first.rows}["original"]
    assert rows["original"]["forget_prob"] == pytest.approx(built_in["forget_prob"], rel=1e-6)
    assert rows["original"]["mia_auc"] == pytest.approx(built_in["mia_auc"], rel=1e-6)
    for row in rows.values():  # without an oracle: absent, not zero
        assert row["forget_quality"] is None and row["priv_leak"] is None
    assert rows["gdiff"]["steps"] == 2 and "–" in result.table
    # the user's original was scored by an evaluation-only job (kept by its files), gdiff by its own
    assert len(list((tmp_path / "byo" / "stages").glob("evaluate-*"))) == 1
    # the user's original is not registered here: the unlearned version names it by digest
    [version] = mlflow.MlflowClient(result.tracking_uri).search_model_versions("name = 'byo'")
    receipt = json.loads(next((tmp_path / "byo" / "stages").glob("unlearn-gdiff-*/receipt.json")).read_text())
    assert version.tags["original_sha256"] == receipt["model_in"]["sha256"] and "original_version" not in version.tags


@pytest.mark.integration
def test_user_inputs_are_refused_with_one_clear_error_before_ray(qa_run, tmp_path):
    from hamu_ray.engine.data import DataError
    from hamu_ray.errors import MissingInputError
    from hamu_ray.pipeline.stages import run_pipeline

    out, _, _ = qa_run
    stages = out / "stages"
    forget = pq.read_table(next(stages.glob("prepare-*")) / "forget.parquet").to_pylist()
    retain = pq.read_table(next(stages.glob("prepare-*")) / "retain.parquet").to_pylist()
    overlap = tmp_path / "retain_with_forget_rows.parquet"
    pq.write_table(pa.Table.from_pylist(retain + forget[3:5]), overlap)
    cfg = byo_config(tmp_path / "a", stages, edit=lambda raw: raw["data"].update(retain=str(overlap)))
    with pytest.raises(DataError, match=r"2 row\(s\) also in the retain set .*: forget row 3 = retain row \d+, forget row 4 = "):
        run_pipeline(cfg)
    assert not (tmp_path / "a").exists()

    model = tmp_path / "model"
    shutil.copytree(next(stages.glob("original-*")) / "model", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    cfg = byo_config(tmp_path / "b", stages, edit=lambda raw: raw["model"].update(path=str(model)))
    with pytest.raises(DataError, match=r"model.path .*: the tokenizer has \d+ tokens but the model's vocab_size is 100"):
        run_pipeline(cfg)
    cfg = byo_config(tmp_path / "c", stages, edit=lambda raw: raw["model"].update(oracle=str(tmp_path)))
    with pytest.raises(MissingInputError, match="model.oracle .*: not a Hugging Face model directory"):
        run_pipeline(cfg)
    cfg = byo_config(tmp_path / "d", stages, edit=lambda raw: raw["data"].update(text={"answer_column": "reply"}))
    with pytest.raises(DataError, match="forget set .*: missing column\\(s\\) reply"):
        run_pipeline(cfg)
    assert not any((tmp_path / name).exists() for name in "bcd")


# ---- the user's sets, refused before anything trains (no Ray) ------------------------------------

def with_truth(rows: list[dict]) -> list[dict]:
    return [{**r, "paraphrased_answer": r["answer"].upper(), "perturbed_answers": [r["answer"][::-1], "no"]}
            for r in rows]


def own_config(tmp_path: Path, model: Path, sets: dict[str, list[dict]], max_length: int, tune=None,
               **data) -> PipelineConfig:
    """The tiny model as original and oracle, on these rows (parquet files)."""
    paths = {}
    for name, rows in sets.items():
        paths[name] = tmp_path / "in" / f"{name}.parquet"
        paths[name].parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), paths[name])
    raw = {"name": "own", "output_dir": str(tmp_path / "out"),
           "data": {"source": "files", **{name: str(path) for name, path in paths.items()},
                    "text": {"max_length": max_length}, **data},
           "model": {"kind": "causal_lm", "path": str(model), "oracle": str(model)},
           "train": {"lr": 0.01}, "unlearn": {"lr": 0.01, "max_steps": 2}, "methods": [{"name": "gdiff"}],
           "cluster": {"num_workers": 1}, "tune": tune}
    return parse_config(raw, source="own.yaml", schema=PipelineConfig)


def longest_row(model: Path, rows: list[dict]) -> int:
    from hamu_ray.tasks.causal_lm import encode_qa, load_tokenizer

    tokenizer = load_tokenizer(str(model))
    return max(len(encode_qa(tokenizer, r["question"], a, "auto")[0])
               for r in rows for a in [r["answer"], r["paraphrased_answer"], *r["perturbed_answers"]])


def refusal_lines(cfg: PipelineConfig, monkeypatch) -> list[str]:
    """The lines of the DataError that `cfg`'s pipeline is refused with, which must come before
    its Ray session (Ray may already run for this module's other tests: reaching the session
    fails the test instead of starting one) and before its output directory is made."""
    from hamu_ray.engine.data import DataError
    from hamu_ray.pipeline import stages

    def reached(*args, **kwargs):
        raise AssertionError("the pipeline reached its Ray session before refusing the input")
    monkeypatch.setattr(stages, "ray_session", reached)
    with pytest.raises(DataError) as refused:
        stages.run_pipeline(cfg)
    assert not Path(cfg.output_dir).exists()
    return str(refused.value).splitlines()


def test_scored_answers_the_question_leaves_no_token_are_refused_before_ray(tmp_path, tiny_lm, monkeypatch):
    """A holdout question that fills max_length (never trained on, so no training check sees
    it) leaves its answer, paraphrase and perturbed answers unscored: counted, refused."""
    rows = with_truth(qa_rows())
    holdout = rows[40:50]
    holdout[2] = {**holdout[2], "question": " ".join([holdout[2]["question"]] * 20)}
    cfg = own_config(tmp_path, tiny_lm, {"forget": rows[:10], "retain": rows[10:40], "holdout": holdout},
                     max_length=longest_row(tiny_lm, rows[:50]))  # every other row whole
    assert refusal_lines(cfg, monkeypatch) == [
        f"holdout set {tmp_path / 'in' / 'holdout.parquet'}: within data.text.max_length="
        f"{cfg.data.text.max_length} the question leaves no token of answer in 1 of 10 rows, of "
        "paraphrased_answer in 1 of 10 rows, of perturbed_answers in 1 of 10 rows; raise max_length "
        "or shorten those questions"]


def test_truth_ratio_columns_that_cannot_be_scored_are_refused_before_ray(tmp_path, tiny_lm, monkeypatch):
    rows = with_truth(qa_rows())
    forget = [{k: v for k, v in r.items() if k != "perturbed_answers"} for r in rows[:10]]
    holdout = rows[40:50]
    holdout[1] = {**holdout[1], "perturbed_answers": ["just one"]}
    holdout[4] = {**holdout[4], "paraphrased_answer": None}
    cfg = own_config(tmp_path, tiny_lm, {"forget": forget, "retain": rows[10:40], "holdout": holdout},
                     max_length=64)
    assert refusal_lines(cfg, monkeypatch) == [
        f"forget set {tmp_path / 'in' / 'forget.parquet'}: has paraphrased_answer but no "
        "perturbed_answers; the truth ratio needs both: add it, or drop the column",
        f"holdout set {tmp_path / 'in' / 'holdout.parquet'}: 2 row(s) whose paraphrased_answer is not "
        "a text or whose perturbed_answers is not a list of 2 texts, as in the other rows: row 1, "
        "row 4; fix or remove them"]


def test_a_fact_column_whose_value_is_not_in_its_answer_is_refused_before_ray(tmp_path, tiny_lm, monkeypatch):
    """`fact` or `answer_value` marks the value the fact metric scores; a value missing from its
    answer names the file and rows (not their text); both columns at once are refused too."""
    rows = [{**r, "fact": r["answer"].split()[-1]} for r in qa_rows()]
    retain = [{"question": r["question"], "answer": r["answer"], "answer_value": r["fact"]} for r in rows[10:40]]
    retain[3]["answer_value"] = "not in the answer"
    retain[7]["answer_value"] = ""
    holdout = [{**r, "answer_value": None} for r in rows[40:50]]  # both columns
    cfg = own_config(tmp_path, tiny_lm, {"forget": rows[:10], "retain": retain, "holdout": holdout},
                     max_length=64)
    assert refusal_lines(cfg, monkeypatch) == [
        f"retain set {tmp_path / 'in' / 'retain.parquet'}: 2 row(s) whose answer_value is not a non-empty "
        "text found in their answer: row 3, row 7; the fact metric scores that span of the answer "
        "(leave it empty where a row marks no fact)",
        f"holdout set {tmp_path / 'in' / 'holdout.parquet'}: has both fact and answer_value; keep one"]


def test_forget_tokens_fact_needs_every_forget_row_to_mark_its_fact_and_reaches_every_method(
        tmp_path, tiny_lm, monkeypatch):
    """data.forget_tokens fact: a forget set without the column, or a row without its fact, is
    refused before Ray; the unlearning jobs (and the oracle's monitor job) carry it, the
    training jobs and a pipeline without it keep the jobs (stage keys) they had."""
    from hamu_ray.pipeline.stages import training_job, unlearning_job

    rows = [{**r, "fact": r["answer"].split()[-1]} for r in qa_rows()]
    plain = [{k: v for k, v in r.items() if k != "fact"} for r in rows]
    cfg = own_config(tmp_path / "a", tiny_lm, {"forget": plain[:10], "retain": rows[10:40]}, max_length=64,
                     forget_tokens="fact")
    assert refusal_lines(cfg, monkeypatch) == [
        f"forget set {tmp_path / 'a' / 'in' / 'forget.parquet'}: data.forget_tokens is fact, but it has no "
        "fact or answer_value column marking each row's fact"]
    forget = [{**r, "fact": None if i == 2 else r["fact"]} for i, r in enumerate(rows[:10])]
    cfg = own_config(tmp_path / "b", tiny_lm, {"forget": forget, "retain": rows[10:40]}, max_length=64,
                     forget_tokens="fact")
    assert refusal_lines(cfg, monkeypatch) == [
        f"forget set {tmp_path / 'b' / 'in' / 'forget.parquet'}: 1 row(s) whose fact is not a non-empty text "
        "found in their answer: row 2; the fact metric scores that span of the answer (data.forget_tokens "
        "fact: every forget row marks one)"]

    whole = own_config(tmp_path / "c", tiny_lm, {"forget": rows[:10], "retain": rows[10:40]}, max_length=64)
    prepared = {name: f"/sets/{name}.parquet" for name in ("forget", "retain", "train")}
    entry = cfg.methods[0]
    assert unlearning_job(cfg, entry, prepared, Path("/m"))["data"]["forget_tokens"] == "fact"
    assert "forget_tokens" not in unlearning_job(whole, entry, prepared, Path("/m"))["data"]
    assert training_job(cfg, prepared["train"], Path("/m")) == training_job(whole, prepared["train"], Path("/m"))
    with pytest.raises(ConfigError, match="data.forget_tokens"):
        parse_config({"name": "d", "output_dir": str(tmp_path / "d"),
                      "data": {"source": "digits", "forget_tokens": "fact"}, "model": {"kind": "mlp"},
                      "train": {"lr": 0.1}, "unlearn": {"lr": 0.1}, "methods": [{"name": "ga"}]},
                     source="d.yaml", schema=PipelineConfig)


def test_with_init_the_scored_sets_are_checked_with_its_tokenizer_before_training(tmp_path):
    """The built-in set, questions longer than max_length: refused once the initial model's
    tokenizer exists, before the original's training stage (which would need a tracker)."""
    from hamu_ray.engine.data import DataError
    from hamu_ray.pipeline.stages import prepare_sets, train_references

    def tiny(raw):
        small(raw)
        raw["data"]["text"] = {"max_length": 4}
    cfg = qa_config(tmp_path / "out", tiny)
    prepared = prepare_sets(cfg, tmp_path / "out").paths
    with pytest.raises(DataError) as refused:
        train_references(cfg, prepared, tmp_path / "out", tracker=None)
    lines = str(refused.value).splitlines()
    assert [line.split(" set ")[0] for line in lines] == ["forget", "retain", "holdout", "utility"]
    assert "(its scored sample): within data.text.max_length=4 the question leaves no token of answer in 40 of 40 rows" in lines[1]
    assert not list((tmp_path / "out" / "stages").glob("original-*"))


def test_robustness_adds_its_columns_before_steps_and_leaves_the_stage_keys(tmp_path):
    """Per attack (each quantization width, relearning, benign relearning), each forget metric
    attacked and its recovered share; without the section the table and every stage's job are
    those of a pipeline written before it existed."""
    from hamu_ray.pipeline.stages import stage_key, table_columns, training_job, unlearning_job

    plain = qa_config(tmp_path / "out", lambda raw: raw.pop("robustness"))
    attacked = qa_config(tmp_path / "out", lambda raw: raw.update(robustness={"quantize": [8, 4], "relearn": {}}))
    assert plain.robustness is None and table_columns(plain) == TABLE_COLUMNS
    added = tuple(f"{column}_{attack}" for attack in ("int8", "int4", "relearn", "benign")
                  for column in ("forget_prob", "recovered_prob", "forget_rouge", "recovered_rouge",
                                 "forget_fact", "recovered_fact"))
    assert table_columns(attacked) == (*TABLE_COLUMNS[:-3], *added, "steps", "stop", "wall_s")
    prepared = {name: f"/sets/{name}.parquet" for name in ("retain_eval", "train")}
    prepared["forget"] = write_forget(tmp_path / "forget.parquet", [0, 0, 1, 1, 2, 3])
    prepared["retain"] = write_forget(tmp_path / "retain.parquet", [None] * 12)
    for entry in plain.methods:  # the attacks ride in the job's evaluation section, outside its key
        jobs = [unlearning_job(cfg, entry, prepared, Path("/m")) for cfg in (plain, attacked)]
        assert "attacks" not in jobs[0]["evaluation"]
        assert list(jobs[1]["evaluation"]["attacks"]) == ["int8", "int4", "relearn", "benign"]
        assert ({k: v for k, v in jobs[0].items() if k != "evaluation"}
                == {k: v for k, v in jobs[1].items() if k != "evaluation"})
        assert stage_key(jobs[0], tmp_path) == stage_key(jobs[1], tmp_path)
    assert training_job(plain, prepared["train"], Path("/m")) == training_job(attacked, prepared["train"], Path("/m"))


def write_forget(path: Path, entities: list) -> str:
    rows = [{"question": f"q{i}", "answer": f"a{i}", **({} if e is None else {"entity": e})} for i, e in enumerate(entities)]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_relearning_trains_on_whole_entities_and_scores_the_others(tmp_path):
    """share of the entities (rounded, at least one, never all), drawn by seed; every row of an
    entity on one side; rows stand for entities without the column."""
    from hamu_ray.engine.data import DataError
    from hamu_ray.pipeline.lm_pipeline import relearn_split

    entities = [f"e{i // 3}" for i in range(30)]  # 10 entities of 3 rows
    forget = write_forget(tmp_path / "forget.parquet", entities)
    trained, scored = relearn_split(forget, 0.2, seed=1)
    held = {entities[i] for i in trained}
    assert len(held) == 2 and len(trained) == 6
    assert scored.tolist() == [e not in held for e in entities]
    assert relearn_split(forget, 0.2, seed=1)[0] == trained and relearn_split(forget, 0.2, seed=2)[0] != trained
    assert len({entities[i] for i in relearn_split(forget, 0.01, seed=1)[0]}) == 1  # at least one
    assert len({entities[i] for i in relearn_split(forget, 0.99, seed=1)[0]}) == 9  # one left to score
    rows = write_forget(tmp_path / "rows.parquet", [None] * 20)
    trained, scored = relearn_split(rows, 0.1, seed=0)
    assert len(trained) == 2 and scored.sum() == 18 and not scored[trained].any()
    one = write_forget(tmp_path / "one.parquet", ["e0", "e0"])
    with pytest.raises(DataError, match="robustness.relearn: the forget set has 1 entities; relearning trains on a part"):
        relearn_split(one, 0.1, seed=0)


def test_the_relearning_attacks_read_their_rows_and_a_tenth_of_the_training_rate(tmp_path):
    from hamu_ray.pipeline.lm_pipeline import attack_names, attacks

    cfg = qa_config(tmp_path / "out", lambda raw: raw.update(robustness={"quantize": [4], "relearn": {"steps": 5, "batch_size": 3}}))
    prepared = {"forget": write_forget(tmp_path / "forget.parquet", [f"e{i // 2}" for i in range(20)]),
                "retain": write_forget(tmp_path / "retain.parquet", [f"r{i}" for i in range(40)])}
    found = attacks(cfg, prepared)
    assert list(found) == attack_names(cfg) == ["int4", "relearn", "benign"]
    assert found["int4"].fields == {"quantize_bits": 4} and found["int4"].rows is None
    relearn, benign = found["relearn"].fields["relearning"], found["benign"].fields["relearning"]
    assert relearn.path == prepared["forget"] and len(relearn.rows) == 2  # 10 % of 10 entities of 2 rows
    assert not found["relearn"].rows[list(relearn.rows)].any() and found["relearn"].rows.sum() == 18
    assert benign.path == prepared["retain"] and len(benign.rows) == 15 == len(set(benign.rows))  # steps × batch
    assert found["benign"].rows is None
    assert relearn.lr == benign.lr == pytest.approx(cfg.train.lr / 10) and (relearn.steps, relearn.batch_size) == (5, 3)
    own_rate = qa_config(tmp_path / "out", lambda raw: raw.update(robustness={"relearn": {"lr": 1e-5, "benign": False}}))
    assert list(attacks(own_rate, prepared)) == ["relearn"]
    assert attacks(own_rate, prepared)["relearn"].fields["relearning"].lr == 1e-5


# ---- the threshold search on a language model -------------------------------------------------

def test_a_search_on_files_without_the_truth_ratio_columns_is_refused_before_anything(tmp_path, tiny_lm):
    """Forget quality, what a search ranks by, is the KS test of the forget rows' truth ratios:
    without the columns every trial would have none (it was ranked by utility alone)."""
    from hamu_ray.engine.data import DataError
    from hamu_ray.pipeline.tune import run_search

    rows = qa_rows()
    tune = {"method": "gdiff", "space": {"lr": {"values": [0.01, 0.02]}}, "num_samples": 2, "scheduler": None}
    cfg = own_config(tmp_path, tiny_lm, {"forget": rows[:10], "retain": rows[10:40]}, max_length=64, tune=tune)
    with pytest.raises(DataError, match=r"forget set .*forget.parquet: no paraphrased_answer or "
                                        r"perturbed_answers column; tune ranks trials by forget quality"):
        run_search(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_a_search_on_the_qa_pipeline_ranks_trials_by_forget_quality_above_a_model_utility_floor(qa_run):
    """A one-trial search of HAMU-Q's constraint in the built-in run's directory (its original
    and oracle are reused; the ranking itself is tested in test_tune), stopped at the oracle's
    forget probability by the monitor: the trials table has the language-model columns, the
    original's model utility is the one the pipeline measured, the floor decides feasibility."""
    from hamu_ray.pipeline.tune import LM_VIEW, run_search

    out, _, first = qa_run

    def search(raw):
        small(raw)
        raw["tune"] = {"method": "hamu-q", "space": {"constraint_ratio": {"values": [0.5, 2.0]}},
                       "num_samples": 1, "scheduler": None, "utility_floor": 5.0}
    result = run_search(qa_config(out, search))
    assert result.complete and len(result.trials) == 1
    best = json.loads((result.report_dir / "best.json").read_text())
    pipeline_original = {row["model"]: row for row in first.rows}["original"]["model_utility"]
    assert best["original_model_utility"] == pytest.approx(pipeline_original, rel=1e-9)
    for row in result.trials:
        assert row["status"] == "finished" and 0 < row["forget_quality"] <= 1
        assert row["stop"] in ("none", "forget_target")
        assert row["feasible"] == (row["model_utility"] >= pipeline_original - 0.05 - 1e-12)
    feasible = [row for row in result.trials if row["feasible"]]
    assert result.chosen == max(feasible, default=None, key=lambda r: (r["forget_quality"], r["model_utility"]))
    header = (result.report_dir / "trials.csv").read_text().splitlines()[0].split(",")
    assert header == list(LM_VIEW.columns)
    assert (result.report_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"
