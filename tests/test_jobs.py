"""`hamu-ray submit` and `hamu-ray jobs`: local validation (fast, nothing is sent), then a real
two-node Ray cluster on this host with a real MLflow server (integration)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from hamu_ray import cli, jobs
from hamu_ray.engine.config import parse_config
from hamu_ray.schema import ConfigError
from hamu_ray.pipeline.config import PipelineConfig
from hamu_ray.engine.driver import JOB_CONFIG_ENV, RUNTIME_ENV_DEFAULTS, joining_runtime_env
from hamu_ray.pipeline.tracking import is_local_store, refuse_local_store_on_cluster

PIPELINE = Path(__file__).parent.parent / "pipelines" / "digits.yaml"
SERVER = "http://127.0.0.1:5999"  # never contacted by the fast tests


@pytest.fixture
def nothing_sent(monkeypatch):
    """Fail the test if anything tries to reach a cluster; clear the environment's defaults."""
    def refuse(address):
        raise AssertionError(f"connected to {address} before validating")
    monkeypatch.setattr(jobs, "connect", refuse)
    for name in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def submit_args(pipeline: Path, *extra: str) -> list[str]:
    return ["submit", str(pipeline), "--address", "http://127.0.0.1:1", *extra]


# ---- submit-side validation: every error before any connection -----------------------------

def test_a_job_needs_an_explicit_tracking_uri(nothing_sent, tmp_path, capsys):
    assert cli.main(submit_args(PIPELINE, "--output-dir", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert f"{PIPELINE}: tracking.uri: a submitted job needs an explicit MLflow tracking URI" in err
    assert "--tracking-uri" in err and "MLflow server" in err and "Traceback" not in err


def test_the_tracking_uri_comes_from_the_flag_the_pipeline_the_runtime_env_or_the_environment(
        nothing_sent, tmp_path, monkeypatch):
    raw = yaml.safe_load(PIPELINE.read_text())
    raw["tracking"] = {"uri": "http://from-pipeline:5000"}
    pipeline = write_yaml(tmp_path / "p.yaml", raw)
    env_file = write_yaml(tmp_path / "env.yaml", {"env_vars": {"MLFLOW_TRACKING_URI": "http://from-file:5000"}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")

    def uri(path, **kwargs):
        work = Path(tempfile.mkdtemp(dir=tmp_path))
        spec = jobs.prepare_job(path, work, output_dir=str(tmp_path / "out"), **kwargs)
        assert spec.config.tracking.uri == spec.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"]
        return spec.config.tracking.uri
    assert uri(pipeline, tracking_uri="http://from-flag:5000") == "http://from-flag:5000"
    assert uri(pipeline, runtime_env_file=env_file) == "http://from-pipeline:5000"
    assert uri(PIPELINE, runtime_env_file=env_file) == "http://from-file:5000"
    assert uri(PIPELINE) == "http://from-env:5000"


@pytest.mark.parametrize("flag", [False, True])
def test_a_relative_output_dir_is_refused(nothing_sent, tmp_path, capsys, flag):
    extra = ["--output-dir", "runs/here"] if flag else []  # digits.yaml says runs/digits
    assert cli.main(submit_args(PIPELINE, "--tracking-uri", SERVER, *extra)) == 2
    err = capsys.readouterr().err
    where = "--output-dir: 'runs/here'" if flag else f"{PIPELINE}: output_dir: 'runs/digits'"
    assert f"{where} is relative" in err, err
    assert "absolute path on storage every node sees" in err


@pytest.mark.parametrize("field", ["data.forget", "model.weights"])
def test_your_own_files_are_shipped_by_absolute_path_and_relative_ones_refused(nothing_sent, tmp_path, capsys,
                                                                               monkeypatch, field):
    pipeline = own_files_pipeline(tmp_path)
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    spec = jobs.prepare_job(pipeline, work, tracking_uri=SERVER, output_dir=str(tmp_path / "out"))
    assert spec.config.data.forget == str(tmp_path / "forget.parquet")

    raw = yaml.safe_load(pipeline.read_text())
    section, key = field.split(".")
    raw[section][key] = Path(raw[section][key]).name  # relative to tmp_path, the cwd here
    monkeypatch.chdir(tmp_path)
    assert cli.main(submit_args(write_yaml(tmp_path / "relative.yaml", raw), "--tracking-uri", SERVER,
                                "--output-dir", str(tmp_path / "out2"))) == 2
    err = capsys.readouterr().err
    assert f"relative.yaml: {field}: '{raw[section][key]}' is relative" in err, err
    assert "Traceback" not in err


def test_a_language_models_local_directory_is_refused_by_relative_path_and_a_hub_name_passes(tmp_path, monkeypatch):
    (tmp_path / "my-model").mkdir()
    monkeypatch.chdir(tmp_path)
    raw = {"name": "byo", "output_dir": "/runs/byo",
           "data": {"source": "files", "forget": "/d/forget.parquet", "retain": "/d/retain.parquet"},
           "model": {"kind": "causal_lm", "path": "my-model", "oracle": "org/oracle-on-the-hub"},
           "train": {"lr": 0.01}, "unlearn": {"lr": 0.01}, "methods": [{"name": "gdiff"}]}
    assert jobs.relative_paths(PipelineConfig.model_validate(raw)) == [("model.path", "my-model")]


@pytest.mark.parametrize("content, needle", [
    ({"working_dir": "."}, "env.yaml: working_dir: unknown key; a runtime-env file may set env_vars, pip"),
    ({"env_vars": ["A=1"]}, "env.yaml: env_vars: expected a mapping"),
    ({"env_vars": {"OMP_NUM_THREADS": 1}}, "env.yaml: env_vars.OMP_NUM_THREADS: expected a string, got 1 (int)"),
    ({"pip": {"packages": ["x"]}}, "env.yaml: pip: expected a list of requirement strings or a requirements file"),
    ({"pip": ["ok", 3]}, "env.yaml: pip: expected a list"),
    ({"pip": "no/such/requirements.txt"}, "env.yaml: pip: no requirements file 'no/such/requirements.txt'"),
    ([1, 2], "env.yaml: expected a mapping at the top level"),
])
def test_a_bad_runtime_env_file_names_the_file_and_the_key(nothing_sent, tmp_path, capsys, content, needle):
    env_file = write_yaml(tmp_path / "env.yaml", content)
    args = submit_args(PIPELINE, "--tracking-uri", SERVER, "--output-dir", str(tmp_path / "out"),
                       "--runtime-env", str(env_file))
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert str(tmp_path) in err


def test_a_bad_pipeline_names_the_file_and_the_field(nothing_sent, tmp_path, capsys):
    raw = yaml.safe_load(PIPELINE.read_text())
    raw["methods"][0]["name"] = "hamu-z"
    pipeline = write_yaml(tmp_path / "bad.yaml", raw)
    assert cli.main(submit_args(pipeline, "--tracking-uri", SERVER, "--output-dir", str(tmp_path))) == 2
    err = capsys.readouterr().err
    assert f"{pipeline}: methods.0: Value error, unknown method 'hamu-z'" in err, err


def test_without_an_address_nothing_is_sent(nothing_sent, capsys):
    assert cli.main(["submit", str(PIPELINE)]) == 2
    assert cli.main(["jobs", "status", "raysubmit_x"]) == 2
    err = capsys.readouterr().err
    assert err.count("no cluster address: pass --address http://HEAD:8265") == 2


def test_the_job_ships_the_validated_pipeline_and_this_package(nothing_sent, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the requirements file is found in the repository root
    env_file = write_yaml(tmp_path / "env.yaml", {"env_vars": {"DS_ACCELERATOR": "cpu"},
                                                  "pip": "requirements/base.txt"})
    work = tmp_path / "work"
    work.mkdir()
    spec = jobs.prepare_job(PIPELINE, work, tune=True, tracking_uri=SERVER,
                            output_dir=str(tmp_path / "out"), runtime_env_file=env_file)
    assert spec.entrypoint == "python -m hamu_ray.cli tune pipeline.yaml"
    assert [p.name for p in work.iterdir()] == ["pipeline.yaml"]
    shipped = parse_config(yaml.safe_load((work / "pipeline.yaml").read_text()), schema=PipelineConfig)
    assert shipped.output_dir == str(tmp_path / "out") and shipped.tracking.uri == SERVER
    assert shipped.data.forget.forget_class == 3  # `class` survives the alias round trip
    env = spec.runtime_env
    assert env["working_dir"] == str(work)
    assert env["py_modules"] == [str(Path(jobs.__file__).parent)]
    assert env["env_vars"] == {**RUNTIME_ENV_DEFAULTS, "DS_ACCELERATOR": "cpu", "MLFLOW_TRACKING_URI": SERVER}
    assert env["pip"] == str(Path(jobs.__file__).parent.parent / "requirements" / "base.txt")
    assert jobs.prepare_job(PIPELINE, work, tracking_uri=SERVER, output_dir=str(tmp_path / "out")
                            ).entrypoint == "python -m hamu_ray.cli run pipeline.yaml"


def test_the_job_ships_the_pipeline_with_the_command_lines_overrides(nothing_sent, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    overrides = ["unlearn.lr=0.02", "methods.0.hparams.constraint=0.1", "cluster.num_workers=1"]
    jobs.prepare_job(PIPELINE, work, tracking_uri=SERVER, output_dir=str(tmp_path / "out"),
                     overrides=overrides)
    shipped = yaml.safe_load((work / "pipeline.yaml").read_text())
    assert shipped["unlearn"]["lr"] == 0.02 and shipped["cluster"]["num_workers"] == 1
    assert shipped["methods"][0]["hparams"]["constraint"] == 0.1
    # a bad override is refused before anything is sent
    assert cli.main(submit_args(PIPELINE, "unlearn.lr=0", "--tracking-uri", SERVER)) == 2
    assert f"command line 'unlearn.lr=0' (over {PIPELINE}): unlearn.lr: Input should be greater than 0" \
        in capsys.readouterr().err


def test_a_submitted_request_is_checked_before_anything_is_sent(nothing_sent, tmp_path, capsys):
    policy = write_yaml(tmp_path / "policy.yaml", {"method": {"name": "gdiff"}, "train": {"lr": 0.01},
                                                   "data": {"retain": str(tmp_path / "retain.parquet")}})
    request, work = str(tmp_path / "request.parquet"), str(tmp_path / "work")

    def refused(*extra: str, config: Path = policy) -> str:
        assert cli.main(["forget", *extra, "--model", "m", "--config", str(config),
                         "--address", "http://127.0.0.1:1"]) == 2
        return capsys.readouterr().err
    server = ["--tracking-uri", SERVER]
    assert "--tracking-uri: a submitted request needs the registry" in refused(request, "--workdir", work)
    assert "is a local store: give an MLflow server every node reaches" in refused(
        request, "--workdir", work, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db")
    assert "the request: 'request.parquet' is relative" in refused("request.parquet", "--workdir", work, *server)
    assert "--workdir: a submitted request needs the lineage's work directory" in refused(request, *server)
    relative = write_yaml(tmp_path / "relative.yaml", {"data": {"retain": "retain.parquet"}})
    assert "the policy's data.retain: 'retain.parquet' is relative" in refused(
        request, "--workdir", work, *server, config=relative)
    sets_forget = write_yaml(tmp_path / "bad.yaml", {"data": {"retain": "/r.parquet", "forget": "/f.parquet"}})
    assert "the policy sets data.forget: leave it out, the request is" in refused(
        request, "--workdir", work, *server, config=sets_forget)
    assert cli.main(["forget", request, "--model", "m", "--config", str(policy), "--no-follow"]) == 2
    assert "--runtime-env and --no-follow go with --address" in capsys.readouterr().err


def test_a_submitted_request_ships_its_policy_and_runs_forget_in_the_job(nothing_sent, tmp_path):
    raw = {"method": {"name": "gdiff"}, "data": {"retain": "/shared/retain.parquet"}, "evaluate": {"retain_rows": 8}}
    entrypoint, runtime_env = jobs.prepare_forget("/shared/req uest.parquet", "m/3", write_yaml(tmp_path / "p.yaml", raw),
                                                  tmp_path, tracking_uri=SERVER, workdir="/shared/work",
                                                  accept_damage=True)
    assert entrypoint == ("python -m hamu_ray.cli forget '/shared/req uest.parquet' --model m/3 --config policy.yaml "
                          f"--tracking-uri {SERVER} --workdir /shared/work --accept-damage")
    assert yaml.safe_load((tmp_path / "policy.yaml").read_text()) == raw
    assert runtime_env["working_dir"] == str(tmp_path) and runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == SERVER


def test_an_unreachable_cluster_is_a_message_not_a_traceback(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")  # --address wins over the environment
    address = f"http://127.0.0.1:{free_ports(1)[0]}"
    args = ["submit", str(PIPELINE), "--address", address, "--tracking-uri", SERVER,
            "--output-dir", str(tmp_path)]
    assert cli.main(args) == 2
    assert cli.main(["jobs", "logs", "raysubmit_x", "--address", address]) == 2
    err = capsys.readouterr().err
    assert err.count(f"cannot reach the Ray Jobs API at {address}") == 2, err
    assert "Traceback" not in err


# ---- the job-side refusal of local stores on a multi-node cluster ---------------------------

@pytest.mark.parametrize("uri, local", [
    ("sqlite:////data/mlflow.db", True), ("sqlite+pysqlite:///m.db", True), ("file:///data/mlruns", True),
    ("/data/mlruns", True), ("mlruns", True), ("http://mlflow:5000", False), ("https://mlflow.example", False),
    ("postgresql://u@db/mlflow", False), ("databricks", False), ("databricks://profile", False),
])
def test_local_stores_are_told_apart_from_servers(uri, local):
    assert is_local_store(uri) is local


def test_a_local_store_is_refused_on_a_cluster_of_several_nodes():
    two = [{"Alive": True}, {"Alive": True}]
    with pytest.raises(ConfigError, match="is a local MLflow store, but this Ray cluster has 2 nodes: "
                                          "a file or sqlite store on one node cannot be reached"):
        refuse_local_store_on_cluster("sqlite:////tmp/m.db", two)
    refuse_local_store_on_cluster("http://mlflow:5000", two)
    refuse_local_store_on_cluster("sqlite:////tmp/m.db", [{"Alive": True}, {"Alive": False}])


def test_a_driver_inside_a_job_asks_only_for_the_env_vars_the_job_lacks(monkeypatch):
    wanted = {"RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu"}
    monkeypatch.delenv(JOB_CONFIG_ENV, raising=False)
    assert joining_runtime_env(wanted) == {"env_vars": wanted}
    job = {"runtime_env": {"py_modules": ["gcs://x.zip"], "env_vars": {"RAY_AUTH_MODE": "disabled"}}}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(job))
    assert joining_runtime_env(wanted) == {"env_vars": {"DS_ACCELERATOR": "cpu"}}
    assert joining_runtime_env({"RAY_AUTH_MODE": "disabled"}) is None


# ---- a real two-node cluster on this host --------------------------------------------------

def free_ports(n: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def node_ports(ports: list[int]) -> list[str]:
    names = ("node-manager-port", "object-manager-port", "dashboard-agent-listen-port",
             "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port")
    return [f"--{name}={port}" for name, port in zip(names, ports)]


def wait_for(check, what: str, timeout_s: float, procs=()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: {proc.args[:3]} exited with {proc.returncode}")
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(1)
    raise TimeoutError(f"{what}: not ready after {timeout_s} s")


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status == 200


def alive_nodes(dashboard: str) -> int:
    from ray.util.state import list_nodes

    return sum(1 for node in list_nodes(address=dashboard) if node.state == "ALIVE")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop a process this fixture started, then anything left in its process group (each Popen
    has its own). `ray start --block` stops its node's processes itself on SIGTERM, but only if
    they are still there to be stopped: it goes first, alone. SIGKILL ends whatever remains."""
    if proc.args[1:2] == ["start"]:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=20)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:  # the group is empty
            break
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        time.sleep(1)
    proc.wait(timeout=10)


def stop_unfinished_jobs(dashboard: str) -> None:
    client = jobs.connect(dashboard)
    running = [job.submission_id for job in client.list_jobs() if not job.status.is_terminal()]
    for job_id in running:
        client.stop_job(job_id)
    wait_for(lambda: all(client.get_job_status(j).is_terminal() for j in running), "jobs stopped", 30)


def processes_under(root: Path) -> list:
    """Our Ray processes: every raylet, gcs_server, worker and agent names its temp dir."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and str(root) in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
    return found


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU, dashboard on 127.0.0.1) + a second node (1 CPU) + an MLflow server, every
    port chosen here so nothing collides with an embedded Ray another test starts."""
    root = Path(tempfile.mkdtemp(prefix="hr-jobs-", dir="/tmp"))  # short: Ray's socket paths
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    # `python` in the job's entrypoint is the venv's, as on a cluster image
    env.update(RUNTIME_ENV_DEFAULTS, PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")  # no Serve to drain: stop at once
    gcs, dash, client, mlflow_port, *ports = free_ports(16)
    procs: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(root / f"{name}.log", "w")
        proc = subprocess.Popen(list(args), env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc

    ray = str(bin_dir / "ray")
    dashboard = f"http://127.0.0.1:{dash}"
    server = f"http://127.0.0.1:{mlflow_port}"
    try:
        start("head", ray, "start", "--head", f"--port={gcs}", "--num-cpus=1", f"--temp-dir={root}/head",
              "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
              f"--ray-client-server-port={client}", *node_ports(ports[:6]), "--disable-usage-stats",
              "--block")
        start("mlflow", str(bin_dir / "mlflow"), "server", "--backend-store-uri",
              f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
              "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1")
        wait_for(lambda: http_ok(f"{dashboard}/api/version"), "Ray dashboard", 90, procs)
        start("node2", ray, "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=1",
              '--resources={"n2": 1}', f"--temp-dir={root}/node2", *node_ports(ports[6:12]),
              "--disable-usage-stats", "--block")
        wait_for(lambda: alive_nodes(dashboard) == 2, "two alive Ray nodes", 90, procs)
        wait_for(lambda: http_ok(f"{server}/health"), "MLflow server", 120, procs)
        yield {"dashboard": dashboard, "mlflow": server, "root": root}
    finally:
        with contextlib.suppress(Exception):  # a job's driver runs in its own session: stop it first
            stop_unfinished_jobs(dashboard)
        for proc in reversed(procs):
            stop_group(proc)
        left = processes_under(root)
        for proc in left:  # a Ray process that left our process groups: ours by its temp dir
            with contextlib.suppress(Exception):
                proc.kill()
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"Ray processes outlived their process groups: {[p.pid for p in left]}"


def small_pipeline(path: Path) -> Path:
    """digits.yaml with fewer epochs and steps and one method: the stages, not the accuracy,
    are under test."""
    raw = yaml.safe_load(PIPELINE.read_text())
    raw.pop("tune", None)
    raw["methods"] = raw["methods"][:1]
    raw["train"].update(epochs=2, progress_every=20)
    raw["unlearn"].update(max_steps=8, progress_every=4)
    return write_yaml(path, raw)


def own_files_pipeline(directory: Path) -> Path:
    """The small pipeline on the user's own files, so that only the method trains: the digits
    sets (class 3 forgotten) and the weights of an untrained model of the pipeline's shape."""
    import torch
    from safetensors.torch import save_file

    from hamu_ray.pipeline import datasets
    from hamu_ray.tasks.classifier import build_model

    raw = yaml.safe_load(small_pipeline(directory / "base.yaml").read_text())
    train, test = datasets.load_source("digits", seed=0)
    sets = datasets.write_sets(directory, train, test, *datasets.class_forget_indices(train.y, 3, 0.0, 0))
    cfg = PipelineConfig.model_validate(raw)
    torch.manual_seed(0)
    weights = directory / "original.safetensors"
    save_file({k: v.contiguous() for k, v in build_model(cfg.model).state_dict().items()}, weights)
    raw["data"] = {"source": "files", "forget": sets["forget"], "retain": sets["retain"], "test": sets["test"],
                   "forget_classes": [3], "batch_size": 32}
    raw["model"] = {**raw["model"], "weights": str(weights)}
    return write_yaml(directory / "own-digits.yaml", raw)


def cli_subprocess(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "hamu_ray.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=Path(__file__).parent.parent)


def job_id_in(stdout: str) -> str:
    line = next(line for line in stdout.splitlines() if line.startswith("submitted "))
    return line.split()[1]


@pytest.mark.integration
def test_a_submitted_pipeline_runs_on_two_nodes_and_tracks_to_the_server(cluster, tmp_path):
    import mlflow

    from hamu_ray.pipeline.evaluate import TABLE_COLUMNS

    out, env_file = tmp_path / "out", write_yaml(tmp_path / "env.yaml", {"env_vars": {"DS_ACCELERATOR": "cpu"}})
    started = time.perf_counter()
    done = cli_subprocess("submit", str(own_files_pipeline(tmp_path)),
                          "--address", cluster["dashboard"], "--tracking-uri", cluster["mlflow"],
                          "--output-dir", str(out), "--runtime-env", str(env_file))
    print(f"hamu-ray submit: {time.perf_counter() - started:.0f} s\n" + "\n".join(done.stdout.splitlines()[-20:]))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    job_id = job_id_in(done.stdout)
    assert f"{job_id} SUCCEEDED" in done.stdout
    assert (out / "report" / "comparison.csv").is_file()

    client = mlflow.MlflowClient(cluster["mlflow"])
    experiment = client.get_experiment_by_name("hamu-ray")
    [parent] = client.search_runs([experiment.experiment_id], filter_string="tags.kind = 'pipeline'")
    children = client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(run.info.run_name for run in children) == ["prepare", "unlearn-hamu-q"]
    assert all(run.info.status == "FINISHED" for run in [parent, *children])
    # the artifacts went through the server to its destination, not into the output directory
    assert "comparison.csv" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert list((cluster["root"] / "artifacts").rglob("comparison.csv"))
    assert not (out / "mlartifacts").exists()
    [version] = client.search_model_versions("name = 'digits'")  # registered through the server
    assert version.tags["role"] == "unlearned" and version.tags["stage"] == "unlearn-hamu-q"

    status = cli_subprocess("jobs", "status", job_id, "--address", cluster["dashboard"])
    assert status.returncode == 0 and status.stdout.startswith(f"{job_id}: SUCCEEDED"), status
    logs = cli_subprocess("jobs", "logs", job_id, "--address", cluster["dashboard"])
    assert any(line.split() == list(TABLE_COLUMNS) for line in logs.stdout.splitlines()), logs.stdout[-2000:]
    info = jobs.request(cluster["dashboard"], job_id, lambda c: c.get_job_info(job_id))
    assert info.runtime_env["py_modules"][0].startswith("gcs://")  # this checkout's hamu_ray


@pytest.mark.integration
def test_a_local_store_on_the_two_node_cluster_fails_the_job_before_training(cluster, tmp_path, capsys):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    code = cli.main(["submit", str(small_pipeline(tmp_path / "digits.yaml")), "--address", cluster["dashboard"],
                     "--tracking-uri", store, "--output-dir", str(tmp_path / "out")])
    captured = capsys.readouterr()
    assert code == 1, captured.out[-3000:]
    job_id = job_id_in(captured.out)
    assert f"job {job_id} FAILED; its full log: hamu-ray jobs logs {job_id}" in captured.err
    refusal = f"tracking.uri: {store} is a local MLflow store, but this Ray cluster has 2 nodes"
    assert refusal in captured.out  # streamed
    assert refusal in jobs.logs(cluster["dashboard"], job_id)
    assert not list((tmp_path / "out" / "stages").glob("original-*"))  # nothing was trained


@pytest.mark.integration
def test_a_job_can_be_stopped(cluster, tmp_path, capsys):
    code = cli.main(["submit", str(small_pipeline(tmp_path / "digits.yaml")), "--address", cluster["dashboard"],
                     "--tracking-uri", cluster["mlflow"], "--output-dir", str(tmp_path / "out"), "--no-follow"])
    out = capsys.readouterr().out
    assert code == 0
    job_id = job_id_in(out)
    assert f"hamu-ray jobs stop {job_id} --address {cluster['dashboard']}" in out
    wait_for(lambda: jobs.status(cluster["dashboard"], job_id)[0] == "RUNNING", "job running", 60)
    assert cli.main(["jobs", "stop", job_id, "--address", cluster["dashboard"]]) == 0
    assert f"{job_id}: stop requested" in capsys.readouterr().out
    wait_for(lambda: jobs.status(cluster["dashboard"], job_id)[0] == "STOPPED", "job stopped", 60)


@pytest.mark.integration
def test_a_submitted_request_registers_the_next_version_on_the_server(cluster, tiny_lm, tmp_path):
    """`hamu-ray forget --address`: a tiny Llama registered on the server forgets 4 rows in a job
    on the two-node cluster; the chain then verifies against the server."""
    import mlflow
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hamu_ray import receipt
    from hamu_ray.pipeline import registry, tracking
    from tests.lm_fixtures import qa_rows

    rows = qa_rows()
    pq.write_table(pa.Table.from_pylist(rows[:4]), tmp_path / "request.parquet")
    pq.write_table(pa.Table.from_pylist(rows[10:30]), tmp_path / "retain.parquet")
    policy = write_yaml(tmp_path / "policy.yaml", {
        "method": {"name": "gdiff"}, "train": {"lr": 0.01, "max_steps": 2}, "cluster": {"num_workers": 1},
        "data": {"retain": str(tmp_path / "retain.parquet"), "retain_batch_size": 4, "forget_batch_size": 2},
        "evaluate": {"retain_rows": 8}})
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(cluster["mlflow"])
    try:
        experiment = tracking.Store(cluster["mlflow"]).experiment_id("setup", None)
        with mlflow.start_run(experiment_id=experiment):
            registry.log_model({"kind": "causal_lm", "model_dir": str(tiny_lm)}, "tiny-submitted",
                               {"role": "original", "model_sha256": receipt.model_digest(tiny_lm)})
    finally:
        mlflow.set_tracking_uri(saved)
    env_file = write_yaml(tmp_path / "env.yaml", {"env_vars": {"DS_ACCELERATOR": "cpu"}})
    done = cli_subprocess("forget", str(tmp_path / "request.parquet"), "--model", "tiny-submitted",
                          "--config", str(policy), "--tracking-uri", cluster["mlflow"], "--workdir",
                          str(tmp_path / "work"), "--address", cluster["dashboard"], "--runtime-env", str(env_file))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "registered tiny-submitted version 2" in done.stdout and f"{job_id_in(done.stdout)} SUCCEEDED" in done.stdout
    client = mlflow.MlflowClient(cluster["mlflow"])
    assert client.get_model_version("tiny-submitted", "2").tags["lineage_parent"] == "1"
    verified = cli_subprocess("receipt", "verify-chain", "tiny-submitted", "--tracking-uri", cluster["mlflow"])
    assert verified.returncode == 0 and verified.stdout.count("ok ") == 4, verified.stdout + verified.stderr
