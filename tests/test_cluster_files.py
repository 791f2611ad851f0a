"""The files under cluster/ hold what their tools need, and what they reference is in the repo.

Each check is a small function returning a list of problems (empty: fine), run on the real files
and on broken in-memory copies, so every check is shown to fail when it should. Nothing starts:
no Ray, no Docker, no Kubernetes.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any, Callable

import jsonschema
import pytest
import yaml

from hamu_ray.schema import ConfigError
from hamu_ray.pipeline.config import load_pipeline

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
IMAGE_ROOT = "/app"  # the repo's place in the image (cluster/Dockerfile's WORKDIR)
STORAGE = "/mnt/cluster_storage"  # shared storage on every node
DASHBOARD_PORT = "8265"  # the Jobs API


# ---- shared helpers ---------------------------------------------------------------------------

def repo_path(ref: str) -> Path:
    """A path as the image sees it (relative to /app, or under /app) → the repo's file."""
    return REPO / ref.removeprefix(IMAGE_ROOT + "/")


def check_pipeline_ref(ref: str) -> list[str]:
    path = repo_path(ref)
    if not path.is_file():
        return [f"pipeline {ref}: no such file in the repo"]
    try:
        load_pipeline(path)
    except ConfigError as exc:
        return [f"pipeline {ref} does not validate: {exc}"]
    return []


def check_env_vars(env: Any, where: str) -> list[str]:
    if not isinstance(env, dict):
        return [f"{where}: env_vars must be a mapping, got {type(env).__name__}"]
    return [f"{where}: env var {k!r} must be a string → string, got {v!r}"
            for k, v in env.items() if not (isinstance(k, str) and isinstance(v, str))]


def flag(command: str, name: str) -> str | None:
    """The value of --name=V or --name V in a shell command; None when absent."""
    match = re.search(rf"--{re.escape(name)}(?:=|\s+)(\S+)", command)
    return match.group(1) if match else None


# ---- cluster launcher (ray up) ----------------------------------------------------------------

def ray_schema() -> dict:
    """Ray's own schema for launcher configs, read from the installed package without importing it."""
    spec = importlib.util.find_spec("ray")
    assert spec is not None and spec.submodule_search_locations
    path = Path(spec.submodule_search_locations[0]) / "autoscaler" / "ray-schema.json"
    return json.loads(path.read_text())


def check_launcher(cfg: dict) -> list[str]:
    problems = []
    for key in ("cluster_name", "max_workers", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands"):
        if key not in cfg:
            problems.append(f"launcher: missing {key}")
    if not (cfg.get("provider") or {}).get("type"):
        problems.append("launcher: missing provider.type")
    try:
        jsonschema.validate(cfg, ray_schema())
    except jsonschema.ValidationError as exc:
        problems.append(f"launcher: Ray's schema rejects {'.'.join(map(str, exc.path))}: {exc.message}")

    types = cfg.get("available_node_types") or {}
    for name, node in types.items():
        for key in ("node_config", "resources", "min_workers", "max_workers"):
            if key not in node:
                problems.append(f"launcher: node type {name}: missing {key}")
        low, high = node.get("min_workers", 0), node.get("max_workers", 0)
        if isinstance(low, int) and isinstance(high, int) and not low <= high <= cfg.get("max_workers", high):
            problems.append(f"launcher: node type {name}: need min_workers ≤ max_workers ≤ the "
                            f"cluster's max_workers, got {low}, {high}")
    if cfg.get("head_node_type") not in types:
        problems.append(f"launcher: head_node_type {cfg.get('head_node_type')!r} is not in "
                        f"available_node_types ({', '.join(types)})")
    if not any(n.get("resources", {}).get("GPU", 0) > 0 for n in types.values()):
        problems.append("launcher: no node type offers GPUs")

    head = [c for c in cfg.get("head_start_ray_commands") or [] if "ray start" in c and "--head" in c]
    if not head:
        problems.append("launcher: head_start_ray_commands has no `ray start --head`")
    for command in head:
        if flag(command, "dashboard-host") != "0.0.0.0":
            problems.append("launcher: the head's dashboard (the Jobs API) must listen on 0.0.0.0 "
                            "(--dashboard-host=0.0.0.0)")
        if flag(command, "dashboard-port") not in (None, DASHBOARD_PORT):
            problems.append(f"launcher: the Jobs API must be on port {DASHBOARD_PORT}")
    if not any("ray start" in c and "--address" in c for c in cfg.get("worker_start_ray_commands") or []):
        problems.append("launcher: worker_start_ray_commands has no `ray start --address=...`")

    # Shared storage: mounted on every host, then bind-mounted into the container.
    commands = cfg.get("initialization_commands", []) + cfg.get("setup_commands", [])
    if not any(STORAGE in c and "mount" in c for c in commands):
        problems.append(f"launcher: no initialization/setup command mounts shared storage at {STORAGE}")
    docker = cfg.get("docker") or {}
    if not any(f"{STORAGE}:{STORAGE}" in o for o in docker.get("run_options", [])):
        problems.append(f"launcher: docker.run_options must bind-mount {STORAGE} into the container")
    if not docker.get("image"):
        problems.append("launcher: docker.image is missing (the image from cluster/Dockerfile)")
    return problems


# ---- KubeRay (RayCluster, RayJob) and the shared volume claim ---------------------------------

def pod_problems(template: Any, where: str, claims: set[str]) -> list[str]:
    spec = (template or {}).get("spec") or {}
    containers = spec.get("containers") or []
    if not containers:
        return [f"{where}: template.spec.containers is empty"]
    problems = [f"{where}: container {c.get('name', i)!r} has no image"
                for i, c in enumerate(containers) if not c.get("image")]
    volumes = {v.get("name"): v for v in spec.get("volumes") or []}
    mounts = [m for m in containers[0].get("volumeMounts") or [] if m.get("mountPath") == STORAGE]
    if not mounts:
        problems.append(f"{where}: nothing mounted at {STORAGE} (shared storage)")
    for mount in mounts:
        claim = ((volumes.get(mount.get("name")) or {}).get("persistentVolumeClaim") or {}).get("claimName")
        if claim not in claims:
            problems.append(f"{where}: {STORAGE} must come from a volume claim defined in "
                            f"cluster/kuberay ({', '.join(sorted(claims)) or 'none'}), got {claim!r}")
    return problems


def check_ray_cluster_spec(spec: Any, where: str, claims: set[str]) -> list[str]:
    if not isinstance(spec, dict):
        return [f"{where}: missing"]
    head = spec.get("headGroupSpec") or {}
    params = head.get("rayStartParams")
    problems = []
    if not isinstance(params, dict):
        problems.append(f"{where}.headGroupSpec.rayStartParams: missing")
    else:  # KubeRay takes map[string]string: a bare number or boolean is rejected
        problems += [f"{where}.headGroupSpec.rayStartParams.{k}: must be a string, got {v!r}"
                     for k, v in params.items() if not isinstance(v, str)]
        if params.get("dashboard-host") != "0.0.0.0":
            problems.append(f"{where}.headGroupSpec.rayStartParams: dashboard-host must be "
                            "\"0.0.0.0\" (the Jobs API)")
    problems += pod_problems(head.get("template"), f"{where}.headGroupSpec", claims)

    groups = spec.get("workerGroupSpecs") or []
    if not groups:
        problems.append(f"{where}.workerGroupSpecs: empty")
    for i, group in enumerate(groups):
        at = f"{where}.workerGroupSpecs[{i}]"
        missing = [k for k in ("groupName", "replicas", "minReplicas", "maxReplicas") if k not in group]
        problems += [f"{at}: missing {k}" for k in missing]
        if not missing and not group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]:
            problems.append(f"{at}: need minReplicas ≤ replicas ≤ maxReplicas")
        problems += pod_problems(group.get("template"), at, claims)
    if not any(gpus_per_pod(g) > 0 for g in groups):
        problems.append(f"{where}.workerGroupSpecs: no group asks for nvidia.com/gpu")
    return problems


def gpus_per_pod(group: dict) -> int:
    containers = ((group.get("template") or {}).get("spec") or {}).get("containers") or [{}]
    limits = (containers[0].get("resources") or {}).get("limits") or {}
    return int(limits.get("nvidia.com/gpu", 0))


def entrypoint_pipelines(entrypoint: str) -> list[str]:
    """The pipelines a `hamu-ray run` / `python -m hamu_ray.cli run` entrypoint names."""
    args = shlex.split(entrypoint)
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a == "run"]


def check_kuberay(doc: dict, claims: set[str]) -> list[str]:
    kind = doc.get("kind")
    name = (doc.get("metadata") or {}).get("name")
    where = f"{kind} {name}"
    problems = [] if name else [f"{kind}: metadata.name is missing"]
    if kind == "PersistentVolumeClaim":
        if "ReadWriteMany" not in (doc.get("spec") or {}).get("accessModes", []):
            problems.append(f"{where}: pods on different nodes share it: accessModes ReadWriteMany")
        return problems
    if doc.get("apiVersion") != "ray.io/v1":
        problems.append(f"{where}: apiVersion must be ray.io/v1, got {doc.get('apiVersion')!r}")
    spec = doc.get("spec") or {}
    if kind == "RayCluster":
        return problems + check_ray_cluster_spec(spec, where, claims)
    if kind != "RayJob":
        return problems + [f"{where}: unexpected kind"]

    problems += check_ray_cluster_spec(spec.get("rayClusterSpec"), f"{where}.rayClusterSpec", claims)
    entrypoint = spec.get("entrypoint")
    if not isinstance(entrypoint, str):
        return problems + [f"{where}: spec.entrypoint is missing"]
    pipelines = entrypoint_pipelines(entrypoint)
    if not pipelines:
        problems.append(f"{where}: the entrypoint runs no pipeline (hamu-ray run PIPELINE)")
    for ref in pipelines:
        problems += [f"{where}: {p}" for p in check_pipeline_ref(ref)]
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{where}: shutdownAfterJobFinishes should be true (GPUs go back after the run)")
    if not isinstance(spec.get("ttlSecondsAfterFinished"), int):
        problems.append(f"{where}: ttlSecondsAfterFinished must be a number of seconds")
    try:
        env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}")
    except yaml.YAMLError as exc:
        return problems + [f"{where}: runtimeEnvYAML is not YAML: {exc}"]
    if not isinstance(env, dict):
        return problems + [f"{where}: runtimeEnvYAML must be a mapping"]
    env_vars = env.get("env_vars", {})
    problems += check_env_vars(env_vars, f"{where}.runtimeEnvYAML")
    # A pipeline with tracking.uri null logs to $MLFLOW_TRACKING_URI: the job must set it.
    for ref in pipelines:
        if repo_path(ref).is_file() and not check_pipeline_ref(ref):
            pipeline = load_pipeline(repo_path(ref))
            if pipeline.tracking.uri is None and "MLFLOW_TRACKING_URI" not in (env_vars or {}):
                problems.append(f"{where}: {ref} leaves tracking.uri to $MLFLOW_TRACKING_URI, "
                                "which runtimeEnvYAML does not set")
            gpus = sum(g.get("replicas", 0) * gpus_per_pod(g)
                       for g in (spec.get("rayClusterSpec") or {}).get("workerGroupSpecs") or [])
            if gpus < pipeline.cluster.num_workers:
                problems.append(f"{where}: {gpus} GPU(s) for {ref}'s {pipeline.cluster.num_workers} workers")
    return problems


# ---- Dockerfile ---------------------------------------------------------------------------------

def dockerfile_instructions(lines: list[str]) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in lines:
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        instruction, _, args = text.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def check_dockerfile(lines: list[str]) -> list[str]:
    instructions = dockerfile_instructions(lines)
    problems = []
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    bases = [re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), a.split()[0])
             for i, a in instructions if i == "FROM"]
    if not bases:
        problems.append("Dockerfile: no FROM")
    ray_pin = re.search(r"^ray==(\S+)$", (REPO / "requirements/lock.txt").read_text(), re.M)
    for base in bases:
        if ray_pin and f":{ray_pin.group(1)}-" not in base:
            problems.append(f"Dockerfile: base {base} is not Ray {ray_pin.group(1)} "
                            "(requirements/lock.txt)")

    sources = []
    for instruction, arg in instructions:
        if instruction == "COPY" and "--from=" not in arg:
            parts = [p for p in shlex.split(arg) if not p.startswith("--")]
            sources += parts[:-1]  # the last one is the destination
    problems += [f"Dockerfile: COPY source {s} is not in the repo (the build context)"
                 for s in sources if not (REPO / s).exists()]
    lock = "requirements/lock.txt"
    if not any(s.rstrip("/") in (".", lock, "requirements") for s in sources):
        problems.append(f"Dockerfile: no COPY brings {lock} into the image")
    if not any(i == "RUN" and lock in a and "pip install" in a for i, a in instructions):
        problems.append(f"Dockerfile: no RUN installs {lock}")
    if not any(i == "RUN" and re.search(r"pip install .*--no-deps \.($|\s)", a) for i, a in instructions):
        problems.append("Dockerfile: the project is not installed (pip install --no-deps .)")
    if ("WORKDIR", IMAGE_ROOT) not in instructions:
        problems.append(f"Dockerfile: WORKDIR must be {IMAGE_ROOT} (entrypoints name pipelines/... from it)")
    return problems


# ---- runtime env (hamu-ray submit --runtime-env) ------------------------------------------------

def check_runtime_env(env: Any) -> list[str]:
    if env is None:
        return []
    if not isinstance(env, dict):
        return ["runtime_env: the top level must be a mapping"]
    problems = [f"runtime_env: unknown key {k!r}; only env_vars and pip"
                for k in env if k not in ("env_vars", "pip")]
    if "env_vars" in env:
        problems += check_env_vars(env["env_vars"], "runtime_env")
    pip = env.get("pip")
    if isinstance(pip, str):
        if not (REPO / pip).is_file():
            problems.append(f"runtime_env: pip file {pip} is not in the repo")
    elif isinstance(pip, list):
        problems += [f"runtime_env: pip entry {p!r} must be a string" for p in pip if not isinstance(p, str)]
    elif "pip" in env:
        problems.append("runtime_env: pip must be a list of requirements or a requirements file")
    return problems


# ---- dispatch over every file under cluster/ --------------------------------------------------

def volume_claims() -> set[str]:
    return {d["metadata"]["name"] for p in sorted((CLUSTER / "kuberay").glob("*.yaml"))
            for d in yaml.safe_load_all(p.read_text()) if d and d.get("kind") == "PersistentVolumeClaim"}


def check_job(path: Path) -> list[str]:
    """An unlearning job for the cluster: it validates and reads and writes shared storage."""
    from hamu_ray.engine.config import load_config

    try:
        job = load_config(path)
    except ConfigError as exc:
        return [f"{path}: does not validate: {exc}"]
    paths = {"output_dir": job.output_dir, "data.forget": job.data.forget, "data.retain": job.data.retain,
             "model.path": getattr(job.model, "path", STORAGE)}
    return [f"{path}: {field} {value} is not on the shared storage {STORAGE}"
            for field, value in paths.items() if not str(value).startswith(STORAGE + "/")]


def check_model_shape(path: Path) -> list[str]:
    """A config.json for `hamu-ray plan`: transformers reads it as a causal-LM configuration."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path.parent)
    except (OSError, ValueError) as exc:
        return [f"{path}: transformers cannot read it: {exc}"]
    return [] if config.architectures and config.architectures[0].endswith("ForCausalLM") else [
        f"{path}: not a causal-LM configuration ({config.architectures})"]


def check_file(path: Path) -> list[str]:
    if path.name == "Dockerfile":
        return check_dockerfile(path.read_text().splitlines())
    if path.name == "README.md":
        return [] if path.read_text().strip() else [f"{path}: empty"]
    if path.parent.parent.name == "models" and path.name == "config.json":
        return check_model_shape(path)
    if path.parent.name == "jobs" and path.suffix == ".yaml":
        return check_job(path)
    if path.suffix not in (".yaml", ".yml"):
        return [f"{path}: no check knows this file; add one to tests/test_cluster_files.py"]
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    if path.name.startswith("runtime_env"):
        return check_runtime_env(docs[0] if docs else None)
    if path.parent.name == "kuberay":
        return [p for d in docs for p in check_kuberay(d, volume_claims())]
    if docs and "provider" in docs[0]:
        return check_launcher(docs[0])
    return [f"{path}: no check knows this file; add one to tests/test_cluster_files.py"]


CLUSTER_FILES = sorted(p for p in CLUSTER.rglob("*") if p.is_file())


def test_the_cluster_folder_has_the_expected_files():
    names = {str(p.relative_to(CLUSTER)) for p in CLUSTER_FILES}
    assert {"ray-cluster.yaml", "runtime_env.yaml", "Dockerfile", "kuberay/raycluster.yaml",
            "kuberay/rayjob.yaml", "kuberay/shared-storage.yaml"} <= names


@pytest.mark.parametrize("path", CLUSTER_FILES, ids=lambda p: str(p.relative_to(CLUSTER)))
def test_cluster_file_passes_its_checks(path):
    assert check_file(path) == []


def test_job_and_model_checks_fail_on_bad_files(tmp_path):
    job = yaml.safe_load((CLUSTER / "jobs" / "llama-8b-full.yaml").read_text())
    job["output_dir"] = "/tmp/run"
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "local.yaml").write_text(yaml.safe_dump(job))
    assert "output_dir /tmp/run is not on the shared storage" in check_job(tmp_path / "jobs" / "local.yaml")[0]
    job["train"]["zero_stage"] = 7
    (tmp_path / "jobs" / "bad.yaml").write_text(yaml.safe_dump(job))
    assert "does not validate" in check_job(tmp_path / "jobs" / "bad.yaml")[0]
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert "not a causal-LM configuration" in check_model_shape(tmp_path / "m" / "config.json")[0]


def test_cluster_pipeline_writes_to_shared_storage_and_validates():
    assert check_pipeline_ref("pipelines/fashion_mnist_cluster.yaml") == []
    cfg = load_pipeline(REPO / "pipelines/fashion_mnist_cluster.yaml")
    assert cfg.output_dir.startswith(STORAGE + "/")
    assert cfg.model.kind == "cnn" and cfg.cluster.num_workers == 4


def test_launcher_and_kuberay_run_the_same_image():
    images = {yaml.safe_load((CLUSTER / "ray-cluster.yaml").read_text())["docker"]["image"]}
    for path in (CLUSTER / "kuberay").glob("*.yaml"):
        images |= set(re.findall(r"^\s*image:\s*(\S+)", path.read_text(), re.M))
    assert len(images) == 1, images


# ---- each check can fail: broken in-memory copies of the real files ---------------------------

def load(relative: str) -> Any:
    return yaml.safe_load((CLUSTER / relative).read_text())


def rayjob() -> dict:
    return load("kuberay/rayjob.yaml")


def raycluster() -> dict:
    return load("kuberay/raycluster.yaml")


def kuberay_broken(manifest: Callable[[], dict], path: str, value: Any) -> Callable[[], list[str]]:
    """What check_kuberay reports for a copy of the manifest with one value changed."""
    return lambda: check_kuberay(set_in(manifest(), path, value), volume_claims())


def set_in(doc: dict, path: str, value: Any) -> dict:
    """Set (or, with value DELETE, remove) a dotted path; integers index lists."""
    *parents, last = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = doc
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return doc


DELETE = object()
WORKER = "spec.workerGroupSpecs.0"
JOB_WORKER = "spec.rayClusterSpec.workerGroupSpecs.0"
BROKEN: dict[str, tuple[Callable[[], list[str]], str]] = {
    # launcher
    "launcher-no-cluster-name": (
        lambda: check_launcher(set_in(load("ray-cluster.yaml"), "cluster_name", DELETE)), "cluster_name"),
    "launcher-no-provider-type": (
        lambda: check_launcher(set_in(load("ray-cluster.yaml"), "provider.type", DELETE)), "provider.type"),
    "launcher-unknown-head-type": (
        lambda: check_launcher(set_in(load("ray-cluster.yaml"), "head_node_type", "nope")), "'nope'"),
    "launcher-node-type-without-max-workers": (
        lambda: check_launcher(set_in(load("ray-cluster.yaml"), "available_node_types.gpu-worker.max_workers",
                                      DELETE)), "gpu-worker: missing max_workers"),
    "launcher-no-gpu-node-type": (
        lambda: check_launcher(set_in(load("ray-cluster.yaml"), "available_node_types.gpu-worker", DELETE)),
        "no node type offers GPUs"),
    "launcher-fractional-resources": (  # Ray's schema: resources are integers
        lambda: check_launcher(set_in(load("ray-cluster.yaml"),
                                      "available_node_types.cpu-head.resources", {"CPU": 0.5})), "schema"),
    "launcher-dashboard-on-localhost": (
        lambda: check_launcher(set_in(load("ray-cluster.yaml"), "head_start_ray_commands.1",
                                      "ray start --head --port=6379")), "0.0.0.0"),
    "launcher-dashboard-other-port": (
        lambda: check_launcher(set_in(load("ray-cluster.yaml"), "head_start_ray_commands.1",
                                      "ray start --head --dashboard-host=0.0.0.0 --dashboard-port 9000")),
        DASHBOARD_PORT),
    "launcher-no-worker-start": (
        lambda: check_launcher(set_in(load("ray-cluster.yaml"), "worker_start_ray_commands", ["ray stop"])),
        "ray start --address"),
    "launcher-no-shared-storage": (
        lambda: check_launcher(set_in(load("ray-cluster.yaml"), "initialization_commands", [])), STORAGE),
    "launcher-storage-not-in-container": (
        lambda: check_launcher(set_in(load("ray-cluster.yaml"), "docker.run_options", [])), "bind-mount"),
    # RayCluster
    "raycluster-old-api": (
        kuberay_broken(raycluster, "apiVersion", "ray.io/v1alpha1"),
        "apiVersion"),
    "raycluster-no-name": (
        kuberay_broken(raycluster, "metadata.name", DELETE), "metadata.name"),
    "raycluster-no-start-params": (
        kuberay_broken(raycluster, "spec.headGroupSpec.rayStartParams", DELETE), "rayStartParams"),
    "raycluster-numeric-start-param": (
        kuberay_broken(raycluster, "spec.headGroupSpec.rayStartParams.num-gpus", 0), "must be a string"),
    "raycluster-no-image": (
        kuberay_broken(raycluster, "spec.headGroupSpec.template.spec.containers.0.image", DELETE),
        "no image"),
    "raycluster-no-group-name": (
        kuberay_broken(raycluster, f"{WORKER}.groupName", DELETE),
        "groupName"),
    "raycluster-replicas-above-max": (
        kuberay_broken(raycluster, f"{WORKER}.replicas", 99), "maxReplicas"),
    "raycluster-no-gpus": (
        kuberay_broken(raycluster, f"{WORKER}.template.spec.containers.0.resources.limits", {"cpu": "8"}),
        "nvidia.com/gpu"),
    "raycluster-unknown-claim": (
        kuberay_broken(raycluster, f"{WORKER}.template.spec.volumes.0.persistentVolumeClaim",
                       {"claimName": "elsewhere"}),
        "'elsewhere'"),
    "raycluster-no-shared-mount": (
        kuberay_broken(raycluster, "spec.headGroupSpec.template.spec.containers.0.volumeMounts", []),
        STORAGE),
    # RayJob
    "rayjob-missing-pipeline": (
        kuberay_broken(rayjob, "spec.entrypoint", "python -m hamu_ray.cli run pipelines/nope.yaml"),
        "no such file"),
    "rayjob-invalid-pipeline": (  # a real YAML file that is not a pipeline
        kuberay_broken(rayjob, "spec.entrypoint", "hamu-ray run cluster/runtime_env.yaml"),
        "does not validate"),
    "rayjob-no-pipeline": (
        kuberay_broken(rayjob, "spec.entrypoint", "python train.py"),
        "runs no pipeline"),
    "rayjob-no-entrypoint": (
        kuberay_broken(rayjob, "spec.entrypoint", DELETE), "entrypoint"),
    "rayjob-kept-cluster": (
        kuberay_broken(rayjob, "spec.shutdownAfterJobFinishes", DELETE),
        "shutdownAfterJobFinishes"),
    "rayjob-no-tracking-uri": (
        kuberay_broken(rayjob, "spec.runtimeEnvYAML", "env_vars: {DO_NOT_TRACK: 'true'}\n"),
        "MLFLOW_TRACKING_URI"),
    "rayjob-numeric-env-var": (
        kuberay_broken(rayjob, "spec.runtimeEnvYAML",
                       "env_vars: {MLFLOW_TRACKING_URI: 'http://m:5000', RAY_USAGE_STATS_ENABLED: 0}\n"),
        "RAY_USAGE_STATS_ENABLED"),
    "rayjob-too-few-gpus": (
        lambda: check_kuberay(set_in(set_in(rayjob(), f"{JOB_WORKER}.replicas", 1), f"{JOB_WORKER}.minReplicas", 1),
                              volume_claims()), "GPU(s) for"),
    "rayjob-no-worker-groups": (
        kuberay_broken(rayjob, "spec.rayClusterSpec.workerGroupSpecs", []),
        "workerGroupSpecs: empty"),
    "pvc-read-write-once": (
        lambda: check_kuberay(set_in(load("kuberay/shared-storage.yaml"), "spec.accessModes", ["ReadWriteOnce"]),
                              volume_claims()), "ReadWriteMany"),
    # Dockerfile
    "dockerfile-no-from": (
        lambda: check_dockerfile([ln for ln in dockerfile() if not ln.startswith("FROM")]), "no FROM"),
    "dockerfile-other-ray": (
        lambda: check_dockerfile([ln.replace("2.60.0-", "2.9.0-") for ln in dockerfile()]), "is not Ray"),
    "dockerfile-copy-missing-path": (
        lambda: check_dockerfile(dockerfile() + ["COPY nope/ nope/"]), "COPY source nope/"),
    "dockerfile-no-lock-copied": (
        lambda: check_dockerfile([ln for ln in dockerfile() if not ln.startswith("COPY")]), "no COPY brings"),
    "dockerfile-lock-not-installed": (
        lambda: check_dockerfile([ln.replace("requirements/lock.txt", "requirements/base.txt")
                                  for ln in dockerfile()]), "no RUN installs"),
    "dockerfile-project-not-installed": (
        lambda: check_dockerfile([ln for ln in dockerfile() if "--no-deps ." not in ln]), "not installed"),
    "dockerfile-other-workdir": (
        lambda: check_dockerfile([ln.replace("WORKDIR /app", "WORKDIR /srv") for ln in dockerfile()]), "WORKDIR"),
    # runtime env
    "runtime-env-unknown-key": (
        lambda: check_runtime_env(load("runtime_env.yaml") | {"working_dir": "."}), "'working_dir'"),
    "runtime-env-numeric-value": (
        lambda: check_runtime_env(set_in(load("runtime_env.yaml"), "env_vars.DO_NOT_TRACK", True)), "DO_NOT_TRACK"),
    "runtime-env-missing-pip-file": (
        lambda: check_runtime_env(load("runtime_env.yaml") | {"pip": "requirements/nope.txt"}), "not in the repo"),
    "runtime-env-pip-not-strings": (
        lambda: check_runtime_env(load("runtime_env.yaml") | {"pip": ["numpy", 3]}), "must be a string"),
    "runtime-env-not-a-mapping": (lambda: check_runtime_env(["env_vars"]), "mapping"),
}


def dockerfile() -> list[str]:
    return (CLUSTER / "Dockerfile").read_text().splitlines()


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_a_broken_copy_is_reported(case):
    run, expected = BROKEN[case]
    problems = run()
    assert any(expected in p for p in problems), problems


def test_the_commented_pip_line_is_a_valid_runtime_env():
    """runtime_env.yaml's commented-out pip line works once uncommented."""
    text = (CLUSTER / "runtime_env.yaml").read_text().replace("# pip: ", "pip: ")
    env = yaml.safe_load(text)
    assert env["pip"] == "requirements/lock.txt" and check_runtime_env(env) == []


# ---- the language-model job examples ---------------------------------------------------------

def test_the_8b_job_examples_validate_as_zero3_bf16_lora_and_full():
    from hamu_ray.engine.config import load_config

    jobs = {path.stem: load_config(path) for path in sorted((CLUSTER / "jobs").glob("*.yaml"))}
    assert set(jobs) == {"llama-8b-lora", "llama-8b-full"}
    for name, job in jobs.items():
        assert job.model.kind == "causal_lm" and job.train.zero_stage == 3 and job.train.bf16, name
    assert jobs["llama-8b-lora"].model.lora is not None and jobs["llama-8b-full"].model.lora is None
