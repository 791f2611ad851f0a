"""Submit a pipeline to a Ray cluster as a Ray job, then follow, inspect or stop it.

Everything that can be checked on the submitting machine is checked before connecting: the
pipeline, the tracking URI, the output directory and the runtime-env file. The job ships the
validated pipeline (with the overrides applied) as its only working-directory file, and this
checkout's `hamu_ray` package as a py_module, so the cluster runs the code that was submitted.

The Jobs API talks to the head node's dashboard over HTTP (`http://HEAD:8265`), not to the GCS
port (6379) that `ray start --address` uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import hamu_ray
from hamu_ray.engine.config import parse_config
from hamu_ray.schema import ConfigError
from hamu_ray.pipeline.config import PipelineConfig, load_pipeline
from hamu_ray.schema import read_yaml
from hamu_ray.errors import UserError
from hamu_ray.inputs import local_inputs

PACKAGE_DIR = Path(hamu_ray.__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent
JOB_PIPELINE = "pipeline.yaml"  # the working directory's only file
RUNTIME_ENV_KEYS = ("env_vars", "pip")  # what a --runtime-env file may set
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
STATUS_WAIT_S = 30  # after the log stream ends, how long to wait for a terminal status


class JobsError(UserError, RuntimeError):
    """The cluster could not be reached, or refused a request: a message, not a traceback."""


@dataclass(frozen=True)
class JobSpec:
    """What `submit` sends: the entrypoint and the runtime env (working_dir is a temp dir)."""
    entrypoint: str
    runtime_env: dict[str, Any]
    config: PipelineConfig


# ---- the commands --------------------------------------------------------------------------

def submit(address: str | None, pipeline_path: str | Path, *, tune: bool = False, follow: bool = True,
           tracking_uri: str | None = None, output_dir: str | None = None,
           runtime_env_file: str | Path | None = None, overrides: Sequence[str] = ()) -> int:
    """Validate locally, submit, print the job id; with `follow` stream the logs and return
    0 when the job succeeded, 1 when it failed or was stopped."""
    address = resolve_address(address)
    with tempfile.TemporaryDirectory(prefix="hamu-ray-job-") as working_dir:
        spec = prepare_job(pipeline_path, Path(working_dir), tune=tune, tracking_uri=tracking_uri,
                           output_dir=output_dir, runtime_env_file=runtime_env_file,
                           overrides=overrides)
        client, job_id = send(address, spec.entrypoint, spec.runtime_env, {"hamu_ray.pipeline": spec.config.name})
    print(f"submitted {job_id} to {address}", flush=True)
    print(f"  output: {spec.config.output_dir}\n"
          f"  MLflow: {spec.runtime_env['env_vars']['MLFLOW_TRACKING_URI']}", flush=True)
    return follow_job(client, address, job_id) if follow else print_job_commands(address, job_id)


def send(address: str, entrypoint: str, runtime_env: dict[str, Any], metadata: dict[str, str]):
    """(client, job id) of a job submitted to `address`; the client zips and uploads the
    working directory and py_modules here."""
    client = connect(address)
    try:
        return client, client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata)
    except (RuntimeError, OSError) as exc:
        raise JobsError(f"the cluster at {address} refused the job: {exc}") from None


def print_job_commands(address: str, job_id: str) -> int:
    for command in ("status", "logs", "stop"):
        print(f"  hamu-ray jobs {command} {job_id} --address {address}")
    return 0


def submit_forget(address: str | None, request: str, model: str, policy_path: str | Path, *,
                  tracking_uri: str | None, workdir: str | None, accept_damage: bool = False,
                  runtime_env_file: str | Path | None = None, follow: bool = True) -> int:
    """`hamu-ray forget` as a Ray job: validated here, the policy shipped as the working
    directory's only file; 0 when the job succeeded (with `follow`)."""
    address = resolve_address(address)
    with tempfile.TemporaryDirectory(prefix="hamu-ray-forget-") as working_dir:
        entrypoint, runtime_env = prepare_forget(request, model, policy_path, Path(working_dir),
                                                 tracking_uri=tracking_uri, workdir=workdir,
                                                 accept_damage=accept_damage, runtime_env_file=runtime_env_file)
        client, job_id = send(address, entrypoint, runtime_env, {"hamu_ray.forget": model})
    print(f"submitted {job_id} to {address}\n  registry: {runtime_env['env_vars']['MLFLOW_TRACKING_URI']}\n"
          f"  workdir: {workdir}", flush=True)
    return follow_job(client, address, job_id) if follow else print_job_commands(address, job_id)


def prepare_forget(request: str, model: str, policy_path: str | Path, working_dir: Path, *,
                   tracking_uri: str | None, workdir: str | None, accept_damage: bool = False,
                   runtime_env_file: str | Path | None = None) -> tuple[str, dict[str, Any]]:
    """The entrypoint and runtime env of a forget job, every check that needs no cluster done:
    the request, the policy's files and the work directory by absolute path (storage every node
    sees), a registry server every node reaches, the policy as `forget` reads it."""
    import shlex

    from hamu_ray import lineage
    from hamu_ray.pipeline.tracking import is_local_store

    runtime_file = read_runtime_env_file(runtime_env_file) if runtime_env_file else {}
    uri = (tracking_uri or runtime_file.get("env_vars", {}).get("MLFLOW_TRACKING_URI")
           or os.environ.get("MLFLOW_TRACKING_URI"))
    if not uri or is_local_store(uri):
        raise ConfigError(f"--tracking-uri: {'a submitted request needs the registry' if not uri else uri + ' is a local store'}"
                          ": give an MLflow server every node reaches (e.g. http://mlflow.internal:5000)")
    policy, evaluation, _ = lineage.read_policy(policy_path)
    if workdir is None:
        raise ConfigError("--workdir: a submitted request needs the lineage's work directory (its jobs and "
                          "digest key) as an absolute path on storage every node sees")
    paths = {"the request": request, "--workdir": workdir, "the policy's data.retain": (policy.get("data") or {}).get("retain"),
             "the policy's evaluate.holdout": evaluation["holdout"]}
    for what, path in paths.items():
        if path is not None and "://" not in str(path) and not Path(path).is_absolute():
            raise ConfigError(f"{what}: {path!r} is relative; inside the job it would resolve against the job's "
                              "temporary working directory: give an absolute path every node sees")
    (working_dir / "policy.yaml").write_text(yaml.safe_dump(policy, sort_keys=False))
    command = ["python", "-m", "hamu_ray.cli", "forget", request, "--model", model, "--config", "policy.yaml",
               "--tracking-uri", uri, "--workdir", workdir] + ["--accept-damage"] * accept_damage
    return shlex.join(command), job_runtime_env(working_dir, runtime_file, uri)


def status(address: str | None, job_id: str) -> tuple[str, str]:
    """(status, Ray's message about it)."""
    address = resolve_address(address)
    info = request(address, job_id, lambda client: client.get_job_info(job_id))
    return str(info.status), info.message or ""


def logs(address: str | None, job_id: str) -> str:
    address = resolve_address(address)
    return request(address, job_id, lambda client: client.get_job_logs(job_id))


def stop(address: str | None, job_id: str) -> bool:
    """Ask Ray to stop the job; True if it was running."""
    address = resolve_address(address)
    return request(address, job_id, lambda client: client.stop_job(job_id))


# ---- local validation (no connection) ------------------------------------------------------

def resolve_address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS (Ray's own order);
    a bare host:port is taken as the dashboard's HTTP address."""
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ConfigError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard, "
                          "which serves the Jobs API) or set $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS")
    return address if "://" in address else f"http://{address}"


def prepare_job(pipeline_path: str | Path, working_dir: Path, *, tune: bool = False,
                tracking_uri: str | None = None, output_dir: str | None = None,
                runtime_env_file: str | Path | None = None, overrides: Sequence[str] = ()) -> JobSpec:
    """Validate everything and write working_dir/pipeline.yaml (KEY=VALUE `overrides` applied);
    never connects."""
    cfg = load_pipeline(pipeline_path, overrides)
    runtime_file = read_runtime_env_file(runtime_env_file) if runtime_env_file else {}
    file_vars = runtime_file.get("env_vars", {})
    uri = (tracking_uri or cfg.tracking.uri or file_vars.get("MLFLOW_TRACKING_URI")
           or os.environ.get("MLFLOW_TRACKING_URI"))
    if not uri:
        raise ConfigError(
            f"{pipeline_path}: tracking.uri: a submitted job needs an explicit MLflow tracking URI "
            "(on a cluster, an MLflow server every node reaches, e.g. http://mlflow.internal:5000): "
            "pass --tracking-uri, set tracking.uri in the pipeline, MLFLOW_TRACKING_URI in the "
            "runtime-env file's env_vars, or $MLFLOW_TRACKING_URI")
    out = output_dir or cfg.output_dir
    source = "--output-dir" if output_dir else f"{pipeline_path}: output_dir"
    if not Path(out).is_absolute():
        raise ConfigError(
            f"{source}: {out!r} is relative; a submitted job runs in a temporary working directory "
            "on the cluster, so its results would be lost. Pass --output-dir with an absolute path "
            "on storage every node sees (e.g. a shared NFS or object-store mount)")
    if relative := relative_paths(cfg):
        raise ConfigError("\n".join(
            f"{pipeline_path}: {field}: {path!r} is relative; inside the job it would resolve against "
            "the job's temporary working directory: make it absolute (a path every node sees)"
            for field, path in relative))

    raw = cfg.model_dump(by_alias=True)
    raw["output_dir"] = out
    raw["tracking"]["uri"] = uri
    shipped = parse_config(raw, source=f"{pipeline_path} (as submitted)", schema=PipelineConfig)
    text = yaml.safe_dump(shipped.model_dump(by_alias=True), sort_keys=False)
    if parse_config(yaml.safe_load(text), source=JOB_PIPELINE, schema=PipelineConfig) != shipped:
        raise RuntimeError(f"{pipeline_path}: the pipeline does not survive a YAML round trip")
    (working_dir / JOB_PIPELINE).write_text(text)

    command = "tune" if tune else "run"
    return JobSpec(f"python -m hamu_ray.cli {command} {JOB_PIPELINE}",
                   job_runtime_env(working_dir, runtime_file, uri), shipped)


def job_runtime_env(working_dir: Path, runtime_file: dict[str, Any], uri: str) -> dict[str, Any]:
    """The working directory, this checkout's package, the environment the job's processes need
    (the submitting shell's kernel pins; the runtime-env file's variables win) and its pip."""
    from hamu_ray.engine.driver import RUNTIME_ENV_DEFAULTS
    from hamu_ray.kernels import kernel_env

    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "py_modules": [str(PACKAGE_DIR)],
        "excludes": ["__pycache__/", "*.pyc"],
        "env_vars": {**RUNTIME_ENV_DEFAULTS, **kernel_env(), **runtime_file.get("env_vars", {}),
                     "MLFLOW_TRACKING_URI": uri},
    }
    if "pip" in runtime_file:
        runtime_env["pip"] = runtime_file["pip"]
    return runtime_env


def relative_paths(cfg: PipelineConfig) -> list[tuple[str, str]]:
    """(field, path) of every local input named by a relative path: the built-in sets' root, the
    user's files, weights and model directories (inputs.local_inputs)."""
    return [(field, path) for field, path in local_inputs(cfg) if not Path(path).is_absolute()]


def read_runtime_env_file(path: str | Path) -> dict[str, Any]:
    """A mapping with optional `env_vars` (str → str) and `pip` (a list of requirements, or a
    requirements file relative to the current directory or the repository root)."""
    raw = read_yaml(path)
    problems = [f"{path}: {key}: unknown key; a runtime-env file may set {', '.join(RUNTIME_ENV_KEYS)}"
                for key in raw if key not in RUNTIME_ENV_KEYS]
    env_vars = raw.get("env_vars", {})
    if not isinstance(env_vars, dict):
        problems.append(f"{path}: env_vars: expected a mapping of names to strings, "
                        f"got {type(env_vars).__name__}")
        env_vars = {}
    for name, value in env_vars.items():
        if not isinstance(name, str) or not isinstance(value, str):
            problems.append(f"{path}: env_vars.{name}: expected a string, got {value!r} "
                            f"({type(value).__name__}); quote it in the YAML")
    result: dict[str, Any] = {"env_vars": dict(env_vars)} if env_vars else {}
    if "pip" in raw:
        pip = raw["pip"]
        if isinstance(pip, list) and all(isinstance(item, str) for item in pip):
            result["pip"] = pip
        elif isinstance(pip, str):
            found = find_requirements(pip)
            if found is None:
                problems.append(f"{path}: pip: no requirements file {pip!r} (looked in {Path.cwd()} "
                                f"and {REPO_ROOT})")
            else:
                result["pip"] = str(found)
        else:
            problems.append(f"{path}: pip: expected a list of requirement strings or a requirements "
                            f"file path, got {pip!r}")
    if problems:
        raise ConfigError("invalid runtime-env file:\n  " + "\n  ".join(problems))
    return result


def find_requirements(name: str) -> Path | None:
    candidates = [Path(name)] if Path(name).is_absolute() else [Path.cwd() / name, REPO_ROOT / name]
    return next((p.resolve() for p in candidates if p.is_file()), None)


# ---- talking to the cluster ----------------------------------------------------------------

def connect(address: str):
    """A JobSubmissionClient for exactly `address`.

    Ray lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override the address argument; pinning the
    first to our choice while the client is built makes --address win, as a user expects.
    """
    from ray.job_submission import JobSubmissionClient

    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        return JobSubmissionClient(address)
    except (OSError, RuntimeError) as exc:
        raise JobsError(f"cannot reach the Ray Jobs API at {address}: {exc}\n  Is the cluster up, "
                        "and is this the dashboard's HTTP address (http://HEAD:8265, started with "
                        "--include-dashboard=true), not the GCS port?") from None
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS", None)
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def request(address: str, job_id: str, call):
    client = connect(address)
    try:
        return call(client)
    except (RuntimeError, OSError) as exc:
        raise JobsError(f"job {job_id} at {address}: {exc}") from None


def follow_job(client, address: str, job_id: str) -> int:
    """Stream the job's logs to stdout until it ends; the exit code follows its final status."""
    try:
        asyncio.run(stream_logs(client, job_id))
    except KeyboardInterrupt:
        print(f"\nstopped following; {job_id} keeps running. "
              f"Stop it with: hamu-ray jobs stop {job_id} --address {address}", file=sys.stderr)
        return 130
    except (RuntimeError, OSError) as exc:  # the stream broke; the job may still be running
        print(f"hamu-ray: lost the log stream of {job_id} ({exc}); waiting for its status",
              file=sys.stderr)
    final = wait_for_terminal(client, job_id)
    if final == "SUCCEEDED":
        print(f"{job_id} SUCCEEDED", flush=True)
        return 0
    print(f"hamu-ray: job {job_id} {final}; its full log: hamu-ray jobs logs {job_id} "
          f"--address {address}", file=sys.stderr)
    return 1


async def stream_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):  # ends when the job reaches a final status
        sys.stdout.write(chunk)
        sys.stdout.flush()


def wait_for_terminal(client, job_id: str, timeout_s: float = STATUS_WAIT_S) -> str:
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(RuntimeError, OSError):
        while True:
            current = str(client.get_job_status(job_id))
            if current in TERMINAL or time.monotonic() > deadline:
                return current
            time.sleep(1)
    return "UNKNOWN (the cluster stopped answering)"

