"""Deletion requests over time (hamu_ray.lineage): two requests against a registered tiny Llama
in a real sqlite MLflow registry, each a real Ray Train job; the chained receipts recomputed
by hand from the files, and verify-chain against an edited receipt, a changed link and a
removed version."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.lm_fixtures import qa_rows

pytestmark = pytest.mark.integration

NAME = "tiny"
POLICY = {"method": {"name": "gdiff"}, "train": {"lr": 0.01, "max_steps": 2},
          "cluster": {"num_workers": 1}}


@pytest.fixture(scope="module")
def lineage_run(ray_cluster, tiny_lm, tmp_path_factory):
    """Version 1 is the tiny Llama; request A (rows 0-3) makes version 2, in this process, under
    the default method (HAMU-Q, B from the pre-flight);
    request B (rows 3-6, row 3 asked for again) version 3, by `hamu-ray forget` in another
    process, while this one tries request C and is refused by the held lock."""
    import os
    import subprocess
    import sys
    import time

    import mlflow
    from mlflow import MlflowClient

    from hamu_ray import lineage, receipt
    from hamu_ray.pipeline import registry, tracking

    root, rows = tmp_path_factory.mktemp("lineage"), qa_rows()
    files = {"a": rows[0:4], "b": rows[3:7], "c": rows[7:10], "retain": rows[10:30]}
    for name, part in files.items():
        pq.write_table(pa.Table.from_pylist(part), root / f"{name}.parquet")
    policy = {**POLICY, "data": {"retain": str(root / "retain.parquet"), "retain_batch_size": 4,
                                 "forget_batch_size": 2}, "evaluate": {"retain_rows": 8, "seed": 1},
              "robustness": {"quantize": [8], "relearn": {"steps": 2, "batch_size": 2}}}
    (root / "policy.yaml").write_text(yaml.safe_dump(policy))
    (root / "default.yaml").write_text(yaml.safe_dump({k: v for k, v in policy.items() if k != "method"}))
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = tracking.Store(uri).experiment_id("setup", str(root / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        registry.log_model({"kind": "causal_lm", "model_dir": str(tiny_lm)}, NAME,
                           {"role": "original", "model_sha256": receipt.model_digest(tiny_lm)})
    work, client = root / "work", MlflowClient(uri)
    made = [lineage.forget(str(root / "a.parquet"), NAME, str(root / "default.yaml"), uri, str(work))]

    command = ["forget", "--model", NAME, "--config", str(root / "policy.yaml"), "--tracking-uri", uri,
               "--workdir", str(work)]
    import ray

    # the other command joins this module's Ray (as a command on a cluster would): no second start
    # and its default MLflow store is another one: only --tracking-uri names the registry
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent),
           "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "MLFLOW_TRACKING_URI": f"sqlite:///{root}/elsewhere.db"}
    other = subprocess.Popen([sys.executable, "-m", "hamu_ray.cli", *command, str(root / "b.parquet")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not client.search_registered_models(f"name = '{NAME}{lineage.LOCK_SUFFIX}'"):
        assert other.poll() is None and time.monotonic() < deadline, "the other request never took the lock"
        time.sleep(0.2)
    refused = subprocess.run([sys.executable, "-m", "hamu_ray.cli", *command, str(root / "c.parquet")], env=env,
                             capture_output=True, text=True)
    out, err = other.communicate(timeout=600)
    assert other.returncode == 0, err[-3000:]
    made.append(out.strip().splitlines()[-1].removeprefix(f"registered {NAME} version "))
    yield SimpleNamespace(root=root, uri=uri, work=work, made=made, client=client, policy=policy,
                          refused=refused, other_pid=other.pid)
    mlflow.set_tracking_uri(None)


def run_file(client, version: str, artifact: str, into: Path) -> Path:
    run = client.get_model_version(NAME, version).run_id
    return Path(client.download_artifacts(run, artifact, str(into)))


def artifact_path(client, version: str, artifact: str) -> Path:
    """Where the local store keeps a version's run artifact (to edit it, as an attacker would)."""
    run = client.get_run(client.get_model_version(NAME, version).run_id)
    return Path(urlparse(run.info.artifact_uri).path) / artifact


def test_each_request_registers_the_next_version_chained_to_its_parent(lineage_run, tiny_lm, tmp_path):
    import random

    import mlflow

    import numpy as np

    from hamu_ray import digests, receipt
    from hamu_ray.pipeline import lm_evaluate, lm_pipeline
    from hamu_ray.pipeline.config import RobustnessSection

    run, client = lineage_run, lineage_run.client
    assert run.made == ["2", "3"]
    tags = {v: client.get_model_version(NAME, v).tags for v in ("1", "2", "3")}
    assert (tags["2"]["lineage_parent"], tags["3"]["lineage_parent"]) == ("1", "2")
    assert tags["1"]["model_sha256"] == receipt.model_digest(tiny_lm)  # the start is untouched

    key = digests.read_key(run.work / digests.KEY_FILE)  # one key for the whole lineage
    a, b = (digests.row_digests(str(run.root / f"{r}.parquet"), key) for r in ("a", "b"))
    assert a[3] == b[0] and len(set(a + b)) == 7
    second = json.loads(run_file(client, "2", "receipt.json", tmp_path / "r2").read_text())
    third_file = run_file(client, "3", "receipt.json", tmp_path / "r3")
    third = json.loads(third_file.read_text())
    assert hashlib.sha256(third_file.read_bytes()).hexdigest() == tags["3"]["receipt_sha256"]

    model_2 = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/2", dst_path=str(tmp_path / "m2"),
                                                       tracking_uri=run.uri)) / "artifacts" / "model"
    evaluation = third["lineage"].pop("evaluation")
    assert second["lineage"].pop("evaluation")["against"] == "parent"
    # the default method, HAMU-Q, with half the damage-free reach the pre-flight found as its B
    preflight = second["lineage"].pop("preflight")
    assert (second["method"], second["hparams"]["constraint_unit"]) == ("hamu-q", "absolute")
    assert preflight["damage_free_reach"] > 0 and preflight["constraint_from"] == "0.5 × D*"
    assert second["hparams"]["constraint"] == preflight["constraint"] == 0.5 * preflight["damage_free_reach"]
    assert preflight["damage_accepted"] is False and preflight["max_feasible"] >= preflight["damage_free_reach"]
    assert second["lineage"] == {
        "model": NAME, "request": 1,
        "parent": {"version": "1", "model_sha256": receipt.model_digest(tiny_lm), "receipt_sha256": None},
        "rows": {"requested": 4, "forgotten_before": 0, "repeated_in_request": 0},
        "forgotten": {"rows": 4, "merkle_root": receipt.merkle_root(a)}}
    assert third["lineage"] == {
        "model": NAME, "request": 2,
        "parent": {"version": "2", "model_sha256": receipt.model_digest(model_2),
                   "receipt_sha256": tags["2"]["receipt_sha256"]},
        "rows": {"requested": 4, "forgotten_before": 1, "repeated_in_request": 0},
        "forgotten": {"rows": 7, "merkle_root": receipt.merkle_root(a + b[1:])}, "preflight": None}
    assert third["forget"]["merkle_root"] == receipt.merkle_root(b)
    # scored without an oracle: version 2 (the parent) and 3 on request B's rows and 8 retain rows
    # drawn by the policy's seed, as one process scores them
    model_3 = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/3", dst_path=str(tmp_path / "m3"),
                                                       tracking_uri=run.uri)) / "artifacts" / "model"
    retain = pq.read_table(run.root / "retain.parquet")
    sample = sorted(random.Random(1).sample(range(retain.num_rows), 8))
    pq.write_table(retain.take(sample), tmp_path / "sample.parquet")
    sets = {"forget": str(run.root / "b.parquet"), "retain": str(tmp_path / "sample.parquet")}
    for name, directory in (("parent", model_2), ("model", model_3)):
        expected = lm_evaluate.model_metrics(lm_evaluate.score_model(str(directory), sets, {}), None)
        for metric in ("forget_prob", "forget_rouge", "retain_prob", "retain_rouge"):
            assert evaluation[name][metric] == pytest.approx(expected[metric], abs=1e-6), (name, metric)
        assert evaluation[name]["mia_auc"] is None  # no holdout given
    assert evaluation["retain_rows"] == 8 and evaluation["against"] == "parent"
    # the policy's attacks on version 3, recovered shares against the parent, as one process
    # scores them: int8; relearning 2 steps at a tenth of train.lr on one of request B's rows
    # (no entity column: rows are the units), scored on the other three; benign relearning on
    # 4 retain rows, scored on all four
    parent_forget = lm_evaluate.score_model(str(model_2), {"forget": sets["forget"]}, {})["forget"]
    model_forget = lm_evaluate.score_model(str(model_3), {"forget": sets["forget"]}, {})["forget"]
    planned = lm_pipeline.planned_attacks(RobustnessSection.model_validate(run.policy["robustness"]),
                                          sets["forget"], str(run.root / "retain.parquet"), 0.001, 1)
    assert list(planned) == ["int8", "relearn", "benign"] and planned["relearn"].rows.sum() == 3
    assert planned["relearn"].fields["relearning"].rows == tuple(np.flatnonzero(~planned["relearn"].rows))
    assert len(planned["benign"].fields["relearning"].rows) == 4
    assert list(evaluation["attacks"]) == ["int8", "relearn", "benign"]
    for name, attack in planned.items():
        attacked = lm_evaluate.score_model(str(model_3), {"forget": sets["forget"]}, {}, **attack.fields)["forget"]
        expected = lm_evaluate.attack_metrics(name, model_forget, parent_forget, attacked, attack.rows)
        assert evaluation["attacks"][name] == pytest.approx(expected, abs=1e-6), name
    assert "Attacks brought back this share of the drop in answer probability (0 none, 1 all): int8 " in third["verdict"]
    assert third["model_in"]["sha256"] == receipt.model_digest(model_2) == tags["2"]["model_sha256"]
    before, after = evaluation["parent"], evaluation["model"]
    assert (
        "Request 2 on tiny, from version 2: 4 rows (1 forgotten before); 7 distinct rows forgotten along the "
        f"lineage. Answer probability, parent → this version: on the request's rows {before['forget_prob']:.3f} → "
        f"{after['forget_prob']:.3f}, on 8 retain rows {before['retain_prob']:.3f} → {after['retain_prob']:.3f}."
    ) in third["verdict"]
    assert json.loads(run_file(client, "3", "forgotten.json", tmp_path / "f3").read_text()) == {
        "request": b, "forgotten": a + b[1:], "position": 2}


def test_a_request_is_refused_before_training_under_a_held_lock_from_an_unlearned_version_or_by_a_bad_policy(
        lineage_run, tmp_path, capsys, monkeypatch):
    import subprocess
    import sys

    from mlflow import MlflowClient

    from hamu_ray import cli, files, lineage

    run = lineage_run
    # two commands at once: the second, started while the first held the lock, was refused
    assert run.refused.returncode == 2 and run.refused.stderr.strip().splitlines()[-1].startswith(
        f"hamu-ray: another `hamu-ray forget` is running on tiny (process {run.other_pid} on ")
    request, policy = str(run.root / "a.parquet"), str(run.root / "policy.yaml")
    before = sorted(p.name for p in run.work.iterdir())
    command = ["forget", request, "--model", f"{NAME}/1", "--config", policy, "--workdir", str(run.work)]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cli.main(command) == 2
    assert "give the registry: --tracking-uri URI or $MLFLOW_TRACKING_URI" in capsys.readouterr().err
    assert cli.main([*command, "--tracking-uri", run.uri]) == 2
    assert capsys.readouterr().err.startswith("hamu-ray: --model tiny/1: version 1 was already unlearned from "
                                              "(version 2); a request starts from the lineage's newest version, here 3")
    client = MlflowClient(run.uri)
    with lineage.locked(client, NAME):
        with pytest.raises(lineage.LineageError, match="another `hamu-ray forget` is running on tiny"):
            lineage.forget(request, NAME, policy, run.uri, str(run.work))
    # a holder that is gone (its process ended) leaves a lock that the next request takes over
    gone = subprocess.run([sys.executable, "-c", "import json; from hamu_ray import files; "
                           "print(json.dumps(files.this_process()))"], capture_output=True, text=True, check=True)
    client.create_registered_model(NAME + lineage.LOCK_SUFFIX, tags={"owner": gone.stdout.strip()})
    assert not files.owner_alive(json.loads(gone.stdout))
    with lineage.locked(client, NAME):
        pass
    assert client.search_registered_models(f"name = '{NAME}{lineage.LOCK_SUFFIX}'") == []  # released

    bad = tmp_path / "policy.yaml"
    bad.write_text(yaml.safe_dump({**run.policy, "data": {**run.policy["data"], "forget": request}}))
    with pytest.raises(lineage.LineageError, match="the policy sets data.forget: leave it out, the request is"):
        lineage.forget(request, NAME, str(bad), run.uri, str(run.work))
    bad.write_text(yaml.safe_dump({**run.policy, "evaluate": {"retain_row": 8}}))
    with pytest.raises(lineage.LineageError, match=r"evaluate.retain_row: not a field \(it has retain_rows, holdout, seed\)"):
        lineage.forget(request, NAME, str(bad), run.uri, str(run.work))
    assert sorted(p.name for p in run.work.iterdir()) == before  # nothing trained, nothing written

    # a B no step can meet without retain damage: refused after the pre-flight, before training
    beyond = tmp_path / "beyond.yaml"
    beyond.write_text(yaml.safe_dump({**run.policy, "method": {"name": "ga", "rule": "hamu-q",
                                                               "hparams": {"constraint": 1e6, "radius": 0.01}}}))
    c = str(run.root / "c.parquet")
    with pytest.raises(lineage.LineageError, match=r"B = 1e\+06 \(loss units\) is beyond the damage-free reach D\* "
                                                   r"= .*Give --accept-damage.*nothing was trained"):
        lineage.forget(c, NAME, str(beyond), run.uri, str(run.work))
    assert sorted(p.name for p in run.work.iterdir()) == before
    # accepted, it trains; a rule that can take no step (B beyond every reach: it stops at its
    # first) leaves the parent's weights as they were, and that registers nothing
    with pytest.raises(lineage.LineageError, match=r"left the model unchanged \(stop: infeasible\): nothing was "
                                                   r"forgotten and nothing registered; its job is in .*/work/v3-"):
        lineage.forget(c, NAME, str(beyond), run.uri, str(run.work), accept_damage=True)
    assert lineage.versions(client, NAME).keys() == {"1", "2", "3"}


def test_b_in_each_unit_is_read_in_loss_units_against_the_preflights_reaches_and_gated_by_d_star():
    from hamu_ray.lineage import LineageError, absolute_constraint, gate

    summary = {"max_feasible_constraint": 0.8, "max_constraint_without_damage": 0.2}
    assert absolute_constraint({"constraint": 0.3}, summary) == 0.3
    assert absolute_constraint({"constraint": 0.5, "constraint_unit": "reach"}, summary) == 0.4
    assert absolute_constraint({"constraint": 0.5, "constraint_unit": "damage_free"}, summary) == 0.1
    assert gate(summary, {"constraint": 0.2}, False) == {  # at D*: no damage to first order
        "constraint": 0.2, "damage_free_reach": 0.2, "max_feasible": 0.8, "damage_accepted": False}
    with pytest.raises(LineageError, match=r"B = 0.4 \(loss units\) is beyond the damage-free reach D\* = 0.2"):
        gate(summary, {"constraint": 0.5, "constraint_unit": "reach"}, False)
    accepted = gate(summary, {"constraint": 0.5, "constraint_unit": "reach"}, True)
    assert accepted["damage_accepted"] and accepted["constraint"] == 0.4


def test_a_hamu_rule_without_b_takes_half_the_preflights_damage_free_reach_and_none_is_refused():
    from hamu_ray.lineage import (DEFAULT_METHOD, LineageError, PREFLIGHT_SHARE, preflight_constraint,
                                  takes_b_from_preflight, with_constraint)

    assert takes_b_from_preflight(DEFAULT_METHOD)  # the default policy's method: HAMU-Q
    assert takes_b_from_preflight({"name": "npo", "rule": "hamu-u", "hparams": {"radius": 0.3}})
    assert not takes_b_from_preflight({"name": "hamu-q", "hparams": {"constraint": 0.1}})
    assert not takes_b_from_preflight({"name": "npo"})  # its own rule has no B
    assert not takes_b_from_preflight({"name": "surgery-implicit"})
    assert PREFLIGHT_SHARE == 0.5 and preflight_constraint({"max_constraint_without_damage": 0.3}) == 0.15
    policy = {"method": {"name": "hamu-q", "hparams": {"radius": 0.2, "constraint_unit": "reach"}}}
    assert with_constraint(policy, 0.15)["method"]["hparams"] == {"radius": 0.2, "constraint": 0.15,
                                                                  "constraint_unit": "absolute"}
    assert policy["method"]["hparams"] == {"radius": 0.2, "constraint_unit": "reach"}  # not modified
    for none in (0.0, float("nan")):
        with pytest.raises(LineageError, match=r"finds no damage-free reach .*Give method.hparams.constraint "
                                               r"\(and --accept-damage\).*nothing was trained"):
            preflight_constraint({"max_constraint_without_damage": none})


def test_verify_chain_passes_then_names_an_edited_receipt_a_changed_link_and_a_removed_version(
        lineage_run, capsys, tmp_path):
    from hamu_ray import cli

    import mlflow

    run, client = lineage_run, lineage_run.client
    verify = ["receipt", "verify-chain", NAME, "--tracking-uri", run.uri]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/elsewhere.db")  # the process's default store is another
    try:
        assert cli.main(verify) == 0
    finally:
        mlflow.set_tracking_uri(run.uri)
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.startswith("ok ") for line in lines)
    assert {line.split(":")[0].split(None, 1)[1] for line in lines} == {
        f"v{v} {what}" for v in ("2", "3") for what in ("receipt", "model", "parent", "rows")}

    receipt_3 = artifact_path(client, "3", "receipt.json")
    original = receipt_3.read_bytes()
    edited = json.loads(original)
    edited["steps"] += 1
    receipt_3.write_text(json.dumps(edited, indent=2))
    assert cli.main(verify) == 1
    assert "MISMATCH v3 receipt: sha256" in capsys.readouterr().out
    receipt_3.write_bytes(original)

    client.set_model_version_tag(NAME, "3", "lineage_parent", "1")  # v3 moved under v1
    assert cli.main(verify) == 1
    out = capsys.readouterr().out
    assert "MISMATCH v3 parent: the receipt names version 2, the registry 1" in out
    assert "MISMATCH version 1: unlearned from more than once" in out
    client.set_model_version_tag(NAME, "3", "lineage_parent", "2")

    client.delete_model_version(NAME, "2")  # a link removed
    assert cli.main(verify) == 1
    assert "MISMATCH v3 parent: version 2 is not in the registry: a link was removed" in capsys.readouterr().out


def test_a_one_entity_request_runs_every_attack_but_relearning_and_says_why(tmp_path):
    """Relearning trains on a part of a request's entities and scores the rest; benign relearning
    (on retain rows) and quantization still run on a request of one person's rows."""
    from hamu_ray import lineage

    rows = [{"entity": "Ann", "question": f"q{i}", "answer": f"a{i}"} for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "request.parquet")
    cfg = SimpleNamespace(train=SimpleNamespace(lr=0.5), data=SimpleNamespace(retain=str(tmp_path / "request.parquet")))
    section = lineage.robustness_spec({"robustness": {"quantize": [4], "relearn": {}}})
    attacks, skipped = lineage.request_attacks(cfg, section, str(tmp_path / "request.parquet"), tmp_path / "r.parquet", 0)
    assert list(attacks) == ["int4", "benign"] and attacks["int4"].fields == {"quantize_bits": 4}
    assert attacks["benign"].rows is None and attacks["benign"].fields["relearning"].lr == 0.05  # a tenth of train.lr
    assert skipped == {"relearn": {"skipped": "robustness.relearn: the forget set has 1 entities; relearning trains "
                                              "on a part of them and scores the rest, which needs two or more"}}
    assert lineage.attacks_sentence({"int4": {"recovered_prob_int4": 0.25}, **skipped}).startswith(
        " Attacks brought back this share of the drop in answer probability (0 none, 1 all): int4 0.25; "
        "relearn not run (robustness.relearn: the forget set has 1 entities")
    with pytest.raises(lineage.LineageError, match=r"the policy's robustness.quantize.0: Input should be 8 or 4"):
        lineage.robustness_spec({"robustness": {"quantize": [3]}})
    assert lineage.robustness_spec({}) is None


def test_a_request_smaller_than_a_batch_per_worker_runs_with_the_batch_it_fills(capsys):
    from hamu_ray.lineage import LineageError, fitted_batch

    policy = {"data": {"retain": "r.parquet", "forget_batch_size": 16}, "cluster": {"num_workers": 2}}
    assert fitted_batch(policy, 32) == (policy, None)
    fitted, record = fitted_batch(policy, 5)  # one person's five facts
    assert fitted == {"data": {"retain": "r.parquet", "forget_batch_size": 2}, "cluster": {"num_workers": 2}}
    assert record == {"policy": 16, "used": 2, "rows": 5, "workers": 2} and policy["data"]["forget_batch_size"] == 16
    assert "the request's 5 rows give 2 per worker: forget batches of 2" in capsys.readouterr().out
    assert fitted_batch({}, 10)[1] == {"policy": 32, "used": 5, "rows": 10, "workers": 2}  # the engine's defaults
    with pytest.raises(LineageError, match=r"the request has 1 rows for the policy's 2 workers .*give fewer workers"):
        fitted_batch(policy, 1)


def test_the_readmes_policy_makes_a_valid_job(tmp_path):
    """The README's example policy, as `forget` completes it, validates as a job."""
    import re

    from hamu_ray import lineage

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```text\n# a forget policy\n(.*?)```", readme, re.S).group(1)
    parent = lineage.Parent("3", tmp_path / "model", None, "0" * 64, None, [], 0)
    policy = yaml.safe_load(block)
    job = lineage.request_job(policy, tmp_path / "request.parquet", parent, tmp_path / "out")
    assert lineage.evaluation_spec(policy) == {"retain_rows": 200, "holdout": "data/holdout.parquet", "seed": 0}
    assert lineage.robustness_spec(policy).quantize == [8, 4] and lineage.robustness_spec(policy).relearn.share == 0.1
    assert (job.method.name, job.method.rule_name, job.model.path) == ("npo", "hamu-q", str(tmp_path / "model"))
    assert (job.data.forget, job.output_dir) == (str(tmp_path / "request.parquet"), str(tmp_path / "out"))


def test_the_sustainability_study_splits_requests_by_entity_covering_every_row_once(tmp_path):
    """scripts/requests_over_time.py: N requests of whole entities, disjoint, all rows."""
    import importlib.util

    script = Path(__file__).parent.parent / "scripts" / "requests_over_time.py"
    spec = importlib.util.spec_from_file_location("requests_over_time", script)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    rows = [{"entity": f"e{i % 7}", "question": f"q{i}", "answer": f"a{i}"} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "forget.parquet")
    split = study.split_requests(str(tmp_path / "forget.parquet"), 3, 0, tmp_path / "requests")
    assert sorted(i for part in split["rows"] for i in part) == list(range(30))
    owners = [{rows[i]["entity"] for i in part} for part in split["rows"]]
    assert sorted(len(o) for o in owners) == [2, 2, 3] and not (owners[0] & owners[1] or owners[1] & owners[2])
    for part, path in zip(split["rows"], split["files"]):
        assert pq.read_table(path).to_pylist() == [rows[i] for i in part]
    with pytest.raises(SystemExit, match="--requests 8: between 1 and the forget set's 7 entities"):
        study.split_requests(str(tmp_path / "forget.parquet"), 8, 0, tmp_path / "more")


# ---- a classifier's lineage ------------------------------------------------------------------

DIGITS_SHAPE = {"kind": "mlp", "sizes": [64, 16, 10]}


def digits_table(x, y) -> pa.Table:
    return pa.Table.from_pydict({"x": [list(map(float, row)) for row in x], "y": [int(v) for v in y]})


@pytest.fixture(scope="module")
def classifier_lineage(ray_cluster, tmp_path_factory):
    """An MLP trained on the first 1200 of scikit-learn's digits, registered as version 1 the way
    the classifier pipelines register; a request of 16 of its training 3s unlearned from it under
    the default method (HAMU-Q, B from the pre-flight), the other classes' training rows retained,
    the rows after 1200 as holdout."""
    import mlflow
    import numpy as np
    import torch
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    from hamu_ray import lineage, receipt
    from hamu_ray.pipeline import registry, tracking
    from hamu_ray.tasks.classifier import ClassifierModel, build_model

    root = tmp_path_factory.mktemp("classifier-lineage")
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    torch.manual_seed(0)
    model = build_model(ClassifierModel.model_validate(DIGITS_SHAPE))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(torch.tensor(x[:1200])), torch.tensor(y[:1200])).backward()
        opt.step()
    stage = root / "original"
    stage.mkdir()
    save_file(model.state_dict(), str(stage / "model.safetensors"))
    threes = np.flatnonzero(y[:1200] == 3)
    sets = {"request": threes[:16], "retain": np.flatnonzero(y[:1200] != 3), "holdout": np.arange(1200, 1500)}
    for name, rows in sets.items():
        pq.write_table(digits_table(x[rows], y[rows]), root / f"{name}.parquet")
    # the whole request in every step: the steps' reach is the pre-flight's, so B = ½ D* is met
    policy = {"data": {"retain": str(root / "retain.parquet"), "retain_batch_size": 64, "forget_batch_size": 16},
              "train": {"lr": 0.1, "max_steps": 10}, "cluster": {"num_workers": 1},
              "evaluate": {"retain_rows": 100, "holdout": str(root / "holdout.parquet"), "seed": 2},
              "robustness": {"quantize": [8], "relearn": {"steps": 2, "batch_size": 4}}}
    (root / "policy.yaml").write_text(yaml.safe_dump(policy))
    uri = f"sqlite:///{root}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    experiment = tracking.Store(uri).experiment_id("setup", str(root / "artifacts"))
    with mlflow.start_run(experiment_id=experiment):
        registry.log_model({"kind": "classifier", "stage_dir": str(stage), "model": DIGITS_SHAPE}, "digits",
                           {"role": "original", "model_sha256": receipt.model_digest(stage / "model.safetensors")})
    version = lineage.forget(str(root / "request.parquet"), "digits", str(root / "policy.yaml"), uri, str(root / "work"))
    yield SimpleNamespace(root=root, uri=uri, version=version, x=x, y=y, policy=policy, sets=sets,
                          original=stage / "model.safetensors")
    mlflow.set_tracking_uri(None)


def test_a_classifier_request_registers_the_next_version_scored_by_accuracy_as_by_hand(classifier_lineage, tmp_path):
    """The new version's weights (and its loadable pytorch module) are the job's export; its
    lineage block's accuracies, membership AUC and int8 attack equal plain torch and sklearn on the
    same rows; relearning scores only rows it did not train on."""
    import mlflow
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from sklearn.metrics import roc_auc_score

    from hamu_ray import receipt
    from hamu_ray.attacks.quantize import fake_quantize
    from hamu_ray.pipeline.lm_pipeline import seeded_rows
    from hamu_ray.tasks.classifier import ClassifierModel, build_model

    run = classifier_lineage
    client = mlflow.MlflowClient(run.uri)
    assert run.version == "2"
    tags = client.get_model_version("digits", "2").tags
    assert tags["lineage_parent"] == "1" and tags["method"] == "hamu-q"
    local = Path(mlflow.artifacts.download_artifacts("models:/digits/2", dst_path=str(tmp_path / "m2"),
                                                     tracking_uri=run.uri))
    weights = local / "extra_files" / "model.safetensors"
    assert json.loads((local / "extra_files" / "classifier.json").read_text()) == {**DIGITS_SHAPE, "channels": [16, 32]}
    assert receipt.model_digest(weights) == tags["model_sha256"] != receipt.model_digest(run.original)
    content = json.loads(run_file_of(client, "digits", "2", "receipt.json", tmp_path).read_text())
    assert content["model_in"]["sha256"] == receipt.model_digest(run.original)

    def mlp(path):
        model = build_model(ClassifierModel.model_validate(DIGITS_SHAPE)).eval()
        model.load_state_dict(load_file(str(path)))
        return model

    parent, unlearned = mlp(run.original), mlp(weights)
    registered = mlflow.pytorch.load_model("models:/digits/2")
    x = torch.tensor(run.x)
    assert torch.equal(registered(x[:40]), unlearned(x[:40]))  # the registered module is the unlearned one

    retain = run.sets["retain"][list(seeded_rows(len(run.sets["retain"]), 100, 2))]
    sets = {"forget": run.sets["request"], "retain": retain, "holdout": run.sets["holdout"]}

    def scored(model):
        with torch.no_grad():
            logits = {s: model(x[rows]) for s, rows in sets.items()}
        acc = {s: float((logits[s].argmax(1).numpy() == run.y[rows]).mean()) for s, rows in sets.items()}
        loss = {s: torch.nn.functional.cross_entropy(logits[s], torch.tensor(run.y[rows]), reduction="none").numpy()
                for s, rows in sets.items()}
        members = np.r_[np.ones(16), np.zeros(300)]
        return {"forget_acc": acc["forget"], "forget_loss": float(loss["forget"].mean()), "retain_acc": acc["retain"],
                "holdout_acc": acc["holdout"],
                "mia_auc": roc_auc_score(members, -np.r_[loss["forget"], loss["holdout"]])}

    evaluation = content["lineage"]["evaluation"]
    assert evaluation["retain_rows"] == 100
    for name, model in (("parent", parent), ("model", unlearned)):
        assert evaluation[name] == pytest.approx(scored(model), abs=1e-6), name
    assert evaluation["model"]["forget_acc"] < evaluation["parent"]["forget_acc"] == 1.0

    attacks = evaluation["attacks"]
    with torch.no_grad():
        forget = sets["forget"]
        int8 = float((fake_quantize(unlearned, 8)(x[forget]).argmax(1).numpy() == run.y[forget]).mean())
    drop = evaluation["parent"]["forget_acc"] - evaluation["model"]["forget_acc"]
    assert attacks["int8"]["forget_acc_int8"] == pytest.approx(int8)
    assert attacks["int8"]["recovered_acc_int8"] == pytest.approx((int8 - evaluation["model"]["forget_acc"]) / drop)
    assert set(attacks) == {"int8", "relearn", "benign"} and -1 <= attacks["relearn"]["recovered_acc_relearn"] <= 1
    assert "Accuracy, parent → this version: on the request's rows 1.000 → " in content["verdict"]
    assert "Attacks brought back this share of the drop in accuracy (0 none, 1 all): int8 " in content["verdict"]


def run_file_of(client, name: str, version: str, artifact: str, into: Path) -> Path:
    run = client.get_model_version(name, version).run_id
    return Path(client.download_artifacts(run, artifact, str(into)))


def test_a_classifiers_chain_verifies_and_its_policy_cannot_reshape_the_model(classifier_lineage, capsys):
    from mlflow import MlflowClient

    from hamu_ray import cli, lineage

    run = classifier_lineage
    assert cli.main(["receipt", "verify-chain", "digits", "--tracking-uri", run.uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and all(line.startswith("ok ") for line in lines)
    bad = run.root / "reshaped.yaml"
    bad.write_text(yaml.safe_dump({**run.policy, "model": {"sizes": [64, 32, 10]}}))
    before = sorted(p.name for p in (run.root / "work").iterdir())
    with pytest.raises(lineage.LineageError, match=r"the policy sets model.sizes: leave it out, the registered "
                                                   r"version is a classifier \(mlp \[64, 16, 10\]\)"):
        lineage.forget(str(run.root / "request.parquet"), "digits", str(bad), run.uri, str(run.root / "work"))
    bad.write_text(yaml.safe_dump({**run.policy, "model": "mlp"}))
    with pytest.raises(lineage.LineageError, match=r"the policy's model: a mapping of fields \(dtype, lora, …\), not 'mlp'"):
        lineage.forget(str(run.root / "request.parquet"), "digits", str(bad), run.uri, str(run.root / "work"))
    assert sorted(p.name for p in (run.root / "work").iterdir()) == before
    assert lineage.versions(MlflowClient(run.uri), "digits").keys() == {"1", "2"}


def test_an_earlier_attempt_that_registered_nothing_is_kept_aside_and_the_request_runs_again(tmp_path, capsys):
    from hamu_ray.lineage import set_aside

    out = tmp_path / "v3-0123456789ab"
    assert set_aside(out, "3") is None and not any(tmp_path.iterdir())
    for attempt in (1, 2):
        out.mkdir()
        (out / "receipt.json").write_text(f"attempt {attempt}")
        aside = set_aside(out, "3")
        assert not out.exists() and (aside / "receipt.json").read_text() == f"attempt {attempt}"
        assert aside.name.startswith("v3-0123456789ab.unregistered-")
        assert f"v3-0123456789ab: an earlier attempt at this request registered nothing (version 3 has no child); " \
               f"kept as {aside}, running it again" in capsys.readouterr().out
    assert len(list(tmp_path.iterdir())) == 2  # both attempts kept, under two names
