"""Metrics reach MLflow as they are: a diverging run's NaN and ±inf are recorded, never dropped.
On a real sqlite store (MLflow keeps NaN there and clamps ±inf to ±1.8e308).

A server that stops answering mid-run loses nothing: on a real `mlflow server`, killed with
SIGKILL half-way through a session and restarted, `hamu-ray tracking upload` brings the store to
what an uninterrupted session logs."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from hamu_ray.cli import main as cli
from hamu_ray.pipeline.tracking import Tracker

STEPS = [{"step": 1, "loss/forget": 0.5, "stop": "none"}, {"step": 2, "loss/forget": math.nan},
         {"step": 3, "loss/forget": math.inf}, {"step": 4, "loss/forget": -math.inf},
         {"step": 5, "loss/forget": 2.0}]


def tracker(tmp_path) -> Tracker:
    return Tracker(f"sqlite:///{tmp_path}/mlflow.db", "nonfinite", artifact_root=tmp_path / "mlartifacts",
                   buffer_dir=tmp_path / "mlflow-unsent")


def test_nonfinite_steps_are_in_the_metric_history_and_tagged(tmp_path):
    t = tracker(tmp_path)
    with t.run("diverging") as run_id:
        assert t.log_steps(run_id, STEPS) == 5
    history = sorted(t.client.get_metric_history(run_id, "loss/forget"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3, 4, 5]
    values = [m.value for m in history]
    assert values[0] == 0.5 and math.isnan(values[1]) and values[4] == 2.0
    assert values[2] >= sys.float_info.max and values[3] <= -sys.float_info.max  # inf, as the store keeps it
    tags = t.client.get_run(run_id).data.tags
    assert tags["nonfinite/loss/forget"] == "+inf, -inf, nan: first at step 2 (3 in all)"


def test_nonfinite_final_metrics_are_logged_and_tagged(tmp_path):
    t = tracker(tmp_path)
    with t.run("final") as run_id:
        t.log_metrics({"forget_quality": math.nan, "gap": math.inf, "steps": 30, "stop": "none"})
    run = mlflow.MlflowClient(t.uri).get_run(run_id)
    assert math.isnan(run.data.metrics["forget_quality"]) and run.data.metrics["steps"] == 30
    assert run.data.metrics["gap"] >= sys.float_info.max
    assert run.data.tags["nonfinite/forget_quality"] == "nan" and run.data.tags["nonfinite/gap"] == "+inf"
    assert "nonfinite/steps" not in run.data.tags


def test_finite_metrics_get_no_tags():
    from hamu_ray.pipeline.tracking import nonfinite_tags

    assert nonfinite_tags([("loss", 1.0, 1), ("acc", 0.5, None)]) == {}


def test_a_tracker_does_not_leak_its_store_into_later_commands(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports $MLFLOW_TRACKING_URI; a later `hamu-ray` subprocess of the
    same process (a test suite, a notebook) would then log into this tracker's store."""
    import os

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tracker(tmp_path)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    tracker(tmp_path)
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:///elsewhere.db"


# ---- a tracking server that does not answer ---------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_fails_at_once_with_one_clear_error(tmp_path):
    from hamu_ray.errors import TrackingError
    from hamu_ray.pipeline.stages import run_pipeline
    from tests.pipeline.test_pipeline import digits_config

    uri = f"http://127.0.0.1:{free_port()}"
    started = time.perf_counter()
    with pytest.raises(TrackingError, match=rf"{uri}: no MLflow server answers \(\[Errno 111\] Connection refused\)"):
        Tracker(uri, "anything")
    assert time.perf_counter() - started < 10  # MLflow's own client would retry for minutes

    def to_the_dead_server(raw):
        raw["tracking"] = {"uri": uri}
    with pytest.raises(TrackingError, match="Nothing has run"):
        run_pipeline(digits_config(tmp_path / "out", to_the_dead_server))
    assert not (tmp_path / "out").exists()  # before any data, Ray or worker
    import ray
    assert not ray.is_initialized()


def test_any_http_answer_counts_as_reachable():
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from hamu_ray.pipeline.tracking import check_reachable

    class NotFound(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass
    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_reachable(f"http://127.0.0.1:{server.server_address[1]}")  # a proxy's 404 is an answer
    finally:
        server.shutdown()



# ---- a tracking server that stops answering mid-run -------------------------------------------

SERVER_START_S = 240  # `mlflow server` imports its app twice: slow on a loaded 2-core machine


class MlflowServer:
    """A real `mlflow server` on a sqlite store, in a process group of its own (the command runs
    uvicorn as its child: SIGKILL reaches both)."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        import requests

        command = [str(Path(sys.executable).parent / "mlflow"), "server",
                   "--backend-store-uri", f"sqlite:///{self.root}/db.sqlite",
                   "--artifacts-destination", str(self.root / "artifacts"),
                   "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job runner processes
        with open(self.root / "server.log", "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, (self.root / "server.log").read_text()[-3000:]
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.uri + "/health", timeout=2).ok:
                    return
            time.sleep(0.3)
        self.kill()
        raise AssertionError(f"mlflow server did not answer in {SERVER_START_S} s")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.kill()


def session_files(root: Path) -> SimpleNamespace:
    """A session's files: a config, a report directory, a receipt, a trained classifier's stage."""
    import torch
    from safetensors.torch import save_file

    from hamu_ray.pipeline.config import PipelineClassifier
    from hamu_ray.tasks.classifier import build_model

    (root / "report").mkdir(parents=True)
    (root / "config.yaml").write_text("name: demo\n")
    (root / "report" / "comparison.csv").write_text("model,forget_acc\noriginal,1.0\n")
    (root / "report" / "comparison.md").write_text("| model | forget_acc |\n")
    (root / "receipt.json").write_text('{"method": "gdiff"}\n')
    model = PipelineClassifier(kind="mlp", sizes=[4, 3])
    stage = root / "stages" / "original-abc"
    stage.mkdir(parents=True)
    torch.manual_seed(0)  # both sessions register the same weights
    save_file({k: v.contiguous() for k, v in build_model(model).state_dict().items()},
              str(stage / "model.safetensors"))
    return SimpleNamespace(root=root, model=model, stage=SimpleNamespace(
        name="original", directory=stage, weights=stage / "model.safetensors", model_dir=stage / "model"))


PREPARE_STEPS = [{"step": 1, "loss/forget": 0.9, "hardness/cosine": -0.2}, {"step": 2, "loss/forget": 0.7}]


def log_session(tracker: Tracker, files: SimpleNamespace, registered_model: str, midway=lambda: None) -> None:
    """A pipeline's tracking in small (the calls stages.py and registry.py make); `midway` runs
    once the first child run has ended."""
    from hamu_ray.pipeline import registry

    cfg = SimpleNamespace(tracking=SimpleNamespace(registered_model=registered_model), name="demo",
                          is_lm=False, model=files.model)
    with tracker.run("demo", params={"train": {"lr": 0.1, "epochs": 2}, "name": "demo"}, tags={"kind": "pipeline"}):
        tracker.log_artifact(files.root / "config.yaml")
        with tracker.run("prepare", tags={"stage": "prepare"}) as prepare:
            tracker.log_steps(prepare, PREPARE_STEPS)
            tracker.log_metrics({"rows/forget": 30})
        midway()
        with tracker.run("original", params={"method": {"name": "ft"}}, tags={"stage": "original"}) as original:
            tracker.log_steps(original, STEPS)  # NaN and ±inf among them
            tracker.log_metrics({"steps": 5, "wall_s": 1.5})
            tracker.set_tags({"digest/forget": "ab" * 8})
            version = registry.register(tracker, cfg, files.stage, role="original")
            tracker.set_tags({"registered_version": version})
        tracker.log_artifact(files.root / "report")  # a directory's files
        with tracker.run("prepare", run_id=prepare):  # reopened, as registry.publish_unlearned does
            tracker.log_artifact(files.root / "receipt.json")
            tracker.set_tags({"published": "yes"})
        tracker.log_metrics({"original/forget_acc": 1.0})


@pytest.fixture(scope="module")
def interrupted(server, tmp_path_factory):
    """A session whose server is SIGKILLed after its first child run; then the server restarted
    on the same store and the buffer uploaded."""
    root = tmp_path_factory.mktemp("interrupted")
    files = session_files(root / "inputs")
    buffer = root / "mlflow-unsent"
    killed = {}

    def kill_the_server():
        server.kill()
        killed["at"] = time.perf_counter()
    mlflow_env = {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        tracker = Tracker(server.uri, "interrupted", artifact_root=root / "mlartifacts", buffer_dir=buffer)
        log_session(tracker, files, "interrupted-model", midway=kill_the_server)
        tracker.finish()
    offline_s = time.perf_counter() - killed["at"]
    # the short HTTP retries were for the tracker's own calls: a child process sees the user's
    assert {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")} == mlflow_env
    operations = [json.loads(line) for line in (buffer / "operations.jsonl").read_text().splitlines()]
    server.start()
    with contextlib.redirect_stdout(io.StringIO()) as upload:
        exit_code = cli(["tracking", "upload", str(buffer)])  # to the URI the buffer records
    return SimpleNamespace(buffer=buffer, printed=printed.getvalue(), offline_s=offline_s, operations=operations,
                           exit_code=exit_code, upload=upload.getvalue())


@pytest.fixture(scope="module")
def reference(server, interrupted, tmp_path_factory):
    """The same session against a server that never fails (the restarted one, another experiment)."""
    root = tmp_path_factory.mktemp("reference")
    files = session_files(root / "inputs")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        tracker = Tracker(server.uri, "reference", artifact_root=root / "mlartifacts",
                          buffer_dir=root / "mlflow-unsent")
        log_session(tracker, files, "reference-model")
        tracker.finish()
    assert "MLflow:" not in printed.getvalue() and not (root / "mlflow-unsent").exists()  # never offline
    return snapshot(server.uri, "reference", "reference-model")


def snapshot(uri: str, experiment: str, registered_model: str) -> dict:
    """Every run of an experiment by its path of run names (the nesting), with its status,
    params, tags, metric histories and artifact files; the registered versions by run path."""
    client = mlflow.MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    by_id = {run.info.run_id: run for run in runs}

    def path(run) -> str:
        parent = run.data.tags.get("mlflow.parentRunId")
        return (path(by_id[parent]) + "/" if parent else "") + run.info.run_name
    logged = {path(run): {
        "status": run.info.status, "params": run.data.params,
        "tags": {k: v for k, v in run.data.tags.items() if k != "mlflow.parentRunId"},  # an id: see path
        "metrics": {key: sorted((m.step, repr(m.value)) for m in client.get_metric_history(run.info.run_id, key))
                    for key in run.data.metrics},
        "artifacts": artifact_files(client, run.info.run_id)} for run in runs}
    assert len(logged) == len(runs), sorted(path(run) for run in runs)  # no run twice
    versions = [{"run": path(by_id[v.run_id]), **v.tags}
                for v in client.search_model_versions(f"name = '{registered_model}'")]
    return {"runs": logged, "versions": versions}


def artifact_files(client, run_id: str, folder: str | None = None) -> list[tuple[str, int]]:
    found = []
    for item in client.list_artifacts(run_id, folder):
        found += artifact_files(client, run_id, item.path) if item.is_dir else [(item.path, item.file_size)]
    return sorted(found)


def test_a_server_killed_mid_run_costs_seconds_and_one_line(interrupted, server):
    assert interrupted.offline_s < 30  # MLflow's own retries would take minutes per call
    notices = [line for line in interrupted.printed.splitlines() if "stopped answering" in line]
    assert notices == [f"MLflow: {server.uri} stopped answering ([Errno 111] Connection refused); this "
                       f"command goes on and keeps its tracking in {interrupted.buffer}, to upload at the end"]
    assert f"hamu-ray tracking upload {interrupted.buffer} --tracking-uri {server.uri}" in interrupted.printed


def test_the_buffer_holds_every_write_after_the_kill(interrupted):
    from hamu_ray.pipeline.tracking import UNSENT

    lines = interrupted.operations
    assert [line["op"] for line in lines] == [
        "session", "create_run", "log_batch", "log_batch", "log_batch", "log_batch", "register_model",
        "log_batch", "end_run", "log_artifact", "reopen_run", "log_artifact", "log_batch", "end_run",
        "log_batch", "end_run"]
    session, create = lines[0], lines[1]
    assert session["uri"].startswith("http://127.0.0.1:") and len(session["buffer"]) == 32
    assert create["name"] == "original" and UNSENT.fullmatch(create["run"])  # a run made offline: a key
    parent = create["tags"]["mlflow.parentRunId"]
    assert len(parent) == 32 and lines[-1] == {**lines[-1], "op": "end_run", "run": parent, "status": "FINISHED"}
    reopened = lines[10]["run"]
    assert not UNSENT.fullmatch(reopened) and lines[11]["path"].endswith("/receipt.json")  # an online run: its id
    register = next(line for line in lines if line["op"] == "register_model")
    assert register["run"] == create["run"] and register["source"]["kind"] == "classifier"
    assert register["source"]["model"]["sizes"] == [4, 3] and Path(register["source"]["stage_dir"]).is_dir()
    assert lines[7]["tags"] == {"registered_version": register["version"]}  # resolved at the upload
    assert all(Path(line["path"]).is_absolute() for line in lines if line["op"] == "log_artifact")


def test_the_upload_gives_the_store_what_an_uninterrupted_session_logs(interrupted, reference, server):
    assert interrupted.exit_code == 0
    assert interrupted.upload == (f"{server.uri}: 15 operations uploaded; the buffer is done: "
                                  f"{interrupted.buffer / 'operations.uploaded.jsonl'}\n")
    assert not (interrupted.buffer / "operations.jsonl").exists()
    uploaded = snapshot(server.uri, "interrupted", "interrupted-model")
    assert uploaded == reference
    runs = uploaded["runs"]
    assert sorted(runs) == ["demo", "demo/original", "demo/prepare"]
    assert runs["demo/original"]["metrics"]["loss/forget"] == [
        (1, "0.5"), (2, "nan"), (3, repr(sys.float_info.max)), (4, repr(-sys.float_info.max)), (5, "2.0")]
    assert runs["demo/original"]["tags"]["nonfinite/loss/forget"] == "+inf, -inf, nan: first at step 2 (3 in all)"
    assert runs["demo/original"]["params"] == {"method.name": "ft"} and runs["demo"]["params"]["train.lr"] == "0.1"
    assert runs["demo/prepare"]["tags"]["published"] == "yes"
    assert [path for path, _ in runs["demo"]["artifacts"]] == ["comparison.csv", "comparison.md", "config.yaml"]
    assert [path for path, _ in runs["demo/prepare"]["artifacts"]] == ["receipt.json"]
    assert all(run["status"] == "FINISHED" for run in runs.values())
    [version] = uploaded["versions"]
    assert version["run"] == "demo/original" and version["role"] == "original" and len(version["model_sha256"]) == 64
    assert runs["demo/original"]["tags"]["registered_version"] == "1"


def test_uploading_again_duplicates_nothing(interrupted, reference, server, capsys):
    before = snapshot(server.uri, "interrupted", "interrupted-model")
    assert cli(["tracking", "upload", str(interrupted.buffer)]) == 0
    assert "nothing to upload" in capsys.readouterr().out
    assert snapshot(server.uri, "interrupted", "interrupted-model") == before == reference


def test_an_upload_cut_off_part_way_goes_on_where_it_stopped(interrupted, reference, server, capsys):
    """What a failure after the first six operations leaves: operations.jsonl, and uploaded.json
    counting six. The re-run sends the rest, and the registration finds its version."""
    buffer = interrupted.buffer
    (buffer / "operations.uploaded.jsonl").rename(buffer / "operations.jsonl")
    progress = json.loads((buffer / "uploaded.json").read_text())
    (buffer / "uploaded.json").write_text(json.dumps({**progress, "done": 6}))
    assert cli(["tracking", "upload", str(buffer)]) == 0
    assert "10 operations uploaded (5 were before)" in capsys.readouterr().out
    assert snapshot(server.uri, "interrupted", "interrupted-model") == reference


def test_a_later_command_reopens_a_run_made_offline_by_its_key(interrupted, server):
    """tune reopens its parent run by the id it wrote down, which is a key if it was made offline."""
    key = next(line["run"] for line in interrupted.operations if line["op"] == "create_run")
    tracker = Tracker(server.uri, "interrupted", buffer_dir=interrupted.buffer)
    with tracker.run("original", run_id=key) as run_id:
        tracker.set_tags({"resumed": "yes"})
    assert run_id == json.loads((interrupted.buffer / "uploaded.json").read_text())["ids"][key]
    assert tracker.client.get_run(run_id).data.tags["resumed"] == "yes"


def test_a_bad_buffer_is_one_clear_error(tmp_path, capsys):
    from hamu_ray.pipeline.tracking import Buffer

    dead = f"http://127.0.0.1:{free_port()}"
    (tmp_path / "empty").mkdir()
    Buffer(tmp_path / "waiting", dead).append("reopen_run", {"run": "0" * 32})
    Buffer(tmp_path / "cut", dead).append("reopen_run", {"run": "0" * 32})
    with open(tmp_path / "cut" / "operations.jsonl", "a") as f:
        f.write('{"op": "log_ba')  # a command killed mid-line
    Buffer(tmp_path / "cut", dead).append("reopen_run", {"run": "0" * 32})
    later = (tmp_path / "cut" / "operations.jsonl").read_text().splitlines()[3:]
    assert [json.loads(line)["op"] for line in later] == ["session", "reopen_run"]  # the next command's are whole
    cases = {tmp_path / "missing": f"{tmp_path / 'missing'}: no such directory",
             tmp_path / "empty": f"{tmp_path / 'empty'}: not a tracking buffer",
             tmp_path / "cut": f"{tmp_path / 'cut' / 'operations.jsonl'}, line 3: not an operation",
             tmp_path / "waiting": f"tracking URI {dead}: no MLflow server answers ([Errno 111] Connection refused)"}
    for directory, message in cases.items():
        assert cli(["tracking", "upload", str(directory)]) == 2, directory
        err = capsys.readouterr().err
        assert err.startswith(f"hamu-ray: {message}") and err.count("\n") == 1, err
    assert sorted(p.name for p in (tmp_path / "waiting").iterdir()) == ["operations.jsonl"]  # left as it was


def test_an_operation_the_store_refuses_is_one_error_naming_its_line(server, tmp_path, capsys):
    from hamu_ray.pipeline.tracking import Buffer

    Buffer(tmp_path, server.uri).append("reopen_run", {"run": "0" * 32})  # a run this store never had
    assert cli(["tracking", "upload", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hamu-ray: {tmp_path / 'operations.jsonl'}, line 2 (reopen_run): the store at "
                          f"{server.uri} refused it: ") and err.count("\n") == 1, err
